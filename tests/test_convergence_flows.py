"""Issue 4's convergence fixes, without a switch: the flows (`topology.flows`), what they
do to packets (`topology.simulate`), and the controller's early-packet learning
(`controller.early`, `Controller` with fake OpenFlow messages).

1. a local service container's MAC has a forwarding flow of its own in service_l2, above
   the learned flows (its arrival is a flow-table change; a stale MAC from the mesh
   cannot outrank it);
2. classify's default drop sends a rate-limited copy to the controller, which learns a
   container from a packet that came before its port was known;
3. a local service container's own gratuitous ARP floods (mesh included) instead of
   being answered by the host's ARP responder.
The same on real OVS with real packets: tests/test_convergence_lab.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from controller.early import EarlyPackets
from controller.runtime import Controller
from topology.config import parse_host_config
from topology.flows import Binding, desired_state
from topology.model import Flow, Output, Owner, ToController, learn_mac_to_port
from topology.pipeline import (
    LEARN_IDLE_TIMEOUT,
    METER_EARLY,
    METER_RATES,
    SOCKET_PIPELINE,
)
from topology.simulate import Switch, arp_request, ethernet, ipv4

HOST = """
addresses: learn-first-packet  # these containers are learned
bridges:
  mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}
  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
containers:
  100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
  201: {mac: "02:00:00:00:02:01", ip: 10.0.0.201/24}
