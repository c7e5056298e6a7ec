"""One kernel VXLAN port on the mesh bridge per live WireGuard peer (``vxlan: true``).

A WireGuard device is L3 and cannot be an OVS port, so L2 between the hosts'
``mesh`` bridges is carried by kernel VXLAN devices over the WireGuard
addresses, one per peer, each a port of ``mesh`` (one OpenFlow port per peer
host). This module keeps that set of devices equal to the set of live peers
of ``bridges.mesh.wg_interface``:

* :func:`plan_devices` / :func:`plan_peers` (pure): which devices should
  exist, given the peers, this host's address on the WireGuard interface, this
  host's public key and the time. A peer is live when its latest handshake is
  at most ``stale_after_s`` old (never: not live) and it has an IPv4 /32 among
  its allowed IPs (its mesh address: the VXLAN remote).
* :class:`PeerSync` (I/O): reads the peers (controller.wgpeers), this host's
  key and address (pyroute2), the ``vx-*`` devices (pyroute2) and the mesh
  bridge's ports (python-ovs IDL), and makes the difference: ports of
  vanished/stale peers are removed from OVS and their devices deleted; missing
  devices are created (MTU 1370, learning off, GRO off, up) and added as ports.
  ``socknet bootstrap`` runs :meth:`PeerSync.sync_once`; ``socknet run`` runs
  :meth:`PeerSync.run` in a thread every :data:`SYNC_INTERVAL_S` seconds.

Names and numbers both ends agree on, with no coordination:

* device name: ``vx-`` + the first 8 hex digits of sha256(peer's raw 32-byte
  public key) (:func:`device_name`);
* VNI: the first 24 bits of sha256(the two raw public keys, smaller first)
  (:func:`pair_vni`): the same seen from both ends. Linux refuses two VXLAN
  devices with the same VNI and UDP port in one namespace (whatever their
  remotes), so the VNI must differ per peer of one host; a collision (about
  n^2/2^25 for n peers) is reported and the later peer is left out.

Only devices and ports whose name has exactly that shape are ever touched, so
manually made uplinks (``vx-h2``, ``nm-privacy``) are left alone.

Pitfalls handled here:

* On the netdev datapath ovs-vswitchd keeps a port whose device was deleted
  (same ofport, stale ifindex) and does not re-bind when a device of the same
  name comes back: a re-created device gets its port removed (and that change
  applied) before it is added again; a port whose OVSDB ``ifindex`` is not the
  device's is re-added the same way.
* GRO on the VXLAN device would hand OVS coalesced TCP frames larger than the
  MTU (dropped silently): turned off.
* A peer's handshake only renews while packets flow: an idle mesh without
  ``persistent-keepalive`` (Netmaker sets it) would look stale after 3 minutes.
* wireguard-go's UAPI gives this host's private key, not its public key: the
  public key is derived (X25519), once per private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ovs.db.idl

from controller import links, wgpeers
from controller.logs import get_logger
from controller.ovsdb import OvsdbError, OvsdbView, commit
from topology.config import HostConfig

log = get_logger("socknet.peersync")

DEVICE_PREFIX = "vx-"
DEVICE_RE = re.compile(r"^vx-[0-9a-f]{8}$")
VXLAN_PORT = 4789
VXLAN_MTU = 1370  # WireGuard 1420 (1500 - 80) minus VXLAN's 50
SYNC_INTERVAL_S = 2.0
MAX_TXN_ATTEMPTS = 5
IFF_UP = 0x1

Txn = ovs.db.idl.Transaction
COLUMNS: dict[str, list[str]] = {
    "Open_vSwitch": ["bridges", "next_cfg", "cur_cfg"],
    "Bridge": ["name", "ports"],
    "Port": ["name", "interfaces"],
    "Interface": ["name", "type", "ofport", "ifindex", "error"],
}


class PeerSyncError(RuntimeError):
    """A device or port could not be made or removed (the message says which and why)."""


# --------------------------------------------------------------------------- naming


def _raw_key(key: str) -> bytes:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not a base64 WireGuard key: {key!r}") from None
    if len(raw) != 32:
        raise ValueError(f"WireGuard key is {len(raw)} bytes, not 32: {key!r}")
    return raw


def device_name(public_key: str) -> str:
    """``vx-`` + 8 hex digits of sha256(the peer's raw public key): 11 chars."""
    return DEVICE_PREFIX + hashlib.sha256(_raw_key(public_key)).hexdigest()[:8]


def pair_vni(key_a: str, key_b: str) -> int:
    """VNI of the link between two hosts, from their public keys, order-independent."""
    a, b = sorted((_raw_key(key_a), _raw_key(key_b)))
    vni = int.from_bytes(hashlib.sha256(a + b).digest()[:3], "big")
    return vni or 1  # 0 is legal for Linux but easy to mistake for "unset"


# --------------------------------------------------------------------------- X25519

_P = 2**255 - 19
_A24 = 121665


def _x25519_base(scalar: bytes) -> bytes:
    """RFC 7748 X25519(scalar, 9): a WireGuard public key from its private key."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    x1, x2, z2, x3, z3, swap = 9, 1, 0, 9, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = x2 + z2, x2 - z2
        aa, bb = a * a % _P, b * b % _P
        e = aa - bb
        c, d = x3 + z3, x3 - z3
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


_PUBLIC_CACHE: dict[bytes, str] = {}


def public_from_private(private_hex: str) -> str:
    """The base64 public key of a hex private key (as the UAPI gives it)."""
    raw = bytes.fromhex(private_hex)
    if len(raw) != 32:
        raise ValueError("a WireGuard private key is 32 bytes")
    digest = hashlib.sha256(raw).digest()  # cache key: never keep the private key itself
    if digest not in _PUBLIC_CACHE:
        try:  # constant time where available (cryptography is in requirements.lock)
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(
                Encoding.Raw, PublicFormat.Raw)
        except ImportError:
            pub = _x25519_base(raw)
        _PUBLIC_CACHE[digest] = base64.b64encode(pub).decode()
    return _PUBLIC_CACHE[digest]


# --------------------------------------------------------------------------- the plan (pure)


@dataclass(frozen=True, order=True)
class VxDevice:
    """One desired per-peer VXLAN device (and OVS port of the same name)."""

    name: str
    vni: int
    remote: str  # the peer's mesh address (its first IPv4 /32 allowed IP)
    local: str  # this host's address on the WireGuard interface
    dev: str  # the WireGuard interface the VXLAN packets go through
    public_key: str = field(compare=False)
    port: int = VXLAN_PORT
    mtu: int = VXLAN_MTU


@dataclass(frozen=True)
class PeerPlan:
    """A peer and what the plan makes of it: a device, or why not (``reason``)."""

    peer: wgpeers.WgPeer
    device: VxDevice | None
    reason: str | None = None
    handshake_age_s: float | None = None
    stale: bool = False


def _mesh_address(peer: wgpeers.WgPeer) -> str | None:
    for addr in peer.host_addresses:
        if ipaddress.ip_address(addr).version == 4:
            return addr
    return None


def plan_peers(peers: Iterable[wgpeers.WgPeer], local_ip: str | None, now: float, *,
               local_key: str | None, wg_interface: str = "netmaker",
               stale_after_s: float = wgpeers.STALE_AFTER_S) -> list[PeerPlan]:
    """Every peer with its device or the reason it gets none, ordered by public key."""
    out: list[PeerPlan] = []
    vnis: dict[int, str] = {}
    names: dict[str, str] = {}
    for peer in sorted(peers, key=lambda p: p.public_key):
        age = peer.handshake_age(now)
        stale = peer.is_stale(now, stale_after_s)

        def skip(reason: str, p: wgpeers.WgPeer = peer, a: float | None = age,
                 s: bool = stale) -> None:
            out.append(PeerPlan(p, None, reason, a, s))

        remote = _mesh_address(peer)
        if stale:
            skip("no handshake yet" if age is None else
                 f"stale: last handshake {age:.0f} s ago (> {stale_after_s:g} s)")
        elif remote is None:
            skip("no IPv4 /32 among its allowed IPs (no mesh address)")
        elif local_ip is None or local_key is None:
            skip(f"this host has no IPv4 address or key on {wg_interface}")
        elif remote == local_ip or peer.public_key == local_key:
            skip("the peer is this host")
        else:
            try:
                name, vni = device_name(peer.public_key), pair_vni(local_key, peer.public_key)
            except ValueError as exc:
                skip(str(exc))
                continue
            if vni in vnis:
                skip(f"VNI {vni} collides with peer {vnis[vni]}")
            elif name in names:
                skip(f"device name {name} collides with peer {names[name]}")
            else:
                vnis[vni] = names[name] = peer.public_key
                out.append(PeerPlan(peer, VxDevice(name, vni, remote, local_ip, wg_interface,
                                                   peer.public_key), None, age, stale))
    return out


def plan_devices(peers: Iterable[wgpeers.WgPeer], local_ip: str | None, now: float, *,
                 local_key: str | None, wg_interface: str = "netmaker",
                 stale_after_s: float = wgpeers.STALE_AFTER_S) -> frozenset[VxDevice]:
    """The per-peer devices that should exist (pure; see :func:`plan_peers`)."""
    return frozenset(p.device for p in plan_peers(
        peers, local_ip, now, local_key=local_key, wg_interface=wg_interface,
        stale_after_s=stale_after_s) if p.device is not None)


# --------------------------------------------------------------------------- reading the mesh


@dataclass(frozen=True)
class MeshReading:
    interface: str
    source: str  # "netlink", "uapi", "wg-show"
    public_key: str | None  # this host's
    local_ip: str | None  # this host's IPv4 address on the interface
    peers: tuple[wgpeers.WgPeer, ...]


def _uapi_private_key(text: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            return None  # the device section is over
        if key == "private_key" and value:
            return value.strip()
    return None


def _local_key_netlink(interface: str) -> str | None:
    from pyroute2 import WireGuard

    wg = WireGuard()
    try:
        for msg in wg.info(interface):
            key = msg.get_attr("WGDEVICE_A_PUBLIC_KEY")
            if key:
                return key.decode() if isinstance(key, bytes) else str(key)
    finally:
        wg.close()
    return None


def _local_key_wg_show(interface: str, wg_cmd: Sequence[str]) -> str | None:
    first = wgpeers.wg_show_dump(interface, wg_cmd).splitlines()[:1]
    fields = first[0].split("\t") if first else []
    return fields[1] if len(fields) in (4, 5) and fields[1] != "(none)" else None


def interface_ipv4(interface: str, netns: str | None = None) -> str | None:
    """The first IPv4 address of ``interface`` (pyroute2), None if it has none."""
    from pyroute2 import IPRoute

    with links.in_netns(netns):
        ipr = IPRoute()
    try:
        idx = ipr.link_lookup(ifname=interface)
        if not idx:
            return None
        for msg in ipr.get_addr(index=idx[0], family=2):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                return str(addr)
        return None
    finally:
        ipr.close()


def read_mesh(interface: str, *, sock_dir: str | Path = wgpeers.DEFAULT_SOCK_DIR,
              wg_cmd: Sequence[str] | None = ("wg",), netns: str | None = None,
              use_netlink: bool | None = None) -> MeshReading:
    """Peers, this host's public key and address on ``interface``. WgError if unreadable.

    The same sources as :func:`controller.wgpeers.read_peers` in the same order;
    with the UAPI socket the peers and the key come from one ``get=1``.
    """
    local_ip = interface_ipv4(interface, netns)
    errors: list[str] = []
    if use_netlink if use_netlink is not None else wgpeers.kernel_wireguard():
        try:
            with links.in_netns(netns):
                peers = wgpeers.peers_from_netlink(interface)
                key = _local_key_netlink(interface)
            return MeshReading(interface, "netlink", key, local_ip, tuple(peers))
        except Exception as exc:  # WgError, NetlinkError, ...: try the next source
            errors.append(str(exc))
    if wgpeers.uapi_socket(interface, sock_dir).exists():
        try:
            text = wgpeers.uapi_get(interface, sock_dir)
            peers = wgpeers.parse_uapi(text)
            private = _uapi_private_key(text)
            key = public_from_private(private) if private else None
            return MeshReading(interface, "uapi", key, local_ip, tuple(peers))
        except (wgpeers.WgError, ValueError) as exc:
            errors.append(str(exc))
    else:
        errors.append(f"no UAPI socket {wgpeers.uapi_socket(interface, sock_dir)}")
    if wg_cmd is not None:
        try:
            peers = wgpeers.peers_from_wg_show(interface, wg_cmd)
            key = _local_key_wg_show(interface, wg_cmd)
            return MeshReading(interface, "wg-show", key, local_ip, tuple(peers))
        except wgpeers.WgError as exc:
            errors.append(str(exc))
    raise wgpeers.WgError(f"cannot read peers of {interface}: " + "; ".join(errors))


def read_mesh_cfg(cfg: HostConfig, *, netns: str | None = None,
                  wg_cmd: Sequence[str] | None = ("wg",)) -> MeshReading:
    mesh = cfg.bridges.mesh
    return read_mesh(mesh.wg_interface, sock_dir=mesh.wg_sock_dir, wg_cmd=wg_cmd, netns=netns)


# --------------------------------------------------------------------------- devices (pyroute2)


@dataclass(frozen=True)
class LinkState:
    """A VXLAN device as the kernel has it."""

    name: str
    index: int
    kind: str | None
    vni: int | None = None
    remote: str | None = None
    local: str | None = None
    link: int | None = None
    port: int | None = None
    learning: int | None = None
    mtu: int | None = None
    up: bool = False


def _link_state(msg: Any) -> LinkState:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None

    def attr(name: str) -> Any:
        return data.get_attr(name) if data is not None and hasattr(data, "get_attr") else None

    return LinkState(
        name=str(msg.get_attr("IFLA_IFNAME")), index=int(msg["index"]),
        kind=str(kind) if kind is not None else None,
        vni=attr("IFLA_VXLAN_ID"), remote=attr("IFLA_VXLAN_GROUP"),
        local=attr("IFLA_VXLAN_LOCAL"), link=attr("IFLA_VXLAN_LINK"),
        port=attr("IFLA_VXLAN_PORT"), learning=attr("IFLA_VXLAN_LEARNING"),
        mtu=msg.get_attr("IFLA_MTU"), up=bool(msg["flags"] & IFF_UP),
    )


def vxlan_links(netns: str | None = None) -> dict[str, LinkState]:
    """Every VXLAN device of the namespace by name (socknet's and others')."""
    from pyroute2 import IPRoute

    with links.in_netns(netns):
        ipr = IPRoute()
    try:
        out = {}
        for msg in ipr.get_links():
            state = _link_state(msg)
            if state.kind == "vxlan" or DEVICE_RE.match(state.name):
                out[state.name] = state
        return out
    finally:
        ipr.close()


def _matches(state: LinkState, dev: VxDevice, dev_index: int | None) -> bool:
    return (state.kind == "vxlan" and state.vni == dev.vni and state.remote == dev.remote
            and state.local == dev.local and state.port == dev.port
            and state.link == dev_index and not state.learning)


def _create_device(dev: VxDevice, wg_index: int, netns: str | None) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with links.in_netns(netns):
        ipr = IPRoute()
    try:
        ipr.link("add", ifname=dev.name, kind="vxlan", vxlan_id=dev.vni,
                 vxlan_group=dev.remote, vxlan_local=dev.local, vxlan_link=wg_index,
                 vxlan_port=dev.port, vxlan_learning=0)
        idx = ipr.link_lookup(ifname=dev.name)[0]
        ipr.link("set", index=idx, mtu=dev.mtu)
        _gro_off(dev.name, netns)
        ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        if ipr.link_lookup(ifname=dev.name):
            try:
                ipr.link("del", index=ipr.link_lookup(ifname=dev.name)[0])
            except NetlinkError:
                pass
        raise PeerSyncError(f"cannot create {dev.name} (vni {dev.vni}, remote {dev.remote}): "
                            f"{exc}") from exc
    finally:
        ipr.close()


def _gro_off(name: str, netns: str | None) -> None:
    """GRO off: coalesced TCP frames larger than the MTU would be dropped by OVS."""
    from pyroute2.ethtool import Ethtool

    with links.in_netns(netns):
        eth = Ethtool()
    try:
        if eth.get_offload_flags(name).get("generic-receive-offload", False):
            eth.set_offload_flag(name, "generic-receive-offload", 0)
    except Exception as exc:  # an odd pyroute2/kernel combination: say so, go on
        log.warning("gro_off_failed", device=name, error=str(exc))
    finally:
        eth.close()


def _fix_device(state: LinkState, dev: VxDevice, netns: str | None) -> list[str]:
    """MTU and up state of an existing, otherwise correct device."""
    from pyroute2 import IPRoute

    changes = []
    with links.in_netns(netns):
        ipr = IPRoute()
    try:
        if state.mtu != dev.mtu:
            ipr.link("set", index=state.index, mtu=dev.mtu)
            changes.append(f"{dev.name}: MTU {state.mtu} -> {dev.mtu}")
        if not state.up:
            ipr.link("set", index=state.index, state="up")
            changes.append(f"{dev.name}: set up")
    finally:
        ipr.close()
    return changes


def _ifindex(name: str, netns: str | None) -> int | None:
    from pyroute2 import IPRoute

    with links.in_netns(netns):
        ipr = IPRoute()
    try:
        idx = ipr.link_lookup(ifname=name)
        return int(idx[0]) if idx else None
    finally:
        ipr.close()


# --------------------------------------------------------------------------- OVS ports (IDL)


def _opt(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


@dataclass(frozen=True)
class PortState:
    name: str
    ofport: int | None
    ifindex: int | None
    error: str | None


def _bridge(idl: ovs.db.idl.Idl, name: str) -> Any:
    for row in idl.tables["Bridge"].rows.values():
        if row.name == name:
            return row
    return None


def _our_ports(idl: ovs.db.idl.Idl, bridge: str) -> dict[str, PortState]:
    br = _bridge(idl, bridge)
    out = {}
    for port in (p for p in (br.ports if br is not None else []) if p is not None):
        if not DEVICE_RE.match(port.name):
            continue
        iface = next((i for i in port.interfaces if i is not None and i.name == port.name), None)
        out[port.name] = PortState(
            port.name,
            _opt(iface.ofport) if iface is not None else None,
            _opt(iface.ifindex) if iface is not None else None,
            _opt(iface.error) if iface is not None else None,
        )
    return out


# --------------------------------------------------------------------------- sync


@dataclass
class SyncResult:
    reading: MeshReading | None = None
    plans: list[PeerPlan] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[str]:
        return [*self.removed, *self.created, *self.changed]


class PeerSync:
    """Keeps ``vx-*`` devices and ports equal to the plan. ``sync_once()``; ``run()``."""

    def __init__(self, cfg: HostConfig, *, netns: str | None = None,
                 wg_cmd: Sequence[str] | None = ("wg",), timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.netns = netns
        self.wg_cmd = wg_cmd
        self.timeout = timeout
        self._view: OvsdbView | None = None
        self.last: SyncResult | None = None

    # ------------------------------------------------------------ OVSDB
    def _open(self) -> OvsdbView:
        if self._view is None:
            view = OvsdbView(self.cfg.ovsdb, columns=COLUMNS, schema_timeout=self.timeout)
            try:
                view.wait_connected(self.timeout)
            except OvsdbError:
                view.close()
                raise
            self._view = view
        else:
            self._view.run_once()
            if not self._view.connected:
                self._view.wait_connected(self.timeout)
        return self._view

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None

    def _ports_txn(self, view: OvsdbView, remove: Iterable[str], add: Iterable[str]) -> None:
        """One transaction: ``remove`` then ``add`` ports (same-named interfaces) on mesh;
        waits until ovs-vswitchd applied it."""
        remove, add = set(remove), sorted(set(add))
        if not remove and not add:
            return
        bridge = self.cfg.bridges.mesh.name
        idl = view.idl
        for _attempt in range(MAX_TXN_ATTEMPTS):
            with view.lock:
                br = _bridge(idl, bridge)
                if br is None:
                    raise PeerSyncError(f"bridge {bridge} does not exist (socknet bootstrap)")
                root = next(iter(idl.tables["Open_vSwitch"].rows.values()))
                txn = Txn(idl)
                txn.add_comment("socknet peersync")
                keep = [p for p in br.ports if p is not None and p.name not in remove]
                present = {p.name for p in keep}
                new = []
                for name in add:
                    if name in present:
                        continue
                    iface = txn.insert(idl.tables["Interface"])
                    iface.name = name
                    iface.type = ""
                    port = txn.insert(idl.tables["Port"])
                    port.name = name
                    port.interfaces = [iface]
                    new.append(port)
                br.verify("ports")
                br.ports = [*keep, *new]
                root.increment("next_cfg")
                try:
                    status = commit(idl, txn, self.timeout)
                except OvsdbError as exc:
                    raise PeerSyncError(str(exc)) from exc
            if status == Txn.SUCCESS:
                self._wait_applied(view, int(txn.get_increment_new_value()), add)
                return
            if status == Txn.UNCHANGED:
                return
            if status != Txn.TRY_AGAIN:
                raise PeerSyncError(f"OVSDB transaction failed: {txn.get_error()}")
            view.run(0.5)
        raise PeerSyncError("OVSDB transaction kept conflicting with concurrent changes")

    def _wait_applied(self, view: OvsdbView, next_cfg: int, added: Sequence[str]) -> None:
        deadline = time.monotonic() + self.timeout
        idl = view.idl
        while True:
            with view.lock:
                root = next(iter(idl.tables["Open_vSwitch"].rows.values()))
                ports = _our_ports(idl, self.cfg.bridges.mesh.name)
                applied = root.cur_cfg >= next_cfg
                pending = [n for n in added if n not in ports or ports[n].ofport is None]
                failed = [f"{n}: {ports[n].error or 'ofport -1'}" for n in added
                          if n in ports and (ports[n].error or ports[n].ofport == -1)]
            if failed:
                raise PeerSyncError("ovs-vswitchd could not add " + "; ".join(failed))
            if applied and not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerSyncError(f"ovs-vswitchd did not apply the port change within "
                                    f"{self.timeout:g}s")
            view.run(min(remaining, 0.2))

    # ------------------------------------------------------------ the sync
    def sync_once(self, now: float | None = None) -> SyncResult:
        """Read, plan, apply. Never raises for an unreadable mesh (``errors`` says why,
        nothing is changed); raises PeerSyncError/OvsdbError for failed changes."""
        result = SyncResult()
        mesh = self.cfg.bridges.mesh
        try:
            reading = read_mesh_cfg(self.cfg, netns=self.netns, wg_cmd=self.wg_cmd)
        except wgpeers.WgError as exc:
            result.errors.append(str(exc))
            self.last = result
            return result
        result.reading = reading
        result.plans = plan_peers(reading.peers, reading.local_ip,
                                  time.time() if now is None else now,
                                  local_key=reading.public_key, wg_interface=mesh.wg_interface,
                                  stale_after_s=mesh.stale_after_s)
        desired = {p.device.name: p.device for p in result.plans if p.device is not None}
        wg_index = _ifindex(mesh.wg_interface, self.netns)
        current = vxlan_links(self.netns)
        for name, state in current.items():
            if DEVICE_RE.match(name) and state.kind != "vxlan" and name in desired:
                result.errors.append(f"{name} exists but is a {state.kind or 'plain'} "
                                     "device, not VXLAN: left alone")
                del desired[name]
        ours = {n: s for n, s in current.items() if DEVICE_RE.match(n) and s.kind == "vxlan"}
        view = self._open()
        with view.lock:
            ports = _our_ports(view.idl, mesh.name)

        gone = sorted((set(ours) | set(ports)) - set(desired))
        recreate = sorted(n for n, d in desired.items()
                          if n in ours and not _matches(ours[n], d, wg_index))
        create = sorted(n for n in desired if n not in ours)
        # a port bound to another (deleted) device of that name: re-add it after removing
        rebind = sorted(n for n in desired if n in ports and n not in gone
                        and (n in recreate or n in create
                             or ports[n].ifindex not in (None, 0, ours[n].index)))
        self._ports_txn(view, [n for n in (*gone, *rebind) if n in ports], [])
        for name in gone:
            if name in ours:
                links.delete_link(name, netns=self.netns)
            result.removed.append(self._describe_removed(name, ports, ours))
        for name in recreate:
            links.delete_link(name, netns=self.netns)
        for name in [*recreate, *create]:
            if wg_index is None:
                result.errors.append(f"{name}: no interface {mesh.wg_interface}")
                continue
            try:
                _create_device(desired[name], wg_index, self.netns)
            except PeerSyncError as exc:
                result.errors.append(str(exc))
                continue
            d = desired[name]
            result.created.append(f"{name} (peer {d.public_key}, remote {d.remote}, "
                                  f"vni {d.vni})")
        for name, dev in sorted(desired.items()):
            if name in ours and name not in recreate:
                result.changed.extend(_fix_device(ours[name], dev, self.netns))
        present = set(vxlan_links(self.netns))
        add = [n for n in desired if n in present and (n not in ports or n in rebind)]
        self._ports_txn(view, [], add)
        result.changed.extend(f"port {n} re-added on {mesh.name} (device re-created)"
                              for n in rebind if n not in gone)
        self.last = result
        return result

    @staticmethod
    def _describe_removed(name: str, ports: dict[str, PortState],
                          ours: dict[str, LinkState]) -> str:
        what = [w for w, present in (("port", name in ports), ("device", name in ours))
                if present]
        return f"{name} ({' and '.join(what)}: peer gone or stale)"

    def run(self, stop: threading.Event, interval_s: float = SYNC_INTERVAL_S) -> None:
        """``sync_once()`` every ``interval_s`` until ``stop``; failures are logged."""
        last_errors: list[str] = []
        while not stop.is_set():
            try:
                result = self.sync_once()
            except (PeerSyncError, OvsdbError, links.LinkError, OSError) as exc:
                log.error("peersync_failed", error=str(exc))
                self.close()  # a fresh OVSDB view next time
            except Exception:
                log.exception("peersync_crashed")
                self.close()
            else:
                for line in result.removed:
                    log.info("mesh_peer_port_removed", port=line)
                for line in result.created:
                    log.info("mesh_peer_port_created", port=line)
                for line in result.changed:
                    log.info("mesh_peer_port_changed", change=line)
                if result.errors != last_errors:
                    for err in result.errors:
                        log.warning("peersync_problem", problem=err)
                last_errors = result.errors
            stop.wait(interval_s)
        self.close()


def start_thread(cfg: HostConfig, stop: threading.Event,
                 interval_s: float = SYNC_INTERVAL_S) -> threading.Thread:
    """``socknet run``: follow the mesh's peers in a daemon thread."""
    sync = PeerSync(cfg)
    t = threading.Thread(target=sync.run, args=(stop, interval_s), name="socknet-peersync",
                         daemon=True)
    t.start()
    return t


# --------------------------------------------------------------------------- status


def peer_status(cfg: HostConfig, mesh_ports: dict[str, int], *, netns: str | None = None,
                wg_cmd: Sequence[str] | None = ("wg",), now: float | None = None
                ) -> dict[str, Any]:
    """JSON-ready peers of the mesh interface and the mesh port each maps to.

    With ``vxlan: true`` a peer maps to the device the plan gives it; otherwise to
    whichever VXLAN device of this namespace has the peer's mesh address as remote
    (e.g. the lab's manual ``vx-h2``).
    """
    mesh = cfg.bridges.mesh
    now = time.time() if now is None else now
    try:
        reading = read_mesh_cfg(cfg, netns=netns, wg_cmd=wg_cmd)
    except wgpeers.WgError as exc:
        return {"interface": mesh.wg_interface, "managed": mesh.vxlan, "error": str(exc),
                "peers": []}
    plans = plan_peers(reading.peers, reading.local_ip, now, local_key=reading.public_key,
                       wg_interface=mesh.wg_interface, stale_after_s=mesh.stale_after_s)
    try:
        by_remote = {s.remote: n for n, s in sorted(vxlan_links(netns).items())
                     if s.kind == "vxlan" and s.remote}
    except Exception:  # status must not fail on a netlink hiccup
        by_remote = {}
    peers = []
    for p in plans:
        remote = _mesh_address(p.peer)
        if mesh.vxlan:
            port = p.device.name if p.device is not None else None
        else:
            port = by_remote.get(remote) if remote else None
        peers.append({
            "public_key": p.peer.public_key,
            "endpoint": p.peer.endpoint,
            "allowed_ips": list(p.peer.allowed_ips),
            "last_handshake": p.peer.last_handshake,
            "handshake_age_s": None if p.handshake_age_s is None else round(p.handshake_age_s),
            "stale": p.stale,
            "port": port,
            "ofport": mesh_ports.get(port) if port else None,
            "vni": p.device.vni if p.device is not None else None,
            "note": p.reason,
        })
    return {"interface": reading.interface, "source": reading.source, "managed": mesh.vxlan,
            "local_ip": reading.local_ip, "public_key": reading.public_key, "peers": peers}


def status_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong, for ``socknet status`` (only where socknet manages the devices)."""
    if not data.get("managed"):
        return []
    if data.get("error"):
        return [f"mesh peers: {data['error']}"]
    return [f"mesh peer {p['public_key']}: live but port {p['port']} is not on the bridge"
            for p in data.get("peers", []) if p["port"] and p["ofport"] is None]


def format_peers(data: dict[str, Any]) -> list[str]:
    managed = "socknet-managed VXLAN ports" if data.get("managed") else "ports made elsewhere"
    if data.get("error"):
        return [f"mesh peers of {data['interface']}: unavailable ({data['error']})"]
    lines = [f"mesh peers of {data['interface']} (read via {data['source']}, local "
             f"{data.get('local_ip') or '?'}, {managed}):"]
    if not data["peers"]:
        lines.append("  none")
    for p in data["peers"]:
        age = "never" if p["handshake_age_s"] is None else f"{p['handshake_age_s']} s ago"
        port = (f"{p['port']} (ofport {p['ofport'] if p['ofport'] is not None else 'none'})"
                if p["port"] else "no port")
        lines.append(f"  {p['public_key']}  endpoint {p['endpoint'] or '-'}  allowed "
                     f"{','.join(p['allowed_ips']) or '-'}  handshake {age}"
                     f"{'  STALE' if p['stale'] else ''}  -> {port}")
        if p.get("note") and not p["stale"]:
            lines.append(f"      {p['note']}")
    return lines


__all__ = [
    "DEVICE_RE", "MeshReading", "PeerPlan", "PeerSync", "PeerSyncError", "SyncResult",
    "VxDevice", "device_name", "format_peers", "pair_vni", "peer_status", "plan_devices",
    "plan_peers", "public_from_private", "read_mesh", "start_thread", "status_problems",
]
