"""WireGuard peers of the mesh interface (Netmaker: ``netmaker``, older ``nm-<net>``).

Where the peers come from, in the order :func:`read_peers` tries them:

1. the kernel, over generic netlink (pyroute2 ``WireGuard``), only where the
   ``wireguard`` kernel module is loaded: pyroute2's WireGuard API is
   netlink-only and fails on wireguard-go;
2. the wireguard-go UAPI socket ``<sock_dir>/<if>.sock`` (``get=1``), which is
   how ``wg`` itself talks to a userspace implementation;
3. ``wg show <if> dump``.

:func:`peers_from_conf` reads a wg-quick ``.conf`` file through wgconfig
(Netmaker does not store its peer list on disk; other setups do).

Pure parsers (:func:`parse_uapi`, :func:`parse_wg_dump`, :func:`parse_wg_conf`,
:func:`parse_netlink`) are separate from the I/O around them and take the text
(or decoded netlink messages) exactly as the source produces it.

Keys are always returned base64 encoded, as ``wg`` prints them; the UAPI
protocol uses hex. ``last_handshake`` is epoch seconds, ``None`` for "never".
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_SOCK_DIR = Path("/var/run/wireguard")
KERNEL_MODULE = Path("/sys/module/wireguard")
# WireGuard re-handshakes at least every 2 minutes while traffic flows
# (REKEY_AFTER_TIME 120 s) and gives up on a session after REJECT_AFTER_TIME
# (180 s): a handshake older than that means the peer is gone.
STALE_AFTER_S = 180.0
UAPI_TIMEOUT_S = 2.0
WG_TIMEOUT_S = 5.0


class WgError(RuntimeError):
    """The peers could not be read (no device, protocol error, command failed)."""


@dataclass(frozen=True)
class WgPeer:
    public_key: str  # base64, as `wg` prints it
    endpoint: str | None = None  # "192.0.2.2:51821", "[2001:db8::1]:51821" or None
    allowed_ips: tuple[str, ...] = ()  # CIDRs in the device's order
    last_handshake: int | None = None  # epoch seconds; None: never
    rx_bytes: int = 0
    tx_bytes: int = 0

    def handshake_age(self, now: float | None = None) -> float | None:
        """Seconds since the last handshake (None if there never was one)."""
        if self.last_handshake is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_handshake)

    def is_stale(self, now: float | None = None, max_age_s: float = STALE_AFTER_S) -> bool:
        """True if the peer never completed a handshake or the last one is too old."""
        age = self.handshake_age(now)
        return age is None or age > max_age_s

    @property
    def host_addresses(self) -> tuple[str, ...]:
        """The single addresses among ``allowed_ips`` (/32, /128): the peer's own mesh IPs."""
        out = []
        for cidr in self.allowed_ips:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.num_addresses == 1:
                out.append(str(net.network_address))
        return tuple(out)


@dataclass(frozen=True)
class PeerReading:
    """Peers of one interface and where they were read from."""

    interface: str
    source: str  # "netlink", "uapi", "wg-show", "conf"
    peers: tuple[WgPeer, ...]


# --------------------------------------------------------------------------- keys


def hex_to_b64(key: str) -> str:
    """A 32-byte key in hex (UAPI) as base64 (``wg``); WgError if it is not one."""
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raise WgError(f"not a hex key: {key!r}") from None
    if len(raw) != 32:
        raise WgError(f"key is {len(raw)} bytes, not 32: {key!r}")
    return base64.b64encode(raw).decode()