"""
CFG = parse_host_config(HOST)
PORTS = {
    "mesh": {"nm-privacy": 1, "to-socket": 2},
    "vmbr0": {"from-mesh": 1, "warp0": 2, "veth100": 3, "veth200i0": 5, "veth201i0": 6,
              "veth202i0": 7, "eth7": 8},
}
MESH, WARP, P100, S200, S201, S202, UNKNOWN = 1, 2, 3, 5, 6, 7, 8
M200, M200_IP = "02:00:00:00:02:00", "10.0.0.200"  # undeclared, learned
M201, M201_IP = "02:00:00:00:02:01", "10.0.0.201"  # declared
M202, M202_IP = "02:00:00:00:02:02", "10.0.0.202"  # undeclared, not learned yet
REMOTE = "02:00:00:00:0d:0c"  # a container on another host
LEARNED = {"veth200i0": Binding(M200, M200_IP)}
L2, DISPATCH = SOCKET_PIPELINE["service_l2"], SOCKET_PIPELINE["dispatch"]


def vmbr0_flows(learned: dict[str, Binding] | None = None) -> frozenset[Flow]:
    return desired_state(CFG, PORTS, learned=LEARNED if learned is None else learned)["vmbr0"]


def switch(learned: dict[str, Binding] | None = None) -> Switch:
    return Switch(vmbr0_flows(learned), ports=PORTS["vmbr0"].values())


# ------------------------------------------------------------------ 1. service_l2


def test_each_bound_service_container_has_its_own_l2_flow_above_learned_ones():
    flows = vmbr0_flows()
    own = {f.match_dict["eth_dst"]: f for f in flows if f.table == L2 and f.match}
    assert set(own) == {M200, M201}  # 202: addresses not known yet, no flow
    learned_priority = learn_mac_to_port(L2, 10, LEARN_IDLE_TIMEOUT).priority
    for mac, port, owner in ((M200, S200, Owner.DISCOVERED), (M201, S201, Owner.PORTS)):
        f = own[mac]
        assert f.actions == (Output(port),) and f.goto is None
        assert f.priority > learned_priority
        assert f.owner is owner  # declared: with the port; learned: with what was learned
    # learning 202's addresses adds its flow (a flow-table change, sent in a bundle)
    more = vmbr0_flows({**LEARNED, "veth202i0": Binding(M202, M202_IP)})
    assert [f for f in more - flows if f.table == L2] == [
        f for f in more if f.table == L2 and f.match_dict.get("eth_dst") == M202]


def test_the_port_flow_wins_over_a_mac_learned_from_the_mesh():
    sw = switch()
    # 201's MAC heard from the mesh (another host's stale announcement, or a forgery)
    sw.process(ethernet(MESH, M201))
    sw.process(ethernet(MESH, REMOTE))
    ping = ipv4(MESH, REMOTE, M201, "10.0.0.99", M201_IP, "icmp")
    assert sw.process(ping).ports == {S201}
    assert sw.process(ipv4(S200, M200, M201, M200_IP, M201_IP, "icmp")).ports == {S201}
    # control: without the port's own flow the learned entry would send it back to the
    # mesh (an output to in_port: dropped), as OVS did before the fix. (The mesh may no
    # longer learn a local container's MAC at all, issue 11: spoof_guard's priority-30
    # flows are left out too, to get that learned entry.)
    unlearned = SOCKET_PIPELINE["spoof_guard"], 30
    learned_only = Switch([f for f in vmbr0_flows() if not (f.table == L2 and f.match)
                           and (f.table, f.priority) != unlearned],
                          ports=PORTS["vmbr0"].values())
    learned_only.process(ethernet(MESH, M201))
    assert learned_only.process(ping).ports == set()


# ------------------------------------------------------------------ 2. unknown in_ports


def test_classify_default_drops_and_sends_a_metered_copy():
    default = [f for f in vmbr0_flows() if f.table == SOCKET_PIPELINE["classify"]
               and not f.match]
    assert len(default) == 1
    f = default[0]
    assert f.priority == 0 and f.goto is None
    assert f.actions == (ToController(meter=METER_EARLY),)
    assert METER_EARLY in METER_RATES
    result = switch().process(arp_request(UNKNOWN, M202, M202_IP, M202_IP))
    assert result.ports == set() and len(result.packet_ins) == 1


# ------------------------------------------------------------------ 3. own GARP


def test_own_gratuitous_arp_floods_while_arp_for_it_is_still_answered():
    sw = switch()
    flood = {S200, S202, MESH}  # service ports and from-mesh, never privacy/WARP/unknown
    garp = sw.process(arp_request(S201, M201, M201_IP, M201_IP))
    assert garp.ports == flood
    assert sw.process(arp_request(S200, M200, M200_IP, M200_IP)).ports == {S201, S202, MESH}
    # anyone else asking for 201's address is answered here, as before
    asked = sw.process(arp_request(S200, M200, M200_IP, M201_IP))
    assert asked.ports == {S200}
    reply = asked.outputs[0][1]
    assert (reply.arp_op, reply.arp_spa, reply.arp_sha) == (2, M201_IP, M201)
    # a container cannot announce someone else's address (spoof_guard drops it)
    assert sw.process(arp_request(S200, M200, M201_IP, M201_IP)).ports == set()


def test_own_garp_flow_matches_its_port_and_address_only():
    garps = [f for f in vmbr0_flows() if f.table == DISPATCH and "in_port" in f.match_dict]
    by_port = {f.match_dict["in_port"]: f for f in garps}
    assert set(by_port) == {S200, S201}
    responder = max(f.priority for f in vmbr0_flows()
                    if f.table == DISPATCH and "arp_tpa" in f.match_dict
                    and "in_port" not in f.match_dict)
    for port, ip in ((S200, M200_IP), (S201, M201_IP)):
        f = by_port[port]
        assert f.match_dict["arp_tpa"] == ip and f.match_dict["arp_op"] == 1
        assert f.goto == L2 and not f.actions and f.priority > responder


# ------------------------------------------------------------------ EarlyPackets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_early_packets_keep_the_first_senders_for_a_while():
    clock = Clock()
    early = EarlyPackets(ttl_s=5.0, max_ports=3, per_port=2, clock=clock)
    a, b, c = Binding(M200, M200_IP), Binding(M202, M202_IP), Binding(REMOTE, "10.0.0.9")
    for x in (a, a, b, c):
        early.add(7, x)
    assert len(early) == 2
    assert early.take(7) == [a, b]  # first seen first, at most per_port, repeats ignored
    assert early.take(7) == []  # taken once
    early.add(8, a)
    clock.now += 5.1
    assert early.take(8) == []  # too old
    for port in (1, 2, 3, 4):
        early.add(port, a)
    assert early.take(1) == [] and early.take(4) == [a]  # the oldest port made room


# ------------------------------------------------------------------ the controller


@dataclass
class PacketIn:
    data: bytes
    match: dict[str, Any]
    table_id: int


def _garp_frame(mac: str, ip: str) -> bytes:
    import socket

    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    return (b"\xff" * 6 + hw + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01"
            + hw + addr + b"\x00" * 6 + addr)


DPIDS = {"mesh": 0x10, "vmbr0": 0x20}


def _controller(clock: Clock) -> Controller:
    c = Controller(CFG)
    c._early = EarlyPackets(clock=clock)
    ports = {b: dict(p) for b, p in PORTS.items()}
    del ports["vmbr0"]["veth202i0"]
    c.ovsdb_changed(ports, DPIDS)
    return c


def _early_packet(c: Controller, in_port: int, mac: str, ip: str) -> None:
    c.packet_in(DPIDS["vmbr0"], PacketIn(_garp_frame(mac, ip), {"in_port": in_port},
                                         SOCKET_PIPELINE["classify"]))


def test_a_packet_before_the_port_is_learned_when_the_port_appears():
    clock = Clock()
    c = _controller(clock)
    _early_packet(c, 9, M202, M202_IP)  # veth202i0 gets ofport 9, its GARP came first
    assert "veth202i0" not in c.bindings
    c.ovsdb_changed({**PORTS, "vmbr0": {**PORTS["vmbr0"], "veth202i0": 9}}, DPIDS)
    assert c.bindings["veth202i0"] == Binding(M202, M202_IP)
    assert c._desired is not None  # and its flows are in the desired state
    assert any(f.table == L2 and f.match_dict.get("eth_dst") == M202
               for f in c._desired["vmbr0"])


def test_a_packet_of_a_known_port_without_flows_is_learned_at_once():
    c = _controller(Clock())
    c.ovsdb_changed({**PORTS, "vmbr0": {**PORTS["vmbr0"], "veth202i0": 9}}, DPIDS)
    _early_packet(c, 9, M202, M202_IP)
    assert c.bindings["veth202i0"] == Binding(M202, M202_IP)


def test_early_packets_never_bind_what_they_must_not():
    clock = Clock()
    c = _controller(clock)
    _early_packet(c, 12, "02:00:00:00:02:03", "10.0.0.203")
    clock.now += 6.0  # port 12's packet is too old by the time its port appears
    _early_packet(c, 9, M202, M202_IP)  # control: this one is learned
    _early_packet(c, 10, M201, M201_IP)  # 201's declared addresses, from another port
    _early_packet(c, 11, REMOTE, "10.0.0.77")  # will be a port without a role
    _early_packet(c, 13, "02:00:00:00:02:04", "10.0.0.204")  # will be declared 201's port
    new = {"veth202i0": 9, "veth203i0": 10, "eth5": 11, "veth204i0": 12, "veth201i0": 13}
    vmbr0 = {k: v for k, v in PORTS["vmbr0"].items() if k != "veth201i0"}
    c.ovsdb_changed({**PORTS, "vmbr0": {**vmbr0, **new}}, DPIDS)
    assert c.bindings == {"veth202i0": Binding(M202, M202_IP)}
    # an IPv4-less frame teaches nothing and is not kept
    v6 = b"\xff" * 6 + bytes.fromhex("020000000299") + b"\x86\xdd" + b"\x00" * 40
    c.packet_in(DPIDS["vmbr0"], PacketIn(v6, {"in_port": 14}, SOCKET_PIPELINE["classify"]))
    assert len(c._early) == 0


class FakeSession:
    """What `Controller._announce_new_containers` uses of a switch session."""

    def __init__(self, installed: set[int]) -> None:
        from os_ken.ofproto import ofproto_v1_4, ofproto_v1_4_parser

        self.bridge = "vmbr0"
        self.installed = installed
        self.dp = SimpleNamespace(ofproto=ofproto_v1_4, ofproto_parser=ofproto_v1_4_parser)
        self.sent: list[Any] = []

    def send(self, msgs: list[Any]) -> None:
        self.sent.extend(msgs)


def test_an_early_learned_container_is_announced_once_its_flows_are_on_the_switch():
    """Learned from an early packet, its binding can exist before the bundle with its
    flows: an announcement then would meet spoof_guard's drop (seen in the mesh lab)."""
    c = _controller(Clock())
    c.ovsdb_changed({**PORTS, "vmbr0": {**PORTS["vmbr0"], "veth202i0": 9}}, DPIDS)
    assert c._desired is not None
    without = {f.cookie for f in c._desired["vmbr0"]}  # the port's flows, no binding yet
    _early_packet(c, 9, M202, M202_IP)
    session = FakeSession(without)
    c._announce_new_containers(session)  # type: ignore[arg-type]
    assert all(getattr(m, "in_port", None) != 9 for m in session.sent)
    session.installed = {f.cookie for f in c._desired["vmbr0"]}  # the next bundle
    c._announce_new_containers(session)  # type: ignore[arg-type]
    assert [m.in_port for m in session.sent if getattr(m, "in_port", None) == 9] == [9]
