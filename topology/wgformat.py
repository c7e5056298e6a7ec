"""WireGuard's own formats -> :class:`topology.peers.WgPeer` values, and its keys. Pure.

The texts exactly as the sources produce them: a wireguard-go UAPI ``get=1``
reply (:func:`parse_uapi`), ``wg show <if> dump`` (:func:`parse_wg_dump`), a
wg-quick ``.conf`` file (:func:`parse_wg_conf`, through wgconfig) and decoded
pyroute2 ``WireGuard.info()`` messages (:func:`parse_netlink`);
controller.wgpeers reads them.

Keys are always returned base64 encoded, as ``wg`` prints them; the UAPI
protocol uses hex. ``last_handshake`` is epoch seconds, ``None`` for "never".
The UAPI gives a device's private key, not its public key:
:func:`public_from_private` derives it (X25519 through ``cryptography``).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from topology.peers import WgPeer


class WgError(RuntimeError):
    """The peers could not be read (no device, protocol error, command failed)."""


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


def public_from_private(private_hex: str) -> str:
    """The base64 public key of a hex private key (as the UAPI gives it): X25519."""
    raw = bytes.fromhex(private_hex)
    if len(raw) != 32:
        raise ValueError("a WireGuard private key is 32 bytes")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(pub).decode()


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


def wg_dump_public_key(text: str) -> str | None:
    """The device's own public key in ``wg show <if> dump`` (its first line)."""
    first = text.splitlines()[:1]
    fields = first[0].split("\t") if first else []
    return fields[1] if len(fields) in (4, 5) and fields[1] != "(none)" else None


def uapi_private_key(text: str) -> str | None:
    """The device's private key (hex) in a UAPI ``get=1`` reply; None if it has none."""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            return None  # the device section is over
        if key == "private_key" and value:
            return value.strip()
    return None


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


def nl_str(value: Any) -> str:
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
            key = nl_str(p.get_attr("WGPEER_A_PUBLIC_KEY"))
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
