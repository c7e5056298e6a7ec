"""Mesh peers -> one kernel VXLAN device (and mesh port) per live WireGuard peer. Pure.

A WireGuard device is L3 and cannot be an OVS port, so L2 between the hosts'
``mesh`` bridges is carried by kernel VXLAN devices over the WireGuard
addresses, one per peer, each a port of ``mesh`` (``vxlan: true``). This
module decides, from values only:

* :func:`decide_peers` / :func:`wanted_devices`: which devices should exist,
  given the peers, this host's address on the WireGuard interface, this
  host's public key and the time. A peer is live when its latest handshake is
  at most ``stale_after_s`` old (never: not live) and it has an IPv4 /32 among
  its allowed IPs (its mesh address: the VXLAN remote).
* :func:`diff_devices`: what it takes to get from the devices and ports that
  exist (:class:`LinkState`, :class:`PortState`) to those: a
  :class:`PeerChanges`, applied by ``controller.peersync``.

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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEVICE_PREFIX = "vx-"
DEVICE_RE = re.compile(r"^vx-[0-9a-f]{8}$")
VXLAN_PORT = 4789
VXLAN_MTU = 1370  # WireGuard 1420 (1500 - 80) minus VXLAN's 50
# WireGuard re-handshakes at least every 2 minutes while traffic flows
# (REKEY_AFTER_TIME 120 s) and gives up on a session after REJECT_AFTER_TIME
# (180 s): a handshake older than that means the peer is gone.
STALE_AFTER_S = 180.0


@dataclass(frozen=True)
class WgPeer:
    """One peer of a WireGuard device, as ``controller.wgpeers`` reads it."""

    public_key: str  # base64, as `wg` prints it
    endpoint: str | None = None  # "192.0.2.2:51821", "[2001:db8::1]:51821" or None
    allowed_ips: tuple[str, ...] = ()  # CIDRs in the device's order
    last_handshake: int | None = None  # epoch seconds; None: never
    rx_bytes: int = 0
    tx_bytes: int = 0

    def handshake_age(self, now: float | None = None) -> float | None:
        """Seconds since the last handshake (None if there never was one); ``now``
        defaults to the clock, the plan always passes it."""
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

    @property
    def mesh_address(self) -> str | None:
        """The first IPv4 host address among ``allowed_ips``: the VXLAN remote."""
        for addr in self.host_addresses:
            if ipaddress.ip_address(addr).version == 4:
                return addr
        return None


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


# --------------------------------------------------------------------------- which devices


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
class PeerDecision:
    """A peer and what it gets: a device, or why not (``reason``)."""

    peer: WgPeer
    device: VxDevice | None
    reason: str | None = None
    handshake_age_s: float | None = None
    stale: bool = False


def decide_peers(peers: Iterable[WgPeer], local_ip: str | None, now: float, *,
                 local_key: str | None, wg_interface: str = "netmaker",
                 stale_after_s: float = STALE_AFTER_S) -> list[PeerDecision]:
    """Every peer with its device or the reason it gets none, ordered by public key."""
    out: list[PeerDecision] = []
    vnis: dict[int, str] = {}
    names: dict[str, str] = {}
    for peer in sorted(peers, key=lambda p: p.public_key):
        age = peer.handshake_age(now)
        stale = peer.is_stale(now, stale_after_s)

        def skip(reason: str, p: WgPeer = peer, a: float | None = age,
                 s: bool = stale) -> None:
            out.append(PeerDecision(p, None, reason, a, s))

        remote = peer.mesh_address
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
                out.append(PeerDecision(peer, VxDevice(name, vni, remote, local_ip,
                                                       wg_interface, peer.public_key),
                                        None, age, stale))
    return out


def wanted_devices(peers: Iterable[WgPeer], local_ip: str | None, now: float, *,
                   local_key: str | None, wg_interface: str = "netmaker",
                   stale_after_s: float = STALE_AFTER_S) -> frozenset[VxDevice]:
    """The per-peer devices that should exist (see :func:`decide_peers`)."""
    return frozenset(p.device for p in decide_peers(
        peers, local_ip, now, local_key=local_key, wg_interface=wg_interface,
        stale_after_s=stale_after_s) if p.device is not None)


# --------------------------------------------------------------------------- what exists


@dataclass(frozen=True)
class LinkState:
    """A network device as the kernel has it (the VXLAN attributes when it is one)."""

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


@dataclass(frozen=True)
class PortState:
    """A port of the mesh bridge as OVSDB has it (its same-named interface)."""

    name: str
    ofport: int | None
    ifindex: int | None
    error: str | None


def is_ours(name: str) -> bool:
    """True for a name socknet's per-peer devices can have (``vx-`` + 8 hex digits)."""
    return DEVICE_RE.match(name) is not None


