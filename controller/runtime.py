"""The controller's shell: discover (OVSDB, OpenFlow), diff, send.

All decisions come from `topology.flows.desired_state`; this module only keeps
track of what is connected and what is installed, and runs one reconcile
worker thread so a slow switch never blocks os-ken's event loop.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller import encode
from controller.early import EarlyPackets
from controller.logs import LogBudget, get_logger
from controller.reconcile import plan
from controller.switch import SwitchError, SwitchSession
from topology.addresses import Declarations, Refusal, declarations, learn_refusal
from topology.config import HostConfig
from topology.flows import (
    Binding,
    BoundPort,
    DesiredState,
    binding_of,
    desired_state,
    is_declared,
    local_service_ips,
    service_arp_flow,
    service_port_l2_flow,
)
from topology.model import LEARNED_COOKIE, OWNED_COOKIE_MASK, Flow, Owner, cookie_owner
from topology.openflow import ETH_ARP, ETH_IPV4, IP_PROTO_NAMES
from topology.pipeline import (
    MESH_PIPELINE,
    METER_RATES,
    REG_OUT,
    SOCKET_PIPELINE,
    check_against_pipeline,
)
from topology.policy import Policy
from topology.pve import Guests
from topology.roles import Role, classify_port, no_role_reason

log = get_logger("socknet.runtime")
REMOTE_TTL_S = 300.0  # a remote host not heard from (ARP) for this long is forgotten


def discovered_from_flows(installed: list[Any]) -> tuple[dict[int, Binding], dict[str, str]]:
    """Learned container addresses (by ofport) and remote hosts (IPv4 -> MAC) encoded in
    the DISCOVERED flows read from the switch."""
    bindings: dict[int, Binding] = {}
    remote: dict[str, str] = {}
    for f in installed:
        if cookie_owner(f.cookie) is not Owner.DISCOVERED:
            continue
        match = f.flow_stats.match
        if f.table == SOCKET_PIPELINE["spoof_guard"] and "ipv4_src" in match:
            bindings[int(match["in_port"])] = Binding(str(match["eth_src"]),
                                                      str(match["ipv4_src"]))
        elif (f.table == SOCKET_PIPELINE["dispatch"] and "arp_tpa" in match
              and "in_port" not in match):  # not a container's own-GARP pass-through
            mac = encode.set_field_value(f.flow_stats, "eth_src")
            if mac is not None:
                remote[str(match["arp_tpa"])] = str(mac)
    return bindings, remote


def gratuitous_arp(mac: str, ip: str) -> bytes:
    from os_ken.lib.packet import arp, ethernet, packet

    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src=mac, ethertype=ETH_ARP))
    # an unsolicited ARP *reply* (arping -A): no host answers it, every host takes note
    pkt.add_protocol(arp.arp(opcode=arp.ARP_REPLY, src_mac=mac, src_ip=ip,
                             dst_mac="ff:ff:ff:ff:ff:ff", dst_ip=ip))
    pkt.serialize()
    return bytes(pkt.data)


_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def parse_packet(data: bytes) -> dict[str, Any]:
    """The few header fields the learning path and the deny log need (Ethernet, one
    optional 802.1Q tag, ARP, IPv4, TCP/UDP ports). A truncated or odd frame gives
    what could be read."""
    out: dict[str, Any] = {}
    if len(data) < _ETH.size:
        return out
    _, src, ethertype = _ETH.unpack_from(data)
    off = _ETH.size
    if ethertype == 0x8100 and len(data) >= off + 4:
        (ethertype,) = struct.unpack_from("!H", data, off + 2)
        off += 4
    out["eth_src"] = _mac(src)
    if ethertype == ETH_ARP and len(data) >= off + _ARP.size:
        htype, ptype, hlen, plen, _, sha, spa, _, _ = _ARP.unpack_from(data, off)
        if (htype, ptype, hlen, plen) == (1, ETH_IPV4, 6, 4) and sha == src and any(spa):
            out["sender_ip"] = socket.inet_ntoa(spa)
    elif ethertype == ETH_IPV4 and len(data) >= off + 20:
        ihl = (data[off] & 0x0F) * 4
        proto = data[off + 9]
        ip_src, ip_dst = socket.inet_ntoa(data[off + 12:off + 16]), socket.inet_ntoa(
            data[off + 16:off + 20])
        out.update(ipv4_src=ip_src, ipv4_dst=ip_dst, proto=IP_PROTO_NAMES.get(proto, str(proto)))
        if ip_src != "0.0.0.0":
            out["sender_ip"] = ip_src
        frag_offset = struct.unpack_from("!H", data, off + 6)[0] & 0x1FFF
        l4 = off + ihl
        if proto in (6, 17) and not frag_offset and ihl >= 20 and len(data) >= l4 + 4:
            out["dst_port"] = struct.unpack_from("!H", data, l4 + 2)[0]
    return out


def port_changes(old: dict[str, dict[str, int]], new: dict[str, dict[str, int]]
                 ) -> list[tuple[str, str, int, bool]]:
    """(bridge, port, ofport, added) for every port that came or went between two OVSDB
    views; a port whose OpenFlow number changed went and came."""
    out = []
    for bridge in sorted({*old, *new}):
        before, after = old.get(bridge, {}), new.get(bridge, {})
        out += [(bridge, n, o, False) for n, o in sorted(before.items()) if after.get(n) != o]
        out += [(bridge, n, o, True) for n, o in sorted(after.items()) if before.get(n) != o]
    return out


def _ethertype(data: bytes) -> int | None:
    """The frame's EtherType (inside one 802.1Q tag), None if too short."""
    if len(data) < 14:
        return None
    (kind,) = struct.unpack_from("!H", data, 12)
    if kind == 0x8100 and len(data) >= 18:
        (kind,) = struct.unpack_from("!H", data, 16)
    return int(kind)


