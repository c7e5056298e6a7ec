"""Keep one kernel VXLAN port on the mesh bridge per live WireGuard peer (``vxlan: true``).

Which devices should exist, their names and VNIs, and what it takes to get
there are decided in :mod:`topology.peers` (pure). This module is the I/O
around it: :class:`PeerSync` reads the peers and this host's key
(controller.wgpeers), this host's address and the ``vx-*`` devices
(controller.links) and the mesh bridge's ports (python-ovs IDL), and applies
the :class:`topology.peers.PeerChanges`: ports of vanished/stale peers are
removed from OVS and their devices deleted; missing devices are created (MTU
1370, learning off, GRO off, up) and added as ports. ``socknet bootstrap``
runs :meth:`PeerSync.sync_once`; ``socknet run`` runs :meth:`PeerSync.run` in
a thread every :data:`SYNC_INTERVAL_S` seconds.

Pitfalls handled here:

* On the netdev datapath ovs-vswitchd keeps a port whose device was deleted
  and does not re-bind when a device of the same name comes back: a port to
  re-add is removed first, and that change applied, before it is added again.
* A peer's handshake only renews while packets flow: an idle mesh without
  ``persistent-keepalive`` (Netmaker sets it) would look stale after 3 minutes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ovs.db.idl

from controller import links, wgpeers
from controller.logs import get_logger
from controller.ovsdb import OvsdbError, OvsdbView
from controller.ovsdb_txn import root_row, transact, wait_applied
from topology.config import HostConfig
from topology.peers import (
    LinkState,
    PeerChanges,
    PeerDecision,
    PortState,
    WgPeer,
    decide_peers,
    diff_devices,
    is_ours,
)

log = get_logger("socknet.peersync")

SYNC_INTERVAL_S = 2.0

Txn = ovs.db.idl.Transaction
COLUMNS: dict[str, list[str]] = {
    "Open_vSwitch": ["bridges", "next_cfg", "cur_cfg"],
    "Bridge": ["name", "ports"],
    "Port": ["name", "interfaces"],
    "Interface": ["name", "type", "ofport", "ifindex", "error"],
}


class PeerSyncError(RuntimeError):
    """A device or port could not be made or removed (the message says which and why)."""


# --------------------------------------------------------------------------- reading the mesh


@dataclass(frozen=True)
class MeshReading:
    interface: str
    source: str  # "netlink", "uapi", "wg-show"
    public_key: str | None  # this host's
    local_ip: str | None  # this host's IPv4 address on the interface
    peers: tuple[WgPeer, ...]


def read_mesh(interface: str, *, sock_dir: str | Path = wgpeers.DEFAULT_SOCK_DIR,
              wg_cmd: Sequence[str] | None = ("wg",), netns: str | None = None,
              use_netlink: bool | None = None) -> MeshReading:
    """Peers, this host's public key and address on ``interface``. WgError if unreadable."""
    local_ip = links.interface_ipv4(interface, netns=netns)
    reading = wgpeers.read_peers(interface, sock_dir=sock_dir, wg_cmd=wg_cmd,
                                 use_netlink=use_netlink, with_key=True, netns=netns)
    return MeshReading(interface, reading.source, reading.public_key, local_ip, reading.peers)


def read_mesh_cfg(cfg: HostConfig, *, netns: str | None = None,
                  wg_cmd: Sequence[str] | None = ("wg",)) -> MeshReading:
    mesh = cfg.bridges.mesh
    return read_mesh(mesh.wg_interface, sock_dir=mesh.wg_sock_dir, wg_cmd=wg_cmd, netns=netns)


def decide(cfg: HostConfig, reading: MeshReading, now: float) -> list[PeerDecision]:
    """:func:`topology.peers.decide_peers` with this host's settings."""
    mesh = cfg.bridges.mesh
    return decide_peers(reading.peers, reading.local_ip, now, local_key=reading.public_key,
                        wg_interface=mesh.wg_interface, stale_after_s=mesh.stale_after_s)