def b64_to_hex(key: str) -> str:
    """A base64 key as the hex form the UAPI protocol uses."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise WgError(f"not a base64 key: {key!r}") from None
    if len(raw) != 32:
        raise WgError(f"key is {len(raw)} bytes, not 32: {key!r}")
    return raw.hex()


def _check_b64(key: str) -> str:
    b64_to_hex(key)
    return key


# --------------------------------------------------------------------------- pure parsers


def parse_uapi(text: str) -> list[WgPeer]:
    """Peers in the reply of a wireguard-go UAPI ``get=1`` request.

    ``key=value`` lines; keys of the device come first, then each
    ``public_key=`` starts a peer; the reply ends with ``errno=N`` (WgError if
    N is not 0, or if there is no ``errno`` line: a truncated reply).
    """
    peers: list[WgPeer] = []
    cur: dict[str, Any] | None = None
    errno_seen: int | None = None

    def close() -> None:
        if cur is not None:
            peers.append(_peer_from_uapi(cur))

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise WgError(f"bad UAPI line: {raw!r}")
        if key == "errno":
            errno_seen = int(value)
            break
        if key == "public_key":
            close()
            cur = {"public_key": hex_to_b64(value), "allowed_ips": []}
        elif cur is None:
            continue  # device-level keys (private_key, listen_port, fwmark)
        elif key == "allowed_ip":
            cur["allowed_ips"].append(value)
        else:
            cur[key] = value
    if errno_seen is None:
        raise WgError("UAPI reply has no errno line (truncated?)")
    if errno_seen != 0:
        raise WgError(f"UAPI get failed: errno={errno_seen}")
    close()
    return peers


def _peer_from_uapi(d: dict[str, Any]) -> WgPeer:
    sec = int(d.get("last_handshake_time_sec", 0) or 0)
    return WgPeer(
        public_key=d["public_key"],
        endpoint=d.get("endpoint") or None,
        allowed_ips=tuple(d["allowed_ips"]),
        last_handshake=sec or None,
        rx_bytes=int(d.get("rx_bytes", 0) or 0),
        tx_bytes=int(d.get("tx_bytes", 0) or 0),
    )


def parse_wg_dump(text: str, interface: str | None = None) -> list[WgPeer]:
    """Peers in ``wg show <if> dump`` (or ``wg show all dump`` filtered by ``interface``).

    Tab separated. ``<if> dump``: one interface line (private key, public key,
    listen port, fwmark), then per peer: public key, preshared key, endpoint,
    allowed ips, latest handshake, rx, tx, persistent keepalive. ``all dump``
    prefixes every line with the interface name.
    """
    peers = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        f = raw.split("\t")
        if len(f) == 9:  # all dump, peer line
            if interface is not None and f[0] != interface:
                continue
            f = f[1:]
        elif len(f) in (4, 5):  # interface line
            continue
        elif len(f) != 8:
            raise WgError(f"bad `wg show dump` line ({len(f)} fields): {raw!r}")
        key, _psk, endpoint, allowed, handshake, rx, tx, _keepalive = f
        peers.append(WgPeer(
            public_key=_check_b64(key),
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=() if allowed in ("(none)", "") else tuple(allowed.split(",")),
            last_handshake=int(handshake) or None,
            rx_bytes=int(rx),
            tx_bytes=int(tx),
        ))
    return peers


def _as_list(value: Any) -> list[str]:
    """wgconfig gives one value as str (int if numeric), several as a list."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def parse_wg_conf(text: str) -> list[WgPeer]:
    """Peers of a wg-quick ``.conf`` file (its text), through wgconfig.

    Peers disabled with wgconfig's ``#!`` marker are left out. A file has no
    handshake or counters: those stay None / 0.
    """
    import wgconfig

    wc = wgconfig.WGConfig()
    wc.read_from_fileobj(io.StringIO(text))
    try:
        data = wc.get_peers(keys_only=False)
    except ValueError as exc:  # unsupported section and the like
        raise WgError(f"bad WireGuard config: {exc}") from None
    peers = []
    for key, attrs in data.items():
        if not key:
            raise WgError("a [Peer] section has no PublicKey")
        endpoints = _as_list(attrs.get("Endpoint"))
        peers.append(WgPeer(
            public_key=_check_b64(str(key)),
            endpoint=endpoints[0] if endpoints else None,
            allowed_ips=tuple(_as_list(attrs.get("AllowedIPs"))),
        ))
    return peers


def _nl_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_netlink(messages: Iterable[Any]) -> list[WgPeer]:
    """Peers in decoded pyroute2 ``WireGuard.info()`` messages.

    The kernel splits a device with many peers/allowed IPs over several
    messages; a peer continued in the next message repeats its public key and
    is merged here.
    """
    peers: list[WgPeer] = []
    for msg in messages:
        for p in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _nl_str(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            endpoint = None
            if ep and ep.get("addr") and ep.get("port"):
                addr = ep["addr"]
                endpoint = f"[{addr}]:{ep['port']}" if ":" in addr else f"{addr}:{ep['port']}"
            hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            allowed = tuple(
                a["addr"] for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or ()) if a.get("addr")
            )
            peer = WgPeer(
                public_key=key,
                endpoint=endpoint,
                allowed_ips=allowed,
                last_handshake=(int(hs["tv_sec"]) or None) if hs else None,
                rx_bytes=int(p.get_attr("WGPEER_A_RX_BYTES") or 0),
                tx_bytes=int(p.get_attr("WGPEER_A_TX_BYTES") or 0),
            )
            if peers and peers[-1].public_key == key:
                peers[-1] = replace(peers[-1], allowed_ips=peers[-1].allowed_ips + allowed)
            else:
                peers.append(peer)
    return peers