# --------------------------------------------------------------------------- the changes


@dataclass(frozen=True)
class DeviceFix:
    """MTU and up state of an otherwise right device."""

    name: str
    index: int
    mtu: int | None  # set this MTU; None: it is right
    up: bool  # set the device up
    describe: tuple[str, ...]


@dataclass(frozen=True)
class PeerChanges:
    """What makes the devices and mesh ports equal to the wanted devices, in this order:
    ``unplug`` ports, ``delete`` devices of gone peers, delete and make again the
    ``recreate`` devices, ``create`` the missing ones, apply ``fixes``, then plug the
    ports :meth:`ports_to_add` names."""

    wanted: Mapping[str, VxDevice]  # by device name
    ports: Mapping[str, PortState]  # our ports as they were
    unplug: tuple[str, ...]  # ports of gone peers, and ports to re-add afresh
    gone: tuple[str, ...]  # names whose device and/or port goes
    delete: tuple[str, ...]  # devices of gone peers
    recreate: tuple[str, ...]  # wrong shape: deleted, then made again
    create: tuple[str, ...]
    rebind: tuple[str, ...]  # ports bound to an older device of that name: re-added
    fixes: tuple[DeviceFix, ...]
    removed: tuple[str, ...]  # what goes, in words
    problems: tuple[str, ...]

    def ports_to_add(self, present: Iterable[str]) -> list[str]:
        """The ports to plug once the devices are made, given the devices ``present``
        (one that could not be made gets no port)."""
        have = set(present)
        return [n for n in self.wanted
                if n in have and (n not in self.ports or n in self.rebind)]


def matches(state: LinkState, dev: VxDevice, dev_index: int | None) -> bool:
    """True if ``state`` is ``dev`` as it should be (over the device ``dev_index``)."""
    return (state.kind == "vxlan" and state.vni == dev.vni and state.remote == dev.remote
            and state.local == dev.local and state.port == dev.port
            and state.link == dev_index and not state.learning)


def device_fix(state: LinkState, dev: VxDevice) -> DeviceFix | None:
    """What is left to set on a device that otherwise :func:`matches`; None: nothing."""
    describe = []
    if state.mtu != dev.mtu:
        describe.append(f"{dev.name}: MTU {state.mtu} -> {dev.mtu}")
    if not state.up:
        describe.append(f"{dev.name}: set up")
    if not describe:
        return None
    return DeviceFix(dev.name, state.index, dev.mtu if state.mtu != dev.mtu else None,
                     not state.up, tuple(describe))


def diff_devices(decisions: Iterable[PeerDecision], links: Mapping[str, LinkState],
                 ports: Mapping[str, PortState], wg_index: int | None) -> PeerChanges:
    """From the devices (``links``: at least every VXLAN device and every device with
    our name shape) and our mesh ports that exist to the decided ones.

    On the netdev datapath ovs-vswitchd keeps a port whose device was deleted (same
    ofport, stale ifindex) and does not re-bind when a device of the same name comes
    back: a re-made device's port is unplugged before it is plugged again, and so is
    a port whose OVSDB ``ifindex`` is not its device's.
    """
    wanted = {d.device.name: d.device for d in decisions if d.device is not None}
    problems = []
    for name, state in sorted(links.items()):
        if is_ours(name) and state.kind != "vxlan" and name in wanted:
            problems.append(f"{name} exists but is a {state.kind or 'plain'} device, "
                            "not VXLAN: left alone")
            del wanted[name]
    ours = {n: s for n, s in links.items() if is_ours(n) and s.kind == "vxlan"}
    ports = {n: p for n, p in ports.items() if is_ours(n)}
    gone = sorted((set(ours) | set(ports)) - set(wanted))
    recreate = sorted(n for n, d in wanted.items()
                      if n in ours and not matches(ours[n], d, wg_index))
    create = sorted(n for n in wanted if n not in ours)
    rebind = sorted(n for n in wanted if n in ports
                    and (n in recreate or n in create
                         or ports[n].ifindex not in (None, 0, ours[n].index)))
    fixes = [device_fix(ours[n], d) for n, d in sorted(wanted.items())
             if n in ours and n not in recreate]
    removed = []
    for name in gone:
        what = [w for w, present in (("port", name in ports), ("device", name in ours))
                if present]
        removed.append(f"{name} ({' and '.join(what)}: peer gone or stale)")
    return PeerChanges(
        wanted=wanted, ports=ports,
        unplug=tuple(n for n in (*gone, *rebind) if n in ports),
        gone=tuple(gone), delete=tuple(n for n in gone if n in ours),
        recreate=tuple(recreate), create=tuple(create), rebind=tuple(rebind),
        fixes=tuple(f for f in fixes if f is not None),
        removed=tuple(removed), problems=tuple(problems),
    )