def vxlan_links(netns: str | None = None) -> dict[str, LinkState]:
    """Every VXLAN device of the namespace, and every device with our name shape."""
    return {n: s for n, s in links.link_states(netns=netns).items()
            if s.kind == "vxlan" or is_ours(n)}


# --------------------------------------------------------------------------- OVS ports (IDL)


def _opt(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _bridge(idl: ovs.db.idl.Idl, name: str) -> Any:
    for row in idl.tables["Bridge"].rows.values():
        if row.name == name:
            return row
    return None


def _our_ports(idl: ovs.db.idl.Idl, bridge: str) -> dict[str, PortState]:
    br = _bridge(idl, bridge)
    out = {}
    for port in (p for p in (br.ports if br is not None else []) if p is not None):
        if not is_ours(port.name):
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
    decisions: list[PeerDecision] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[str]:
        return [*self.removed, *self.created, *self.changed]


class PeerSync:
    """Keeps ``vx-*`` devices and ports equal to the decided ones. ``sync_once()``;
    ``run()``."""

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

        def stage(idl: ovs.db.idl.Idl, txn: Txn) -> bool:
            br = _bridge(idl, bridge)
            if br is None:
                raise PeerSyncError(f"bridge {bridge} does not exist (socknet bootstrap)")
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
            root_row(idl).increment("next_cfg")
            return True

        try:
            done = transact(view, stage, comment="socknet peersync", timeout=self.timeout)
            if done is not None:
                wait_applied(view, done.next_cfg, self.timeout, ports=add)
        except OvsdbError as exc:
            raise PeerSyncError(str(exc)) from exc

    # ------------------------------------------------------------ the sync
    def sync_once(self, now: float | None = None) -> SyncResult:
        """Read, decide, apply. Never raises for an unreadable mesh (``errors`` says why,
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
        result.decisions = decide(self.cfg, reading, time.time() if now is None else now)
        wg_index = links.ifindex(mesh.wg_interface, netns=self.netns)
        current = vxlan_links(self.netns)
        view = self._open()
        with view.lock:
            ports = _our_ports(view.idl, mesh.name)
        changes = diff_devices(result.decisions, current, ports, wg_index)
        result.errors.extend(changes.problems)
        self._apply(view, changes, wg_index, result)
        self.last = result
        return result

    def _apply(self, view: OvsdbView, changes: PeerChanges, wg_index: int | None,
               result: SyncResult) -> None:
        mesh = self.cfg.bridges.mesh
        self._ports_txn(view, changes.unplug, [])
        for name in changes.delete:
            links.delete_link(name, netns=self.netns)
        result.removed.extend(changes.removed)
        for name in changes.recreate:
            links.delete_link(name, netns=self.netns)
        for name in [*changes.recreate, *changes.create]:
            if wg_index is None:
                result.errors.append(f"{name}: no interface {mesh.wg_interface}")
                continue
            dev = changes.wanted[name]
            try:
                links.create_vxlan(dev, wg_index, netns=self.netns)
            except links.LinkError as exc:
                result.errors.append(str(exc))
                continue
            result.created.append(f"{name} (peer {dev.public_key}, remote {dev.remote}, "
                                  f"vni {dev.vni})")
        for fix in changes.fixes:
            links.set_link(fix.index, mtu=fix.mtu, up=fix.up, netns=self.netns)
            result.changed.extend(fix.describe)
        self._ports_txn(view, [], changes.ports_to_add(vxlan_links(self.netns)))
        result.changed.extend(f"port {n} re-added on {mesh.name} (device re-created)"
                              for n in changes.rebind)

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


__all__ = [
    "MeshReading", "PeerSync", "PeerSyncError", "SyncResult", "decide", "read_mesh",
    "read_mesh_cfg", "start_thread", "vxlan_links",
]