# --------------------------------------------------------------------------- I/O


def kernel_wireguard() -> bool:
    """True where the WireGuard kernel module is loaded (netlink API available)."""
    return KERNEL_MODULE.exists()


def peers_from_netlink(interface: str) -> list[WgPeer]:
    """Peers from the kernel (in the caller's network namespace); WgError if that fails."""
    try:
        from pyroute2 import WireGuard
    except ImportError as exc:  # pragma: no cover - pyroute2 is a dependency
        raise WgError(f"pyroute2 WireGuard unavailable: {exc}") from None
    try:
        wg = WireGuard()
    except Exception as exc:  # no "wireguard" generic netlink family
        raise WgError(f"no WireGuard netlink family: {exc}") from None
    try:
        return parse_netlink(wg.info(interface))
    except Exception as exc:  # NetlinkError: ENODEV, EOPNOTSUPP (not a kernel device)
        raise WgError(f"netlink: {interface}: {exc}") from None
    finally:
        wg.close()


def uapi_socket(interface: str, sock_dir: str | Path = DEFAULT_SOCK_DIR) -> Path:
    return Path(sock_dir) / f"{interface}.sock"


def uapi_get(interface: str, sock_dir: str | Path = DEFAULT_SOCK_DIR,
             timeout_s: float = UAPI_TIMEOUT_S) -> str:
    """The raw reply of ``get=1`` on the wireguard-go UAPI socket of ``interface``."""
    path = uapi_socket(interface, sock_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(os.fspath(path))
            sock.sendall(b"get=1\n\n")
            buf = b""
            # the reply ends with "errno=N\n\n"; wireguard-go keeps the socket open
            while not (b"errno=" in buf and buf.endswith(b"\n\n")):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise WgError(f"UAPI {path}: {exc}") from None
    return buf.decode(errors="replace")


def peers_from_uapi(interface: str, sock_dir: str | Path = DEFAULT_SOCK_DIR) -> list[WgPeer]:
    return parse_uapi(uapi_get(interface, sock_dir))


def wg_show_dump(interface: str, wg_cmd: Sequence[str] = ("wg",)) -> str:
    """Output of ``wg show <interface> dump``.

    ``wg_cmd`` is the command prefix, e.g. ``["ip", "netns", "exec", NS, "wg"]``
    or a wrapper that first enters a private mount namespace.
    """
    argv = [*wg_cmd, "show", interface, "dump"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=WG_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WgError(f"{' '.join(argv)}: {exc}") from None
    if res.returncode != 0:
        raise WgError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res.stdout


def peers_from_wg_show(interface: str, wg_cmd: Sequence[str] = ("wg",)) -> list[WgPeer]:
    return parse_wg_dump(wg_show_dump(interface, wg_cmd))


def peers_from_conf(path: str | Path) -> list[WgPeer]:
    """Peers of a wg-quick config file (a path; ``wg0`` alone means /etc/wireguard/wg0.conf)."""
    import wgconfig

    filename = wgconfig.WGConfig.file2filename(os.fspath(path))
    try:
        text = Path(filename).read_text()
    except OSError as exc:
        raise WgError(f"{filename}: {exc.strerror}") from None
    return parse_wg_conf(text)


def read_peers(
    interface: str,
    *,
    sock_dir: str | Path = DEFAULT_SOCK_DIR,
    wg_cmd: Sequence[str] | None = ("wg",),
    use_netlink: bool | None = None,
) -> PeerReading:
    """The peers of ``interface``: netlink, else the UAPI socket, else ``wg show dump``.

    ``use_netlink`` None means "if the kernel module is loaded"; ``wg_cmd`` None
    skips the ``wg`` fallback. WgError lists why every source failed.
    """
    errors = []
    if use_netlink if use_netlink is not None else kernel_wireguard():
        try:
            return PeerReading(interface, "netlink", tuple(peers_from_netlink(interface)))
        except WgError as exc:
            errors.append(str(exc))
    if uapi_socket(interface, sock_dir).exists():
        try:
            return PeerReading(interface, "uapi", tuple(peers_from_uapi(interface, sock_dir)))
        except WgError as exc:
            errors.append(str(exc))
    else:
        errors.append(f"no UAPI socket {uapi_socket(interface, sock_dir)}")
    if wg_cmd is not None:
        try:
            return PeerReading(interface, "wg-show", tuple(peers_from_wg_show(interface, wg_cmd)))
        except WgError as exc:
            errors.append(str(exc))
    raise WgError(f"cannot read peers of {interface}: " + "; ".join(errors))
