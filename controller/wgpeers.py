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

The texts are parsed by topology.wgformat (pure). ``read_peers(with_key=True)``
also gives the device's own public key, from the same source.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.links import LinkError, in_netns
from topology.peers import STALE_AFTER_S as STALE_AFTER_S  # re-exported: part of this API
from topology.peers import WgPeer as WgPeer
from topology.wgformat import WgError as WgError
from topology.wgformat import (
    nl_str,
    parse_netlink,
    parse_uapi,
    parse_wg_conf,
    parse_wg_dump,
    public_from_private,
    uapi_private_key,
    wg_dump_public_key,
)

DEFAULT_SOCK_DIR = Path("/var/run/wireguard")
KERNEL_MODULE = Path("/sys/module/wireguard")
UAPI_TIMEOUT_S = 2.0
WG_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PeerReading:
    """Peers of one interface and where they were read from."""

    interface: str
    source: str  # "netlink", "uapi", "wg-show", "conf"
    peers: tuple[WgPeer, ...]
    public_key: str | None = None  # the device's own (read_peers(with_key=True))


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


def public_key_from_netlink(interface: str) -> str | None:
    """The kernel device's own public key; WgError if it cannot be read."""
    try:
        from pyroute2 import WireGuard

        wg = WireGuard()
    except Exception as exc:
        raise WgError(f"no WireGuard netlink family: {exc}") from None
    try:
        for msg in wg.info(interface):
            key = msg.get_attr("WGDEVICE_A_PUBLIC_KEY")
            if key:
                return nl_str(key)
    except Exception as exc:
        raise WgError(f"netlink: {interface}: {exc}") from None
    finally:
        wg.close()
    return None


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
    with_key: bool = False,
    netns: str | None = None,
) -> PeerReading:
    """The peers of ``interface``: netlink, else the UAPI socket, else ``wg show dump``.

    ``use_netlink`` None means "if the kernel module is loaded"; ``wg_cmd`` None
    skips the ``wg`` fallback. ``with_key``: also the device's own public key (the
    UAPI gives the private key: derived), from the same source. ``netns``: the
    network namespace of a kernel device. WgError lists why every source failed.
    """
    errors = []
    if use_netlink if use_netlink is not None else kernel_wireguard():
        try:
            with in_netns(netns):
                peers = peers_from_netlink(interface)
                key = public_key_from_netlink(interface) if with_key else None
            return PeerReading(interface, "netlink", tuple(peers), key)
        except (WgError, LinkError) as exc:  # not a kernel device, no namespace: next source
            errors.append(str(exc))
    if uapi_socket(interface, sock_dir).exists():
        try:
            text = uapi_get(interface, sock_dir)
            peers = parse_uapi(text)
            private = uapi_private_key(text) if with_key else None
            key = public_from_private(private) if private else None
            return PeerReading(interface, "uapi", tuple(peers), key)
        except (WgError, ValueError) as exc:
            errors.append(str(exc))
    else:
        errors.append(f"no UAPI socket {uapi_socket(interface, sock_dir)}")
    if wg_cmd is not None:
        try:
            text = wg_show_dump(interface, wg_cmd)
            key = wg_dump_public_key(text) if with_key else None
            return PeerReading(interface, "wg-show", tuple(parse_wg_dump(text)), key)
        except WgError as exc:
            errors.append(str(exc))
    raise WgError(f"cannot read peers of {interface}: " + "; ".join(errors))