def _remote_flow(ip: str, mac: str) -> Flow:
    """A remote host's ARP responder, checked against the pipeline on its own (it joins a
    desired state that was checked whole)."""
    f = service_arp_flow(ip, mac)
    check_against_pipeline(SOCKET_PIPELINE, f)
    return f


@dataclass
class Stats:
    """Counters the tests, `status` and the metrics endpoint read."""

    flow_mods: int = 0
    bundles: int = 0
    reconciles: int = 0
    noop_reconciles: int = 0
    errors: int = 0
    port_events: int = 0
    packet_ins: int = 0
    policy_generation: int = 0
    reloads_ok: int = 0
    reloads_refused: int = 0
    last_reload_ms: float = 0.0
    denied_logged: int = 0
    remote_learned: int = 0  # remote hosts learned or moved (from mesh ARP)
    dropped_logged: int = 0  # `dropped` events (copies of dropped packets, metered)
    # learned addresses refused, by kind (duplicate, policy-named, not-declared, ...)
    bindings_refused: dict[str, int] = field(default_factory=dict)
    pve_reads: int = 0  # guest config sets applied (changes and SIGHUPs)
    last_reconcile: dict[str, float] = field(default_factory=dict)


class Controller:
    def __init__(self, cfg: HostConfig, audit_interval_s: float = 30.0,
                 policy: Policy | None = None, policy_pending: bool = False,
                 guests: Guests | None = None, guests_pending: bool = False) -> None:
        self.cfg = cfg
        self.policy = policy
        # the container addresses the authorities declare (host.yaml, Proxmox's configs)
        self.guests = guests or Guests()
        # True until Proxmox's guest configs were read once (`set_guests`): nothing is
        # reconciled before, so no switch loses a container's flows to a late read
        self.guests_pending = guests_pending
        self.declared: Declarations = declarations(cfg, self.guests.nics)
        self._refusals_logged: set[tuple[str, str, str | None]] = set()
        # True until the configured policy is loaded: nothing is reconciled before (the
        # switches keep their flows), so no switch ever runs without its policy.
        self.policy_pending = policy_pending
        self.bindings: dict[str, Binding] = {}  # learned container addresses, by port name
        # remote service hosts learned from ARP across the mesh: IPv4 -> (MAC, last heard)
        self.remote: dict[str, tuple[str, float]] = {}
        self.remote_ttl_s = REMOTE_TTL_S
        self.stats = Stats()
        if policy is not None:
            self.stats.policy_generation = 1
        self.audit_interval_s = audit_interval_s
        self._sessions: dict[int, SwitchSession] = {}  # by datapath id
        self._ports: dict[str, dict[str, int]] | None = None
        self._dpids: dict[str, int] = {}
        # desired state = the base (config, ports, policy, bindings) plus one ARP responder
        # per remote host, kept apart so a new remote host is an O(1) change (hot path)
        self._base: DesiredState | None = None
        self._remote_flows: dict[str, Flow] = {}
        self._local_ips: frozenset[str] = frozenset()
        self._generation = 0  # bumped by every change of the desired state
        self._desired_cache: tuple[int, DesiredState | None] = (-1, None)
        self._announced: set[tuple[str, int]] = set()
        self._learn_log = LogBudget()  # remote_host_learned lines: a flood is summarised
        # `dropped` lines, a budget per (port, reason): one noisy port cannot hide another
        self._drop_logs: dict[tuple[str, str], LogBudget] = {}
        self._early = EarlyPackets()  # first packets of ports not in OVSDB yet, by in_port
        self._lock = threading.Lock()
        self._work: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.on_reconciled: Callable[[str, int], None] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for target, name in ((self._worker, "reconcile"), (self._auditor, "audit")):
            t = threading.Thread(target=target, name=f"socknet-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)

    # ------------------------------------------------------------ inputs
    def switch_connected(self, datapath: Any) -> None:
        with self._lock:
            bridge = self._bridge_of(datapath.id) or f"dpid:{datapath.id:016x}"
            self._sessions[datapath.id] = SwitchSession(datapath, bridge)
        log.info("switch_connected", dpid=f"{datapath.id:016x}", bridge=bridge)
        self._work.put(datapath.id)

    def switch_disconnected(self, datapath: Any) -> None:
        with self._lock:
            session = self._sessions.pop(datapath.id, None)
        if session is not None:
            session.close()
            log.info("switch_disconnected", bridge=session.bridge)

    def session(self, dpid: int) -> SwitchSession | None:
        return self._sessions.get(dpid)

    def mesh_uplinks(self) -> int:
        """Mesh uplink ports in OVSDB now (peers up, when socknet manages them)."""
        mesh = self.cfg.bridges.mesh.name
        with self._lock:
            names = list((self._ports or {}).get(mesh, {}))
        return sum(1 for n in names
                   if classify_port(self.cfg, mesh, n).role is Role.MESH_UPLINK)

    def session_for(self, bridge: str) -> SwitchSession | None:
        dpid = self._dpids.get(bridge)
        return self._sessions.get(dpid) if dpid is not None else None

    def ovsdb_changed(self, ports: dict[str, dict[str, int]], dpids: dict[str, int]) -> None:
        """New view of bridges and ports from OVSDB: recompute, reconcile what changed."""
        with self._lock:
            old_ports = self._ports or {}
            self._ports = {b: dict(p) for b, p in ports.items()}
            self._dpids = dict(dpids)
            early = self._take_early(old_ports)
            present = set(self._ports.get(self.cfg.bridges.socket.name, {}))
            for name in set(self.bindings) - present:
                log.info("binding_forgotten", port=name, **vars(self.bindings.pop(name)))
            self._refusals_logged = {r for r in self._refusals_logged if r[0] in present}
            self._recompute()
            for dpid, session in self._sessions.items():
                session.bridge = self._bridge_of(dpid) or session.bridge
            removed = {
                b: {ofport for name, ofport in old.items() if ports.get(b, {}).get(name) != ofport}
                for b, old in old_ports.items()
            }
        self.stats.port_events += 1
        self._log_port_changes(old_ports, ports)
        self._learn_early(early)
        for bridge, ofports in removed.items():
            if ofports:
                self._forget_learned(bridge, ofports)
        for dpid in list(self._sessions):
            self._work.put(dpid)

    def _log_port_changes(self, old: dict[str, dict[str, int]],
                          new: dict[str, dict[str, int]]) -> None:
        """One line per port that came or went, with its role and container; a port
        with no role is a warning (everything it sends is dropped)."""
        for bridge, name, ofport, added in port_changes(old, new):
            role = classify_port(self.cfg, bridge, name)
            fields: dict[str, Any] = dict(bridge=bridge, port=name, ofport=ofport,
                                          role=role.role.value, container=role.vmid)
            if not added:
                for key in list(self._drop_logs):  # a snapshot: packet-ins add keys
                    if key[0] == name:
                        self._drop_logs.pop(key, None)
                log.info("port_removed", **fields)
            elif role.role is Role.UNKNOWN:
                log.warning("port_added", **fields, dropped=no_role_reason(self.cfg, bridge,
                                                                             name))
            else:
                log.info("port_added", **fields)

    def set_policy(self, policy: Policy | None) -> None:
        """Install a policy that has already been validated and tested."""
        with self._lock:
            self.policy = policy
            self.policy_pending = False
            self.stats.policy_generation += 1
            self._revoke_learned()  # an address the new policy names is no longer learnable
            if self._ports is not None:
                self._recompute()
        self._kick_all()

    def set_guests(self, guests: Guests, reason: str) -> None:
        """New guest configs read from Proxmox (a change seen by polling, or SIGHUP)."""
        with self._lock:
            old = self.declared
            self.guests = guests
            self.declared = declarations(self.cfg, guests.nics)
            changed = self.declared != old or self.guests_pending
            self.guests_pending = False
            self.stats.pve_reads += 1
            if changed:
                self._revoke_learned()
                if self._ports is not None:
                    self._recompute()
        for problem in guests.problems:
            log.warning("pve_problem", problem=problem)
        self.log_conflicts()
        log.info("pve_read", reason=reason, interfaces=len(self.declared.nics),
                 changed=changed, conflicts=len(self.declared.conflicts))
        if changed:
            self._kick_all()

    def log_conflicts(self) -> None:
        """One line per address declared for more than one interface (refused to all)."""
        for c in self.declared.conflicts:
            log.error("address_conflict", field=c.field, value=c.value, sources=list(c.sources),
                      action="refused to every interface declaring it")

    def learn_binding(self, port_name: str, binding: Binding) -> bool:
        """A container's addresses, learned once from its first packet, with
        ``addresses: learn-first-packet`` only. Refused (`learn_refusal`): what another
        interface declared or learned, what differs from this port's declaration, what the
        policy names (a tier, an external, a rule's CIDR) unless declared for this port."""
        if not self.cfg.learning:
            return False
        with self._lock:
            if port_name in self.bindings:
                return False
            refusal = learn_refusal(self.declared, port_name, binding, self.bindings,
                                    self.policy)
            if refusal is None:
                self.bindings[port_name] = binding
                if self._ports is not None:
                    self._recompute()
        if refusal is not None:
            self._refused(port_name, binding, refusal)
            return False
        log.info("binding_learned", port=port_name, mac=binding.mac, ip=binding.ip)
        self._kick_all()
        return True

    def _refused(self, port: str, binding: Binding, refusal: Refusal) -> None:
        """Counted every time; logged once per port and sender (the container keeps sending
        and every packet comes up again, metered)."""
        counts = self.stats.bindings_refused
        counts[refusal.kind] = counts.get(refusal.kind, 0) + 1
        key = (port, binding.mac, binding.ip)
        if key not in self._refusals_logged:
            self._refusals_logged.add(key)
            log.warning("binding_refused", port=port, mac=binding.mac, ip=binding.ip,
                        kind=refusal.kind, reason=refusal.reason)

    def _revoke_learned(self) -> None:
        """Caller holds the lock. Learned bindings that would be refused now (learning
        turned off, a new declaration, a new policy) are forgotten: their port's flows go
        back to 'no IPv4 bound'."""
        for name, b in list(self.bindings.items()):
            others = {n: x for n, x in self.bindings.items() if n != name}
            refusal = (Refusal("learning-off", "addresses: declared")
                       if not self.cfg.learning else
                       learn_refusal(self.declared, name, b, others, self.policy))
            if refusal is not None:
                del self.bindings[name]
                log.warning("binding_revoked", port=name, mac=b.mac, ip=b.ip,
                            kind=refusal.kind, reason=refusal.reason)

    # ------------------------------------------------------------ internals
    def _recompute(self) -> None:
        """Caller holds the lock. Equal to ``desired_state(..., remote)``, built as its base
        plus the remote hosts' flows (tests/test_remote_learning.py checks that)."""
        assert self._ports is not None
        base = desired_state(self.cfg, self._ports, self.policy, self.bindings, {},
                             self.declared)
        self._local_ips = local_service_ips(
            self.cfg, self._ports.get(self.cfg.bridges.socket.name, {}), self.bindings,
            self.declared)
        self._base = base
        self._remote_flows = {ip: _remote_flow(ip, mac) for ip, (mac, _) in self.remote.items()
                              if ip not in self._local_ips}
        self._generation += 1

    @property
    def _desired(self) -> DesiredState | None:
        """The whole desired state (base + remote hosts' flows), rebuilt once per change."""
        gen, cached = self._desired_cache
        if gen != self._generation:
            base, sock = self._base, self.cfg.bridges.socket.name
            cached = base
            if base is not None and self._remote_flows and sock in base:
                cached = {**base, sock: base[sock] | frozenset(self._remote_flows.values())}
            self._desired_cache = (self._generation, cached)
        return cached

    @_desired.setter
    def _desired(self, state: DesiredState | None) -> None:
        """Set the whole desired state as given (benchmarks drive the shell with it)."""
        self._base, self._remote_flows = state, {}
        self._generation += 1

    def _kick_all(self) -> None:
        for dpid in list(self._sessions):
            self._work.put(dpid)

    def _bridge_of(self, dpid: int) -> str | None:
        for bridge, d in self._dpids.items():
            if d == dpid:
                return bridge
        return None

    def _worker(self) -> None:
        while not self._stop.is_set():
            dpid = self._work.get()
            if dpid is None:
                return
            pending = {dpid}
            while True:  # coalesce a burst of requests into one pass per switch
                try:
                    more = self._work.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                pending.add(more)
            for d in pending:
                try:
                    self.reconcile(d)
                except SwitchError as exc:
                    self.stats.errors += 1
                    session = self._sessions.get(d)
                    if session is not None:
                        session.installed = None  # re-read before the next try
                    log.error("reconcile_failed", error=str(exc))
                except Exception:
                    self.stats.errors += 1
                    log.exception("reconcile_crashed")

    def _auditor(self) -> None:
        """Re-read every switch now and then: someone may have touched the flows."""
        while not self._stop.wait(self.audit_interval_s):
            self.forget_remote("aged out", older_than=time.monotonic() - self.remote_ttl_s)
            for dpid, session in list(self._sessions.items()):
                session.installed = None
                self._work.put(dpid)

    def reconcile(self, dpid: int) -> int:
        """Bring one switch to the desired state. Returns the number of flow-mods sent."""
        with self._lock:
            session = self._sessions.get(dpid)
            desired = self._desired
            bridge = self._bridge_of(dpid)
        if self.policy_pending or self.guests_pending:
            return 0  # policy or guest configs not read yet: leave the switch as it is
        if session is None or desired is None or bridge is None or bridge not in desired:
            return 0  # not connected, or OVSDB not read yet: try again on the next event
        started = time.monotonic()
        first = session.installed is None
        if first:
            installed = session.flows()
            if bridge == self.cfg.bridges.socket.name:
                self._ensure_meters(session)
                if self._adopt_discovered(bridge, installed):
                    with self._lock:
                        desired = self._desired or desired
            session.installed = {f.cookie for f in installed}
        with self._lock:  # the learning fast path changes both together, under this lock
            desired = self._desired or desired
            want = desired[bridge]
            generation = self._generation
            todo = plan(want, session.installed)
        sent = session.apply(todo)
        with self._lock:
            session.installed = {f.cookie for f in want} | {
                c for c in session.installed if (c & OWNED_COOKIE_MASK) == LEARNED_COOKIE
            }
            moved_on = self._generation != generation
        if moved_on:  # changed while this bundle was on its way: one more pass
            self._work.put(dpid)
        self.stats.reconciles += 1
        self.stats.flow_mods += sent
        self.stats.bundles += 1 if sent else 0
        if not sent:
            self.stats.noop_reconciles += 1
        self.stats.last_reconcile[bridge] = time.time()
        log.info(
            "reconciled",
            bridge=bridge,
            read_from_switch=first,
            desired=len(want),
            added=len(todo.add),
            deleted=len(todo.delete_cookies) + len(todo.purge_cookies),
            flow_mods=sent,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        if bridge == self.cfg.bridges.socket.name:
            self._announce_new_containers(session)
        if self.on_reconciled is not None:
            self.on_reconciled(bridge, sent)
        return sent

    # ------------------------------------------------------------ announcements
    def _announce_new_containers(self, session: SwitchSession) -> None:
        """A gratuitous ARP for each service container that just appeared, sent through the
        pipeline as if from its port: every host on the mesh learns where it is now (a
        container that moved hosts is reachable again at once)."""
        with self._lock:
            ports = dict((self._ports or {}).get(session.bridge, {}))
        current = set(ports.items())
        new = current - self._announced
        self._announced = current
        for name, ofport in sorted(new):
            port = BoundPort(name, ofport, classify_port(self.cfg, session.bridge, name))
            if port.role.role is not Role.SERVICE:
                continue
            binding = binding_of(self.declared, port, self.bindings)
            if binding is None or binding.ip is None:
                # not declared, not learned yet: announce it once its first packet taught
                # us its addresses (a container that moved here undeclared)
                self._announced.discard((name, ofport))
                continue
            declared = is_declared(self.declared, port, binding)
            if service_port_l2_flow(port, binding, declared).cookie not in (
                    session.installed or set()):
                # learned while this bundle was on its way (its first packet came before
                # its port's flows): the switch would drop the announcement as a spoof.
                # The next pass, which installs them, announces it.
                self._announced.discard((name, ofport))
                continue
            try:
                session.send([encode.packet_out_through_pipeline(
                    session.dp, ofport, gratuitous_arp(binding.mac, binding.ip))])
                log.info("announced", port=name, mac=binding.mac, ip=binding.ip)
            except SwitchError as exc:
                log.error("announce_failed", port=name, error=str(exc))

    # ------------------------------------------------------------ packet-ins
    def packet_in(self, dpid: int, msg: Any) -> None:
        """Packets the pipeline sent up: address learning (spoof_guard) or deny logs."""
        self.stats.packet_ins += 1
        bridge = self._bridge_of(dpid)
        if bridge != self.cfg.bridges.socket.name:
            return
        try:
            in_port = int(msg.match["in_port"])
        except (KeyError, TypeError):
            return
        pkt = parse_packet(msg.data)
        if self._dropped(bridge, msg.table_id, in_port, msg.data, pkt):
            return
        if msg.table_id == SOCKET_PIPELINE["classify"]:
            self._early_packet(bridge, in_port, pkt)
        elif msg.table_id == SOCKET_PIPELINE["spoof_guard"]:
            self._learn_from(bridge, in_port, pkt)
        elif msg.table_id == SOCKET_PIPELINE["dispatch"]:
            self._learn_remote(pkt)
        elif msg.table_id == SOCKET_PIPELINE["policy_deny"]:
            self._log_denied(msg, in_port, pkt)

    def _dropped(self, bridge: str, table: int, in_port: int, data: bytes,
                 pkt: dict[str, Any]) -> bool:
        """A copy of a packet a drop flow dropped (topology.drops): a `dropped` line naming
        port, container and reason, within a budget per port and reason. False: not such a
        copy (an early packet, or one to learn from), for the caller to handle."""
        p = SOCKET_PIPELINE
        if table not in (p["classify"], p["spoof_guard"]):
            return False
        with self._lock:
            name = self._port_name(bridge, in_port)
        if name is None:
            return False  # not in OVSDB yet: an early packet
        role = classify_port(self.cfg, bridge, name)
        if table == p["classify"]:
            if role.role is not Role.UNKNOWN:
                return False  # a container port whose flows are on their way
            reason, why = "no_role", no_role_reason(self.cfg, bridge, name)
        else:
            if self._learnable(name):
                return False  # the learning flow's copy
            bound = binding_of(self.declared, BoundPort(name, in_port, role), self.bindings)
            if bound is not None and pkt.get("eth_src") == bound.mac and (
                    bound.ip is None or pkt.get("sender_ip") == bound.ip):
                return True  # its own addresses: the learning flow, before its replacement
            reason = "spoofed_source"
            why = (f"its own: {bound.mac} {bound.ip or ''}".strip() if bound is not None
                   else "its addresses are not known yet")
        budget = self._drop_logs.setdefault((name, reason), LogBudget(per_second=1.0, burst=5))
        logged, skipped = budget.take()
        if logged:
            self.stats.dropped_logged += 1
            ethertype = _ethertype(data)
            log.warning("dropped", reason=reason, bridge=bridge, port=name, in_port=in_port,
                        role=role.role.value, container=role.vmid, why=why,
                        eth_src=pkt.get("eth_src"), ip=pkt.get("sender_ip"),
                        ethertype=f"0x{ethertype:04x}" if ethertype is not None else None,
                        **({"not_logged_before": skipped} if skipped else {}))
        return True

    def _early_packet(self, bridge: str, in_port: int, pkt: dict[str, Any]) -> None:
        """A packet from a port without flows (classify's default drop sent a copy): kept
        by in_port if the port is not in OVSDB yet, learned at once if it is a container
        port whose flows are still on their way."""
        mac, ip = pkt.get("eth_src"), pkt.get("sender_ip")
        if not mac or not ip:
            return
        with self._lock:  # atomic with ovsdb_changed's update of the ports + _take_early
            name = self._port_name(bridge, in_port)
            if name is None:
                self._early.add(in_port, Binding(mac, ip))
                log.debug("early_packet_kept", in_port=in_port, mac=mac, ip=ip)
                return
        if self._learnable(name):
            self.learn_binding(name, Binding(mac, ip))

    def _port_name(self, bridge: str, ofport: int) -> str | None:
        """Caller holds the lock. The port of ``bridge`` with that OpenFlow number."""
        return next((n for n, o in (self._ports or {}).get(bridge, {}).items() if o == ofport),
                    None)

    def _learnable(self, name: str) -> bool:
        """With learn-first-packet, a container port on vmbr0 that has no IPv4 bound yet
        (not declared, not learned) and whose declaration was not refused."""
        if not self.cfg.learning:
            return False
        role = classify_port(self.cfg, self.cfg.bridges.socket.name, name)
        d = self.declared.of_port(name)
        return (role.role in (Role.SERVICE, Role.PRIVACY) and name not in self.bindings
                and (d is None or (d.ipv4 is None and d.refused is None)))

    def _take_early(self, old_ports: dict[str, dict[str, int]]) -> list[tuple[str, Binding]]:
        """Caller holds the lock. Container ports new in OVSDB whose first packets came
        before them (kept by `_early_packet`): port name and the first sender seen."""
        bridge = self.cfg.bridges.socket.name
        before = old_ports.get(bridge, {})
        found = []
        for name, ofport in (self._ports or {}).get(bridge, {}).items():
            if ofport is None or before.get(name) == ofport:
                continue
            senders = self._early.take(ofport)
            if senders and self._learnable(name):
                found.append((name, senders[0]))
        return found

    def _learn_early(self, found: list[tuple[str, Binding]]) -> None:
        for name, binding in found:
            log.info("early_packet_learned", port=name, mac=binding.mac, ip=binding.ip)
            self.learn_binding(name, binding)

    def _learn_from(self, bridge: str, in_port: int, pkt: dict[str, Any]) -> None:
        with self._lock:
            name = self._port_name(bridge, in_port)
        if name is None or not pkt.get("eth_src") or not pkt.get("sender_ip"):
            return
        self.learn_binding(name, Binding(pkt["eth_src"], pkt["sender_ip"]))

    def _learn_remote(self, pkt: dict[str, Any]) -> None:
        """An ARP from across the mesh tells where a remote host is: remember its MAC so
        local containers' ARP for it is answered here (no broadcast over the mesh)."""
        ip, mac = pkt.get("sender_ip"), pkt.get("eth_src")
        if not ip or not mac or pkt.get("ipv4_src"):
            return  # only ARP senders are learned
        now = time.monotonic()
        with self._lock:
            old = self.remote.get(ip)
            self.remote[ip] = (mac, now)
            if old is not None and old[0] == mac:
                return
            fast = self._remote_flow_update(ip, mac)
            if fast is None and self._ports is not None:
                self._recompute()
        if fast is None:
            self._kick_all()
        else:
            session, add = fast
            # One flow-mod is atomic by itself. xid 0: nothing waits for its reply; an
            # error comes back as an OpenFlow error (logged) and the audit repairs.
            if session.dp.send(encode.raw_flow_mod_add(session.dp, add, 0)) is False:
                session.installed = None  # not sent (connection gone): re-read on reconnect
            else:
                session.flow_mods_sent += 1
                self.stats.flow_mods += 1
        self.stats.remote_learned += 1
        logged, skipped = self._learn_log.take()
        if logged:
            log.info("remote_host_learned", ip=ip, mac=mac, moved_from=old[0] if old else None,
                     **({"not_logged_before": skipped} if skipped else {}))

    def _remote_flow_update(self, ip: str, mac: str) -> tuple[SwitchSession, Flow] | None:
        """One new or moved remote host changes exactly one flow (its ARP responder): put
        it into the desired state and the installed set, and hand it back to be sent as one
        flow-mod, instead of recomputing and diffing every flow per ARP (a remote host
        learned is the hot path of packet-ins). None: take the full path. Holds the lock."""
        bridge = self.cfg.bridges.socket.name
        session = self.session_for(bridge)
        if (self._base is None or bridge not in self._base or session is None
                or session.installed is None or self.policy_pending or self.guests_pending
                or ip in self._local_ips):
            return None
        new = _remote_flow(ip, mac)
        stale = self._remote_flows.get(ip)
        if stale is not None:
            session.installed.discard(stale.cookie)  # the ADD replaces it in place (same match)
        self._remote_flows[ip] = new
        self._generation += 1
        session.installed.add(new.cookie)
        return session, new

    def forget_remote(self, reason: str, older_than: float | None = None) -> None:
        """Drop remote hosts (all, or those not heard from since ``older_than``)."""
        with self._lock:
            gone = [ip for ip, (_, seen) in self.remote.items()
                    if older_than is None or seen < older_than]
            for ip in gone:
                del self.remote[ip]
            if gone and self._ports is not None:
                self._recompute()
        if gone:
            log.info("remote_hosts_forgotten", reason=reason, hosts=sorted(gone))
            self._kick_all()

    def _adopt_discovered(self, bridge: str, installed: list[Any]) -> bool:
        """After a restart, take back what was learned before it (container addresses,
        remote hosts) from the switch's own flows: the switch is the record, so a restart
        with nothing changed sends nothing and forgets nothing."""
        with self._lock:
            by_ofport = {o: n for n, o in (self._ports or {}).get(bridge, {}).items()}
            found_bindings, found_remote = discovered_from_flows(installed)
            changed = False
            for ofport, binding in found_bindings.items():
                name = by_ofport.get(ofport)
                if name is None or name in self.bindings or not self._learnable(name):
                    continue
                # what the switch remembers is checked like a packet: the policy, the
                # declarations or the mode may have changed while socknet was down
                refusal = learn_refusal(self.declared, name, binding, self.bindings,
                                        self.policy)
                if refusal is not None:
                    log.warning("binding_not_adopted", port=name, mac=binding.mac,
                                ip=binding.ip, kind=refusal.kind, reason=refusal.reason)
                    continue
                self.bindings[name] = binding
                changed = True
            now = time.monotonic()
            for ip, mac in found_remote.items():
                if ip not in self.remote:
                    self.remote[ip] = (mac, now)
                    changed = True
            if changed and self._ports is not None:
                self._recompute()
        if changed:
            log.info("discovered_state_adopted", bridge=bridge, bindings=len(found_bindings),
                     remote_hosts=len(found_remote))
        return changed

    def _log_denied(self, msg: Any, in_port: int, pkt: dict[str, Any]) -> None:
        rule_id = 0
        try:
            rule_id = int(msg.match["reg2"])
        except (KeyError, TypeError, ValueError):
            pass
        rule = self.policy.rule_by_id(rule_id) if self.policy is not None else None
        self.stats.denied_logged += 1
        log.warning("denied", rule=rule.name if rule else "default", rule_id=rule_id,
                    src=pkt.get("ipv4_src"), dst=pkt.get("ipv4_dst"), proto=pkt.get("proto"),
                    port=pkt.get("dst_port"), in_port=in_port)

    def _ensure_meters(self, session: SwitchSession) -> None:
        """Rate limits for packets sent to the controller (logs, learning)."""
        for meter_id, rate in METER_RATES.items():
            err = None
            for command in ("add", "modify"):  # add fails when the meter exists already
                err = session.send_checked(
                    encode.meter_mod(session.dp, meter_id, rate, rate, command=command))
                if err is None:
                    break
            if err is not None:
                log.error("meter_failed", bridge=session.bridge, meter=meter_id,
                          type=err.type, code=err.code)

    def _forget_learned(self, bridge: str, ofports: set[int]) -> None:
        """Drop learned flows that point at ports that are gone (their number may be reused)."""
        dpid = self._dpids.get(bridge)
        session = self._sessions.get(dpid) if dpid is not None else None
        if session is None:
            return
        dp = session.dp
        if bridge == self.cfg.bridges.mesh.name:
            # a peer's uplink is gone: the MACs learned behind it are flooded again, and
            # remote hosts are re-learned from their next ARP
            table = MESH_PIPELINE["mesh_l2"]
            self.forget_remote("mesh uplink removed")
        elif bridge == self.cfg.bridges.socket.name:
            table = SOCKET_PIPELINE["service_l2"]
        else:
            return
        mods = [
            encode.flow_mod_delete_out_port(dp, table, port, LEARNED_COOKIE, OWNED_COOKIE_MASK)
            for port in sorted(ofports)
        ]
        if table == MESH_PIPELINE["mesh_l2"]:
            try:
                session.send(mods)
            except SwitchError as exc:
                log.error("forget_learned_failed", bridge=bridge, error=str(exc))
            return
        try:
            learned = session.flows(SOCKET_PIPELINE["privacy_hosts"], LEARNED_COOKIE,
                                    OWNED_COOKIE_MASK)
            mods += [
                encode.flow_mod_delete_strict(dp, f.flow_stats)
                for f in learned
                if encode.loaded_value(f.flow_stats, REG_OUT) in ofports
            ]
            session.send(mods)
        except SwitchError as exc:
            log.error("forget_learned_failed", bridge=bridge, error=str(exc))
