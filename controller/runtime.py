"""The controller's shell: discover (OVSDB, OpenFlow), diff, send.

All decisions come from `topology.flows.desired_state`; this module only keeps
track of what is connected and what is installed, and runs one reconcile
worker thread so a slow switch never blocks os-ken's event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller import encode
from controller.logs import get_logger
from controller.reconcile import plan
from controller.switch import SwitchError, SwitchSession
from topology.config import HostConfig
from topology.flows import Binding, BoundPort, DesiredState, binding_of, desired_state
from topology.model import LEARNED_COOKIE, OWNED_COOKIE_MASK, Owner, cookie_owner
from topology.pipeline import MESH_PIPELINE, METER_RATES, REG_OUT, SOCKET_PIPELINE
from topology.policy import Policy
from topology.roles import Role, classify_port

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
        elif f.table == SOCKET_PIPELINE["dispatch"] and "arp_tpa" in match:
            mac = encode.set_field_value(f.flow_stats, "eth_src")
            if mac is not None:
                remote[str(match["arp_tpa"])] = str(mac)
    return bindings, remote


def gratuitous_arp(mac: str, ip: str) -> bytes:
    from os_ken.lib.packet import arp, ethernet, packet

    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src=mac, ethertype=0x0806))
    # an unsolicited ARP *reply* (arping -A): a request for the container's own address
    # would be answered by this host's ARP responder for it and never reach the mesh
    pkt.add_protocol(arp.arp(opcode=arp.ARP_REPLY, src_mac=mac, src_ip=ip,
                             dst_mac="ff:ff:ff:ff:ff:ff", dst_ip=ip))
    pkt.serialize()
    return bytes(pkt.data)


def parse_packet(data: bytes) -> dict[str, Any]:
    """The few header fields the learning path and the deny log need."""
    from os_ken.lib.packet import arp, ethernet, ipv4, packet, tcp, udp

    out: dict[str, Any] = {}
    try:
        pkt = packet.Packet(data)
    except Exception:  # a truncated or odd frame: nothing to learn from it
        return out
    eth = pkt.get_protocol(ethernet.ethernet)
    if eth is None:
        return out
    out["eth_src"] = eth.src
    a = pkt.get_protocol(arp.arp)
    if a is not None and a.src_mac == eth.src and a.src_ip != "0.0.0.0":
        out["sender_ip"] = a.src_ip
    ip = pkt.get_protocol(ipv4.ipv4)
    if ip is not None:
        out.update(ipv4_src=ip.src, ipv4_dst=ip.dst,
                   proto={1: "icmp", 6: "tcp", 17: "udp"}.get(ip.proto, str(ip.proto)))
        if ip.src != "0.0.0.0":
            out["sender_ip"] = ip.src
        l4 = pkt.get_protocol(tcp.tcp) or pkt.get_protocol(udp.udp)
        if l4 is not None:
            out["dst_port"] = l4.dst_port
    return out


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
    last_reconcile: dict[str, float] = field(default_factory=dict)


class Controller:
    def __init__(self, cfg: HostConfig, audit_interval_s: float = 30.0,
                 policy: Policy | None = None, policy_pending: bool = False) -> None:
        self.cfg = cfg
        self.policy = policy
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
        self._desired: DesiredState | None = None
        self._announced: set[tuple[str, int]] = set()
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
            present = set(self._ports.get(self.cfg.bridges.socket.name, {}))
            for name in set(self.bindings) - present:
                log.info("binding_forgotten", port=name, **vars(self.bindings.pop(name)))
            self._recompute()
            for dpid, session in self._sessions.items():
                session.bridge = self._bridge_of(dpid) or session.bridge
            removed = {
                b: {ofport for name, ofport in old.items() if ports.get(b, {}).get(name) != ofport}
                for b, old in old_ports.items()
            }
        self.stats.port_events += 1
        for bridge, ofports in removed.items():
            if ofports:
                log.info("ports_removed", bridge=bridge, ofports=sorted(ofports))
                self._forget_learned(bridge, ofports)
        for dpid in list(self._sessions):
            self._work.put(dpid)

    def set_policy(self, policy: Policy | None) -> None:
        """Install a policy that has already been validated and tested."""
        with self._lock:
            self.policy = policy
            self.policy_pending = False
            self.stats.policy_generation += 1
            if self._ports is not None:
                self._recompute()
        self._kick_all()

    def learn_binding(self, port_name: str, binding: Binding) -> bool:
        """A container's addresses, learned once from its first packet. Refuses addresses
        that another container has declared or learned (a spoofing attempt)."""
        with self._lock:
            if port_name in self.bindings:
                return False
            taken = {b.mac for b in self.bindings.values()} | {
                c.mac for c in self.cfg.containers.values() if c.mac}
            taken_ips = {b.ip for b in self.bindings.values() if b.ip} | {
                str(c.ip.ip) for c in self.cfg.containers.values() if c.ip}
            if binding.mac in taken or (binding.ip and binding.ip in taken_ips):
                log.warning("binding_refused", port=port_name, mac=binding.mac, ip=binding.ip,
                            reason="address already belongs to another container")
                return False
            self.bindings[port_name] = binding
            if self._ports is not None:
                self._recompute()
        log.info("binding_learned", port=port_name, mac=binding.mac, ip=binding.ip)
        self._kick_all()
        return True

    # ------------------------------------------------------------ internals
    def _recompute(self) -> None:
        """Caller holds the lock."""
        assert self._ports is not None
        remote = {ip: mac for ip, (mac, _) in self.remote.items()}
        self._desired = desired_state(self.cfg, self._ports, self.policy, self.bindings, remote)

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
        if self.policy_pending:
            return 0  # the policy is still loading: leave the switch as it is
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
        want = desired[bridge]
        todo = plan(want, session.installed)
        sent = session.apply(todo)
        session.installed = {f.cookie for f in want} | {
            c for c in session.installed if (c & OWNED_COOKIE_MASK) == LEARNED_COOKIE
        }
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
            binding = binding_of(self.cfg, port, self.bindings)
            if binding is None or binding.ip is None:
                # not declared, not learned yet: announce it once its first packet taught
                # us its addresses (a container that moved here undeclared)
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
        if msg.table_id == SOCKET_PIPELINE["spoof_guard"]:
            self._learn_from(bridge, in_port, pkt)
        elif msg.table_id == SOCKET_PIPELINE["dispatch"]:
            self._learn_remote(pkt)
        elif msg.table_id == SOCKET_PIPELINE["policy_deny"]:
            self._log_denied(msg, in_port, pkt)

    def _learn_from(self, bridge: str, in_port: int, pkt: dict[str, Any]) -> None:
        with self._lock:
            names = [n for n, o in (self._ports or {}).get(bridge, {}).items() if o == in_port]
        if not names or not pkt.get("eth_src") or not pkt.get("sender_ip"):
            return
        self.learn_binding(names[0], Binding(pkt["eth_src"], pkt["sender_ip"]))

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
            if self._ports is not None:
                self._recompute()
        log.info("remote_host_learned", ip=ip, mac=mac, moved_from=old[0] if old else None)
        self._kick_all()

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
                if name is not None and name not in self.bindings:
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
