"""TLS identities for python-ovs streams, one per client instead of one per process.

python-ovs keeps the key, certificate and CA of every ``ssl:`` connection in
class attributes of ``ovs.stream.Stream``: one identity per process. A
controller has one identity and would not care, but labs and benchmarks run
many simulated hosts in one process, each of which must present its own
certificate (its CN is its RBAC identity). ``remotes_with_identity`` registers
a stream class bound to one set of files under its own scheme (``sslid<N>:``)
and rewrites ``ssl:`` remotes to it; everything else (reconnect, probes,
TLS 1.2+, certificate chain checked against the CA, no host name check, as
OVS's own C client) is python-ovs' SSL stream.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import ovs.socket_util
import ovs.stream

_lock = threading.Lock()
_schemes: dict[tuple[str, str, str], str] = {}


def _stream_class(key: str, cert: str, ca_cert: str) -> type[ovs.stream.SSLStream]:
    class IdentityStream(ovs.stream.SSLStream):
        @staticmethod
        def _open(suffix: str, dscp: int) -> tuple[int, Any]:
            address = ovs.socket_util.inet_parse_active(suffix, 0, raises=False)
            family, sock = ovs.socket_util.inet_create_socket_active(
                socket.SOCK_STREAM, address)
            if sock is None:
                return family, sock
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = False  # members are checked by CA, as OVS does
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(ca_cert)
            ctx.load_cert_chain(cert, key)
            tls_sock = ctx.wrap_socket(sock, do_handshake_on_connect=False)
            error = ovs.socket_util.inet_connect_active(tls_sock, address, family, dscp)
            if not error:
                try:
                    tls_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError as exc:
                    tls_sock.close()
                    return ovs.socket_util.get_exception_errno(exc), None
            return error, tls_sock

    return IdentityStream


def identity_scheme(key: Path, cert: Path, ca_cert: Path) -> str:
    """The stream scheme (``sslid<N>``) that connects with these files."""
    files = (str(key), str(cert), str(ca_cert))
    for path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    with _lock:
        scheme = _schemes.get(files)
        if scheme is None:
            scheme = f"sslid{len(_schemes)}"
            ovs.stream.Stream.register_method(scheme, _stream_class(*files))
            _schemes[files] = scheme
        return scheme


def remotes_with_identity(remotes: str, key: Path, cert: Path, ca_cert: Path) -> str:
    """``remotes`` (comma-separated) with every ``ssl:`` one using these files."""
    scheme = identity_scheme(key, cert, ca_cert)
    return ",".join(f"{scheme}:{r[4:]}" if r.startswith("ssl:") else r
                    for r in remotes.split(","))
