"""topology.simulate: OVS semantics on small hand-made tables, then packet verdicts
on the flows `desired_state` computes for a sample host. Pure and fast."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from topology.config import parse_host_config
from topology.flows import Binding, desired_state
from topology.model import (
    LEARNED_COOKIE,
    Ct,
    Flow,
    Learn,
    LearnSpec,
    MoveField,
    Output,
    OutputReg,
    Owner,
    Resubmit,
    SetField,
    SetReg,
    ToController,
    ct_state,
    flow,
    learn_mac_to_port,
)
from topology.openflow import ETH_IPV6
from topology.simulate import (
    BROADCAST,
    EST,
    NEW,
    RPL,
    TRK,
    Conntrack,
    FlowError,
    Packet,
    Result,
    Switch,
    arp_request,
    clear_compiled,
    compile_flow,
    deliveries,
    ethernet,
    ipv4,
    ipv6,
    neighbor_advert,
    neighbor_solicit,
    ties,
)

A = "02:00:00:00:00:0a"
B = "02:00:00:00:00:0b"
C = "02:00:00:00:00:0c"


@dataclass(frozen=True)
class Conjunction:
    """Stand-in for the action the policy stage will add to topology.model."""

    id: int
    clause: int
    n_clauses: int


def tcp(in_port: int = 1, src: str = "10.0.0.1", dst: str = "10.0.0.2", sport: int = 40000,
        dport: int = 80, dst_mac: str = B) -> Packet:
    return ipv4(in_port, A, dst_mac, src, dst, "tcp", sport, dport)


def out_ports(result: Result) -> list[int]:
    return [port for port, _ in result.outputs]


# ---------------------------------------------------------------- lookup


def test_highest_priority_wins_with_masked_matches():
    sw = Switch([
        flow(0, 0, actions=[Output(9)]),
        flow(0, 10, eth_dst=("01:00:00:00:00:00", "01:00:00:00:00:00"), actions=[Output(8)]),
        flow(0, 20, eth_type=0x800, ipv4_dst=("10.1.0.0", "255.255.0.0"), actions=[Output(7)]),
        flow(0, 30, eth_type=0x800, ip_proto=6, tcp_dst=(8080, 0xFFF0), actions=[Output(6)]),
        flow(0, 40, eth_type=0x800, ipv4_src="192.168.0.0/24", actions=[Output(5)]),
        flow(0, 50, reg3=(0, 0xFF), eth_src=("02:00:00:99:00:00", "ff:ff:ff:ff:00:00"),
             actions=[Output(4)]),
    ])
    assert deliveries(sw, tcp(dst="10.9.9.9")) == {9}
    assert deliveries(sw, tcp(dst="10.9.9.9", dst_mac=BROADCAST)) == {8}
    assert deliveries(sw, tcp(dst="10.1.2.3", dst_mac=BROADCAST)) == {7}
    assert deliveries(sw, tcp(dst="10.1.2.3", dport=8090)) == {6}  # 8080..8095
    assert deliveries(sw, tcp(dst="10.1.2.3", dport=8096)) == {7}
    assert deliveries(sw, ipv4(1, A, B, "10.0.0.1", "10.1.2.3", "udp", 1, 8090)) == {7}
    assert deliveries(sw, tcp(src="192.168.0.77", dst="10.1.2.3", dport=8090)) == {5}
    assert deliveries(sw, ethernet(1, "02:00:00:99:12:34", B)) == {4}  # MAC prefix
    assert deliveries(sw, ethernet(1, "02:00:00:98:12:34", B)) == {9}


def test_equal_priority_overlap_is_deterministic_and_reported():
    flows = [flow(0, 5, in_port=1, actions=[Output(2)]),
             flow(0, 5, eth_type=0x800, ipv4_src="10.0.0.1", actions=[Output(3)])]
    verdicts = {frozenset(deliveries(Switch(order), tcp())) for order in (flows, flows[::-1])}
    assert len(verdicts) == 1
    result = Switch(flows).process(tcp())
    assert len(ties(result)) == 1 and len(result.trace[0].tied) == 1
    assert not ties(Switch(flows).process(tcp(in_port=4)))


@pytest.mark.parametrize("bad", [
    flow(0, 1, ipv4_dst="10.0.0.1"),  # no eth_type=0x800
    flow(0, 1, eth_type=0x800, tcp_dst=80),  # no ip_proto=6
    flow(0, 1, arp_tpa="10.0.0.1", eth_type=0x800),  # ARP field on IPv4
    flow(0, 1, in_port=(1, 0xF)),  # in_port cannot be masked
    flow(0, 1, eth_dst=("01:00:00:00:00:01", "01:00:00:00:00:00")),  # bits outside mask
    flow(0, 1, no_such_field=1),
    flow(3, 1, goto=3),  # goto_table must go forward
    flow(0, 1, actions=[Ct(zone=1)]),  # ct needs an IP match
    flow(0, 1, eth_type=0x800, actions=[Ct(zone=1, mark=(1, 1))]),  # exec needs commit
    flow(0, 1, actions=[SetField("ipv4_src", "10.0.0.1")]),  # set_field without prerequisite
    flow(0, 1, actions=[MoveField("NXM_NX_REG0[0..7]", "NXM_NX_REG1[]")]),  # widths differ
    flow(0, 1, actions=[SetReg("reg9", 1)]),
    flow(0, 1, actions=[Conjunction(1, 1, 2), Output(1)]),  # conjunction + other action
    flow(0, 1, actions=[Conjunction(1, 1, 1)]),  # n must be >= 2
])
def test_flows_ovs_would_refuse(bad: Flow):
    with pytest.raises(FlowError):
        Switch([bad])


def test_refusals_name_the_flow_and_are_not_remembered():
    bad = flow(0, 1, eth_type=0x800, tcp_dst=80, note="bad")
    for _ in range(2):
        with pytest.raises(FlowError, match=r"^table 0: priority=1,.*tcp_dst=80.*ip_proto"):
            compile_flow(bad)


def test_checked_flows_are_kept_per_flow_object():
    clear_compiled()
    a = flow(0, 5, in_port=1, actions=[Output(2)], note="first")
    b = flow(0, 5, in_port=1, actions=[Output(2)], note="second")  # equal, other note
    ra = compile_flow(a)
    assert compile_flow(a) is ra and ra.cookie == a.cookie
    assert compile_flow(a, cookie=7).cookie == 7  # another cookie: checked, not kept
    assert compile_flow(a) is ra
    rb = compile_flow(b)
    assert rb is not ra and rb.flow is b  # traces show each flow's own note
    assert compile_flow(b) is rb and compile_flow(a).flow is a


def test_same_priority_and_match_twice_is_refused():
    with pytest.raises(FlowError, match="same priority and match"):
        Switch([flow(0, 1, in_port=1, actions=[Output(2)]),
                flow(0, 1, in_port=1, actions=[Output(3)])])
    Switch([flow(0, 1, in_port=1, actions=[Output(2)])] * 2)  # the same flow twice is one


# ---------------------------------------------------------------- pipeline


def test_goto_and_resubmit():
    sw = Switch([
        flow(0, 1, actions=[Resubmit(5), Output(2), Resubmit(6), Output(3)], goto=10),
        flow(5, 1, actions=[SetField("eth_dst", C), Output(4)], goto=7),
        flow(7, 1, actions=[Output(5)]),
        flow(10, 1, actions=[Output(6)]),
    ])  # table 6 is empty: the resubmit misses and the action list goes on
    result = sw.process(tcp())
    assert out_ports(result) == [4, 5, 2, 3, 6]
    assert {pkt.eth_dst for _, pkt in result.outputs} == {C}  # modified before every output
    assert [(s.table, s.depth) for s in result.trace] == [(0, 0), (5, 1), (7, 1), (6, 1), (10, 0)]
    assert result.trace[3].flow is None


def test_table_miss_in_the_pipeline_drops():
    sw = Switch([flow(0, 1, actions=[SetReg("reg0", 1)], goto=3)])
    result = sw.process(tcp())
    assert result.verdict == "drop" and result.outputs == []
    assert [(s.table, s.flow is None) for s in result.trace] == [(0, False), (3, True)]


def test_resubmit_loop_stops_at_ovs_depth_limit_keeping_outputs():
    result = Switch([flow(0, 1, actions=[Output(2), Resubmit(0)])]).process(tcp())
    assert out_ports(result) == [2] * 65
    assert "processing stopped" in result.describe()


def test_registers_start_at_zero_and_carry_across_tables():
    sw = Switch([
        flow(0, 10, reg0=0, actions=[SetReg("reg0", 7), SetReg("reg1", 0x10005)], goto=1),
        flow(0, 0),
        flow(1, 10, reg0=7, goto=2,
             actions=[OutputReg("reg1"), MoveField("NXM_NX_REG0[0..15]", "NXM_NX_REG2[16..31]")]),
        flow(1, 0),
        flow(2, 10, reg2=(7 << 16, 0xFFFF0000), actions=[Output(9)]),
        flow(2, 0),
    ])
    for _ in range(2):  # nothing leaks into the next packet
        assert out_ports(sw.process(tcp())) == [5, 9]  # OutputReg: bits 0..15 only


def test_output_to_the_ingress_port_needs_in_port():
    sw = Switch([
        flow(0, 1, actions=[Output(1), Output(2), SetReg("reg0", 1), OutputReg("reg0")]),
        flow(0, 2, in_port=3, actions=[Output("IN_PORT"), Output(3)]),
    ], ports=[1, 2, 3])
    assert out_ports(sw.process(tcp(in_port=1))) == [2]
    assert out_ports(sw.process(tcp(in_port=3))) == [3]
    assert out_ports(Switch([flow(0, 1, actions=[Output(8)])], ports=[1, 2]).process(tcp())) == []


# ---------------------------------------------------------------- learn


def test_learn_then_hit_and_relearn():
    sw = Switch([flow(0, 0, actions=[learn_mac_to_port(1, 10, 300)], goto=1),
                 flow(1, 0, actions=[Output(1), Output(2), Output(3)])])
    assert deliveries(sw, ethernet(1, A, B)) == {2, 3}  # B unknown: flood
    assert deliveries(sw, ethernet(2, B, A)) == {1}  # A was learned on port 1
    last = sw.process(ethernet(3, C, B)).trace[-1]
    assert last.cookie == LEARNED_COOKIE and last.flow is not None
    assert last.flow.owner is Owner.LEARNED and last.flow.match == (("eth_dst", B),)
    assert out_ports(sw.process(ethernet(3, C, B))) == [2]
    sw.process(ethernet(3, A))  # A moves to port 3: the learned flow is replaced
    assert deliveries(sw, ethernet(2, B, A)) == {3}
    assert [f.match for f in sw.learned()].count((("eth_dst", A),)) == 1


def test_learn_immediates_field_copies_and_partial_loads():
    learn = Learn(5, 10, 60, (
        LearnSpec("match", "0x800", "NXM_OF_ETH_TYPE[]"),
        LearnSpec("match", "NXM_OF_IP_SRC[]", "NXM_OF_IP_DST[]"),
        LearnSpec("load", "NXM_OF_IN_PORT[]", "NXM_NX_REG1[0..15]"),
        LearnSpec("load", "NXM_OF_ETH_SRC[]", "NXM_OF_ETH_DST[]"),
    ))
    sw = Switch([
        flow(0, 10, in_port=1, eth_type=0x800, actions=[learn]),
        flow(0, 5, in_port=2, actions=[SetReg("reg1", 0xABCD0000), Resubmit(5), OutputReg("reg1")]),
        flow(5, 0),
    ])
    sw.process(ipv4(1, A, B, "10.0.0.1", "10.0.0.2"))
    (learned,) = sw.learned()
    assert learned.match == (("eth_type", 0x800), ("ipv4_dst", "10.0.0.1"))
    result = sw.process(ipv4(2, B, C, "10.0.0.2", "10.0.0.3"))
    assert result.outputs == []  # not to 10.0.0.1: no learned flow, reg1[0..15] stays 0
    result = sw.process(ipv4(2, B, C, "10.0.0.2", "10.0.0.1"))
    assert [(port, pkt.eth_dst) for port, pkt in result.outputs] == [(1, A)]


def test_learn_specs_are_checked_like_ovs():
    out_of_order = Learn(5, 10, 60, (LearnSpec("match", "NXM_OF_IP_SRC[]", "NXM_OF_IP_DST[]"),
                                     LearnSpec("match", "0x800", "NXM_OF_ETH_TYPE[]")))
    with pytest.raises(FlowError, match="learned flow"):
        Switch([flow(0, 1, eth_type=0x800, actions=[out_of_order])])
    needs_ip = Learn(5, 10, 60, (LearnSpec("match", "0x800", "NXM_OF_ETH_TYPE[]"),
                                 LearnSpec("match", "NXM_OF_IP_SRC[]", "NXM_OF_IP_DST[]")))
    with pytest.raises(FlowError):
        Switch([flow(0, 1, actions=[needs_ip])])  # this flow does not match IPv4
    with pytest.raises(FlowError):
        Switch([flow(0, 1, actions=[Learn(5, 1, 0, (
            LearnSpec("load", "NXM_OF_IN_PORT[]", "NXM_NX_REG1[]"),))])])  # 16 vs 32 bits


# ---------------------------------------------------------------- conntrack


def _ct_switch() -> Switch:
    return Switch([
        flow(0, 10, eth_type=0x800, actions=[Ct(zone=5, table=1)]),
        flow(0, 0, actions=[Output(99)]),
        flow(1, 30, in_port=1, eth_type=0x800, ct_state=ct_state("+trk+new"),
             actions=[Ct(zone=5, commit=True), Output(10)]),
        flow(1, 20, ct_state=ct_state("+trk+new"), actions=[Output(11)]),
        flow(1, 20, ct_state=ct_state("+trk+est-rpl"), actions=[Output(12)]),
        flow(1, 20, ct_state=ct_state("+trk+est+rpl"), actions=[Output(13)]),
        flow(1, 20, ct_state=ct_state("+trk+inv"), actions=[Output(14)]),
        flow(1, 0),
    ])


def _ct_of(result: Result) -> int:
    return next(step.ct_state for step in result.trace if step.recirc)


def test_ct_new_est_rpl_across_request_and_reply():
    sw = _ct_switch()
    request = tcp(in_port=1)
    first = sw.process(request)
    assert _ct_of(first) == TRK | NEW and out_ports(first) == [10]  # committed
    again = sw.process(request)  # committed, no reply seen yet: the datapaths say +new
    assert _ct_of(again) == TRK | NEW
    reply = sw.process(request.reply(2))
    assert _ct_of(reply) == TRK | EST | RPL and out_ports(reply) == [13]
    after = sw.process(request)
    assert _ct_of(after) == TRK | EST and out_ports(after) == [12]
    assert [(c.zone, c.src, c.dport, c.seen_reply) for c in sw.conntrack.connections()] == [
        (5, "10.0.0.1", 80, True)]
    assert sw.process(ethernet(1, A)).trace[0].ct_state == 0
    assert out_ports(sw.process(arp_request(1, A, "10.0.0.1", "10.0.0.2"))) == [99]


def test_ct_without_commit_stays_new_and_icmp():
    sw = _ct_switch()
    opened = tcp(in_port=2, sport=5555)  # port 2 is not committed by table 1
    assert out_ports(sw.process(opened)) == [11]
    assert out_ports(sw.process(opened.reply(3))) == [11]  # no connection: new, not rpl
    echo = ipv4(1, A, B, "10.0.0.1", "10.0.0.2", "icmp")
    assert out_ports(sw.process(echo.reply(2))) == [14]  # echo reply without request: +inv
    assert out_ports(sw.process(echo)) == [10]
    assert out_ports(sw.process(echo.reply(2))) == [13]


def test_ct_zones_are_separate():
    ct = Conntrack()
    assert ct.track(1, tcp().headers(), commit=True).state == TRK | NEW
    assert ct.track(2, tcp().reply(2).headers()).state == TRK | NEW
    assert ct.track(1, tcp().reply(2).headers()).state == TRK | EST | RPL


def test_ct_exec_stores_mark_and_label_and_a_cut_drops_replies():
    sw = Switch([
        flow(0, 10, eth_type=0x800, actions=[Ct(zone=2, table=1)]),
        flow(1, 30, in_port=1, eth_type=0x800, ct_state=ct_state("+trk+new"),
             actions=[Ct(zone=2, commit=True, mark=(0, 1), label=42), Output(10)]),
        flow(1, 25, in_port=4, eth_type=0x800, ct_state=ct_state("+trk+est-rpl"),
             actions=[Ct(zone=2, commit=True, mark=(1, 1))]),  # a deny cuts it
        flow(1, 20, ct_state=ct_state("+trk+est+rpl"), ct_mark=(0, 1), actions=[Output(13)]),
        flow(1, 15, ct_state=ct_state("+trk+rpl"), ct_mark=(1, 1)),
        flow(1, 0),
    ])
    request = tcp(in_port=1)
    assert out_ports(sw.process(request)) == [10]
    assert out_ports(sw.process(request.reply(2))) == [13]
    (conn,) = sw.conntrack.connections()
    assert (conn.mark, conn.label) == (0, 42)
    assert out_ports(sw.process(replace(request, in_port=4))) == []
    assert [(c.mark, c.label) for c in sw.conntrack.connections()] == [(1, 42)]
    assert out_ports(sw.process(request.reply(2))) == []  # blocked: replies drop too


def test_packet_in_is_not_a_delivery():
    sw = Switch([flow(0, 1, actions=[ToController(), Output(2), Output("CONTROLLER")], meter=1)])
    result = sw.process(tcp())
    assert result.ports == {2} and result.packet_ins == [tcp(), tcp()]
    assert "meter:1" in result.describe()


def test_recirculation_loop_is_bounded():
    result = Switch([flow(0, 1, eth_type=0x800, actions=[Ct(zone=1, table=0)])]).process(tcp())
    assert result.outputs == [] and max(step.recirc for step in result.trace) == 6
    assert "recirculations" in result.describe()


def test_replace_flows_keeps_learned_flows_and_connections():
    learn = flow(0, 0, actions=[learn_mac_to_port(4, 10, 300)], goto=1)
    sw = Switch([learn, flow(1, 1, eth_type=0x800, actions=[Ct(zone=1, commit=True)], goto=2),
                 flow(2, 0, actions=[Output(7)])])
    sw.process(tcp(in_port=1))
    sw.replace_flows([learn, flow(1, 1, eth_type=0x800, actions=[Ct(zone=1, table=2)]),
                      flow(2, 5, ct_state=ct_state("+trk+est+rpl"), actions=[Resubmit(3)]),
                      flow(3, 0, actions=[Output(9)])])
    result = sw.process(tcp().reply(5))
    assert [(s.table, s.flow is not None) for s in result.trace] == [
        (0, True), (1, True), (2, True), (3, True)]
    assert out_ports(result) == [9]
    assert len(sw.learned()) == 2 and len(sw.conntrack.connections()) == 1


def test_ct_forks_and_the_original_continues_untracked():
    """ovs-actions(7): the actions after ct run on the original, with ct fields cleared."""
    after_ct = [flow(2, 10, ct_state=ct_state("-trk"), actions=[Output(20)]),
                flow(2, 10, ct_state=ct_state("+trk"), actions=[Output(21)]),
                flow(1, 10, ct_state=ct_state("+trk+new"), actions=[Output(10)])]
    sw = Switch([flow(0, 1, eth_type=0x800, actions=[Ct(zone=1, table=1), Resubmit(2)]),
                 *after_ct])
    result = sw.process(tcp())
    assert out_ports(result) == [20, 10]
    assert [(s.table, s.recirc) for s in result.trace] == [(0, 0), (2, 0), (1, 1)]
    sw = Switch([flow(0, 1, eth_type=0x800, actions=[Ct(zone=1, commit=True), Resubmit(2)]),
                 *after_ct])
    assert out_ports(sw.process(tcp())) == [20]  # no table: nothing re-injected


# ---------------------------------------------------------------- conjunction


def _ip(**match: object) -> dict[str, object]:
    return {"eth_type": 0x800, **match}


def _tcp(**match: object) -> dict[str, object]:
    return {"eth_type": 0x800, "ip_proto": 6, **match}


def test_conjunction_two_clauses():
    sw = Switch([
        flow(0, 100, actions=[Conjunction(7, 1, 2)], **_ip(ipv4_src="10.0.0.1")),
        flow(0, 100, actions=[Conjunction(7, 1, 2)], **_ip(ipv4_src="10.0.0.4")),
        flow(0, 100, actions=[Conjunction(7, 2, 2)], **_tcp(tcp_dst=80)),
        flow(0, 100, actions=[Conjunction(7, 2, 2)], **_tcp(tcp_dst=443)),
        flow(0, 100, conj_id=7, actions=[Output(5)]),
        flow(0, 0, actions=[Output(9)]),
    ])
    hit = sw.process(tcp(src="10.0.0.1", dport=80))
    assert out_ports(hit) == [5] and hit.trace[0].conj_id == 7
    assert deliveries(sw, tcp(src="10.0.0.4", dport=443)) == {5}
    assert deliveries(sw, tcp(src="10.0.0.1", dport=22)) == {9}  # one dimension only
    assert deliveries(sw, tcp(src="10.0.0.2", dport=80)) == {9}
    assert deliveries(sw, ipv4(1, A, B, "10.0.0.1", "10.0.0.2", "udp", 1, 80)) == {9}


def test_conjunction_three_clauses_and_negatives():
    sw = Switch([
        flow(0, 50, in_port=1, actions=[Conjunction(9, 1, 3)]),
        flow(0, 50, in_port=2, actions=[Conjunction(9, 1, 3)]),
        flow(0, 50, actions=[Conjunction(9, 2, 3)], **_ip(ipv4_src="10.0.0.1")),
        flow(0, 50, actions=[Conjunction(9, 3, 3)], **_tcp(tcp_dst=22)),
        flow(0, 50, actions=[Conjunction(9, 3, 3)], **_tcp(tcp_dst=80)),
        flow(0, 50, conj_id=9, actions=[Output(5)]),
        flow(0, 0),
    ])
    assert deliveries(sw, tcp(in_port=1, dport=22)) == {5}
    assert deliveries(sw, tcp(in_port=2, dport=80)) == {5}
    assert deliveries(sw, tcp(in_port=3, dport=22)) == set()  # clause 1 missing
    assert deliveries(sw, tcp(in_port=1, src="10.0.0.9", dport=22)) == set()  # clause 2
    assert deliveries(sw, tcp(in_port=1, dport=443)) == set()  # clause 3


def test_conjunction_against_ordinary_flows_and_priorities():
    conj = [flow(0, 100, actions=[Conjunction(7, 1, 2)], **_ip(ipv4_src="10.0.0.1")),
            flow(0, 100, actions=[Conjunction(7, 2, 2)], **_tcp(tcp_dst=80))]
    lower = flow(0, 50, actions=[Output(4)], **_ip(ipv4_src="10.0.0.1"))
    higher = flow(0, 150, actions=[Output(6)], **_tcp(tcp_dst=80))
    conj_flow = flow(0, 100, conj_id=7, actions=[Output(5)])
    assert deliveries(Switch([*conj, lower, conj_flow]), tcp()) == {5}  # beats priority 50
    assert deliveries(Switch([*conj, lower, higher, conj_flow]), tcp()) == {6}
    assert deliveries(Switch([*conj, lower]), tcp()) == {4}  # no conj_id=7 flow: fall back
    # the conj_id=7 lookup is an ordinary lookup: at priority 10 it loses to priority 50
    low_conj_flow = replace(conj_flow, priority=10)
    assert deliveries(Switch([*conj, lower, low_conj_flow]), tcp()) == {4}
    assert deliveries(Switch([*conj, low_conj_flow]), tcp()) == {5}
    split = [conj[0], replace(conj[1], priority=90), conj_flow]  # other priority: other conj
    assert deliveries(Switch(split), tcp()) == set()
    with pytest.raises(FlowError, match="different numbers of clauses"):
        Switch([conj[0], flow(0, 100, actions=[Conjunction(7, 2, 3)], **_tcp(tcp_dst=80))])


def test_flow_with_two_conjunction_ids():
    sw = Switch([
        flow(0, 100, actions=[Conjunction(1, 1, 2), Conjunction(2, 1, 2)],
             **_ip(ipv4_src="10.0.0.1")),
        flow(0, 100, actions=[Conjunction(1, 2, 2)], **_tcp(tcp_dst=80)),
        flow(0, 100, actions=[Conjunction(2, 2, 2)], **_tcp(tcp_dst=443)),
        flow(0, 1, conj_id=1, actions=[Output(1)]),
        flow(0, 1, conj_id=2, actions=[Output(2)]),
    ])
    assert deliveries(sw, tcp(in_port=9, dport=80)) == {1}
    assert deliveries(sw, tcp(in_port=9, dport=443)) == {2}


# ---------------------------------------------------------------- desired_state of a sample host

HOST = """
datapath_type: netdev
addresses: learn-first-packet  # these containers are learned
bridges:
  mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}
  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
containers:
  100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
"""
PORTS = {
    "mesh": {"nm-privacy": 1, "to-socket": 2, "eth9": 3},
    "vmbr0": {"from-mesh": 1, "warp0": 2, "veth100": 3, "veth102": 4, "veth200": 5,
              "veth201i0": 6, "eth7": 7},
}
MESH_PORT, WARP_PORT, P100, P102, S200, S201, UNKNOWN = 1, 2, 3, 4, 5, 6, 7
MESH_HOST, MESH_IP = "02:00:00:00:aa:01", "100.64.0.1"
C100, C100_IP = "02:00:00:00:01:00", "10.0.0.100"
C102, C102_IP = "02:00:00:00:01:02", "10.0.0.102"
GATEWAY, GATEWAY_IP = "02:00:00:00:00:01", "10.0.0.1"  # privacy gateway, behind WARP
M200, M200_IP = "02:00:00:00:02:00", "10.0.0.200"
M201, M201_IP = "02:00:00:00:02:01", "10.0.0.201"
# what the controller learned for the containers the config does not declare
LEARNED = {"veth102": Binding(C102, C102_IP), "veth200": Binding(M200, M200_IP),
           "veth201i0": Binding(M201, M201_IP)}
PortMap = dict[str, dict[str, int]]


def _state(ports: PortMap = PORTS, learned: dict[str, Binding] | None = None
           ) -> dict[str, frozenset[Flow]]:
    return desired_state(parse_host_config(HOST), ports,
                         learned=LEARNED if learned is None else learned)


def vmbr0(ports: PortMap = PORTS, learned: dict[str, Binding] | None = None) -> Switch:
    return Switch(_state(ports, learned)["vmbr0"], ports=ports["vmbr0"].values())


def send(sw: Switch, packet: Packet) -> Result:
    """Process and insist the flows never rely on an undefined same-priority choice."""
    result = sw.process(packet)
    assert not ties(result), result.describe()
    return result


def to(sw: Switch, packet: Packet) -> set[int]:
    return send(sw, packet).ports


def test_mesh_bridge_links_uplink_and_to_socket_only():
    sw = Switch(_state()["mesh"], ports=PORTS["mesh"].values())
    assert to(sw, ethernet(1, MESH_HOST)) == {2}
    assert to(sw, ethernet(2, C100, MESH_HOST)) == {1}
    assert to(sw, ethernet(3, A)) == set()
    assert to(sw, tcp(in_port=3)) == set()


def test_privacy_container_reaches_only_warp():
    sw = vmbr0()
    for port, mac, ip in ((P100, C100, C100_IP), (P102, C102, C102_IP)):
        assert to(sw, ipv4(port, mac, GATEWAY, ip, "1.1.1.1", "tcp", 50000, 443)) == {WARP_PORT}
        assert to(sw, ipv4(port, mac, GATEWAY, ip, MESH_IP, "udp", 50000, 53)) == {WARP_PORT}
        assert to(sw, arp_request(port, mac, ip, GATEWAY_IP)) == {WARP_PORT}
        assert to(sw, ipv4(port, mac, BROADCAST, ip, "10.0.0.255", "udp", 5353, 5353)) == {2}
        assert to(sw, ipv4(port, mac, M200, ip, M200_IP, "icmp")) == {WARP_PORT}
        assert to(sw, ipv4(port, mac, C100, ip, C100_IP, "icmp")) <= {WARP_PORT}
        assert to(sw, ethernet(port, mac)) <= {WARP_PORT}  # not IPv4/ARP: spoof guard drops


def test_kill_switch_without_warp_port():
    ports = {**PORTS, "vmbr0": {k: v for k, v in PORTS["vmbr0"].items() if k != "warp0"}}
    sw = vmbr0(ports)
    assert to(sw, ipv4(P100, C100, GATEWAY, C100_IP, "1.1.1.1", "tcp", 50000, 443)) == set()
    assert to(sw, arp_request(P100, C100, C100_IP, GATEWAY_IP)) == set()
    assert to(sw, ipv4(P100, C100, BROADCAST, C100_IP, "10.0.0.255", "udp", 1, 2)) == set()
    # replies to connections the mesh opened still go back to the mesh (by design)
    syn = ipv4(MESH_PORT, MESH_HOST, C100, MESH_IP, C100_IP, "tcp", 40000, 22)
    assert to(sw, syn) == {P100}
    assert to(sw, syn.reply(P100, src_mac=C100)) == {MESH_PORT}


def test_warp_return_reaches_only_the_owner_of_the_mac():
    sw = vmbr0()
    back_to_102 = ipv4(WARP_PORT, GATEWAY, C102, "1.1.1.1", C102_IP, "tcp", 443, 50000)
    assert to(sw, back_to_102) == set()  # undeclared and not learned yet
    assert to(sw, ipv4(P102, C102, GATEWAY, C102_IP, "1.1.1.1", "tcp", 50000, 443)) == {2}
    assert to(sw, back_to_102) == {P102}
    assert to(sw, replace(back_to_102, eth_dst=C100)) == {P100}  # declared MAC
    assert to(sw, replace(back_to_102, eth_dst="02:00:00:00:09:09")) == set()  # unknown
    assert to(sw, replace(back_to_102, eth_dst=M200)) == set()  # never to services
    assert to(sw, arp_request(WARP_PORT, GATEWAY, GATEWAY_IP, C102_IP)) == {P100, P102}


@pytest.mark.parametrize("in_port", [MESH_PORT, WARP_PORT])
def test_arp_for_declared_privacy_container_is_answered_on_the_bridge(in_port: int):
    sw = vmbr0()
    result = send(sw, arp_request(in_port, MESH_HOST, MESH_IP, C100_IP))
    assert out_ports(result) == [in_port]
    answer = result.outputs[0][1]
    assert (answer.eth_src, answer.eth_dst, answer.arp_op) == (C100, MESH_HOST, 2)
    assert (answer.arp_sha, answer.arp_spa) == (C100, C100_IP)
    assert (answer.arp_tha, answer.arp_tpa) == (MESH_HOST, MESH_IP)


def test_mesh_opened_connection_replies_go_back_to_the_mesh_only():
    sw = vmbr0()
    syn = ipv4(MESH_PORT, MESH_HOST, C100, MESH_IP, C100_IP, "tcp", 40000, 22)
    result = send(sw, syn)
    assert result.outputs == [(P100, syn)]
    synack = syn.reply(P100, src_mac=C100)
    synack = replace(synack, eth_dst=GATEWAY)  # the mesh host is off-subnet
    result = send(sw, synack)
    assert result.outputs == [(MESH_PORT, replace(synack, eth_dst=MESH_HOST))]
    assert to(sw, replace(syn, tcp_src=40000)) == {P100}  # the ACK
    # the container opening its own connection to the same mesh host: WARP only
    own = ipv4(P100, C100, GATEWAY, C100_IP, MESH_IP, "tcp", 41000, 22)
    result = send(sw, own)
    assert result.outputs == [(WARP_PORT, own)]


def test_mesh_to_undeclared_privacy_container_after_it_was_learned():
    sw = vmbr0()
    syn = ipv4(MESH_PORT, MESH_HOST, C102, MESH_IP, C102_IP, "tcp", 40000, 22)
    assert P102 not in to(sw, syn)  # unknown privacy MAC: service switching, never privacy
    send(sw, arp_request(P102, C102, C102_IP, GATEWAY_IP))
    assert to(sw, syn) == {P102}
    assert to(sw, replace(syn.reply(P102, src_mac=C102), eth_dst=GATEWAY)) == {MESH_PORT}


def test_service_containers_flood_and_learn():
    sw = vmbr0()
    privacy_and_others = {P100, P102, WARP_PORT, UNKNOWN}
    # ARP for a known service address is answered by the switch, back to the asker only
    answer = send(sw, arp_request(S200, M200, M200_IP, M201_IP))
    assert answer.ports == {S200}
    (reply,) = answer.on(S200)
    assert (reply.arp_op, reply.arp_sha, reply.arp_spa, reply.eth_dst) == (2, M201, M201_IP, M200)
    assert to(sw, arp_request(S201, M201, M201_IP, M200_IP)) == {S201}
    # ARP for an unknown address floods to service ports and the mesh only
    assert to(sw, arp_request(S200, M200, M200_IP, "10.0.0.9")) == {S201, MESH_PORT}
    assert to(sw, ipv4(S200, M200, BROADCAST, M200_IP, "10.0.0.255", "udp", 1, 2)) == {6, 1}
    assert to(sw, ethernet(MESH_PORT, MESH_HOST)) == {S200, S201}
    ips = {M200: M200_IP, M201: M201_IP, MESH_HOST: MESH_IP}
    for src_port, src, dst in ((S200, M200, M201), (S201, M201, M200),
                               (S200, M200, MESH_HOST), (MESH_PORT, MESH_HOST, M200)):
        ports = to(sw, ipv4(src_port, src, dst, ips[src], ips[dst], "udp", 1, 2))
        assert len(ports) == 1 and not ports & privacy_and_others
    assert to(sw, ipv4(S200, M200, M201, M200_IP, M201_IP)) == {S201}
    assert to(sw, ipv4(S200, M200, C100, M200_IP, C100_IP)) == {S201, MESH_PORT}
    unknown = ipv4(S201, M201, "02:00:00:00:09:09", M201_IP, "10.0.0.9")
    assert to(sw, unknown) == {S200, MESH_PORT}


def test_containers_without_known_addresses_are_dropped_and_reported():
    sw = vmbr0(learned={})
    result = send(sw, arp_request(S200, M200, M200_IP, M201_IP))
    assert result.verdict == "drop" and len(result.packet_ins) == 1
    assert to(sw, ipv4(P102, C102, GATEWAY, C102_IP, "1.1.1.1")) == set()
    spoofed = ipv4(S200, M200, M201, "10.0.0.66", M201_IP)  # bound, but not its own IPv4
    assert to(vmbr0(), spoofed) == set()


def test_unknown_port_is_dropped():
    sw = vmbr0()
    assert to(sw, ethernet(UNKNOWN, A)) == set()
    assert to(sw, ipv4(UNKNOWN, A, C100, "10.0.0.7", C100_IP)) == set()
    assert to(sw, arp_request(UNKNOWN, A, "10.0.0.7", C100_IP)) == set()


# ---------------------------------------------------------------- IPv6 fields


V6A, V6B = "fd00::a", "fd00::b"


def test_ipv6_packets_match_addresses_label_ports_and_icmpv6():
    sw = Switch([
        flow(0, 30, eth_type=ETH_IPV6, ipv6_src=("fd00::", "ffff:ffff::"), ip_proto=6,
             tcp_dst=5432, actions=[Output(2)]),
        flow(0, 20, eth_type=ETH_IPV6, ipv6_dst=V6B, ipv6_label=(0x100, 0xFFF00),
             actions=[Output(3)]),
        flow(0, 10, eth_type=ETH_IPV6, ip_proto=58, icmpv6_type=128, icmpv6_code=0,
             actions=[Output(4)]),
        flow(0, 5, eth_type=0x800, actions=[Output(5)]),
    ])
    assert deliveries(sw, ipv6(1, A, B, V6A, V6B, "tcp", dport=5432)) == {2}
    assert deliveries(sw, ipv6(1, A, B, "fd01::a", V6B, "tcp", dport=5432)) == set()
    assert deliveries(sw, ipv6(1, A, B, "fd01::a", V6B, "udp", label=0x1FF)) == {3}
    assert deliveries(sw, ipv6(1, A, B, "fd01::a", V6B, "udp", label=0x200)) == set()
    assert deliveries(sw, ipv6(1, A, B, V6A, "fd00::c", "icmpv6")) == {4}
    assert deliveries(sw, ipv6(1, A, B, V6A, "fd00::c", "icmpv6", icmp_type=129)) == set()
    # an IPv4 flow never matches IPv6, and the other way round
    assert deliveries(sw, ipv4(1, A, B, "10.0.0.1", "10.0.0.2", "tcp", dport=5432)) == {5}


def test_ipv6_packets_are_canonical_and_reply_swaps():
    pkt = ipv6(1, A, B, "FD00:0:0::A", "fd00:0000::b", "icmpv6")
    assert (pkt.ipv6_src, pkt.ipv6_dst) == (V6A, V6B)
    back = pkt.reply(2)
    assert (back.ipv6_src, back.ipv6_dst, back.icmpv6_type) == (V6B, V6A, 129)
    with pytest.raises(FlowError):
        ipv6(1, A, B, "fd00::zz", V6B)
    with pytest.raises(FlowError):
        ipv6(1, A, B, V6A, V6B, label=1 << 20)  # the flow label is 20 bits


def test_neighbour_discovery_fields_match_only_their_messages():
    sw = Switch([
        flow(0, 30, eth_type=ETH_IPV6, ip_proto=58, icmpv6_type=135, ipv6_nd_target=V6B,
             ipv6_nd_sll=A, actions=[Output(2)]),
        flow(0, 20, eth_type=ETH_IPV6, ip_proto=58, icmpv6_type=136,
             ipv6_nd_target=("fd00::", "ffff::"), ipv6_nd_tll=B, actions=[Output(3)]),
        flow(0, 10, eth_type=ETH_IPV6, ip_proto=58, icmpv6_type=135, actions=[Output(4)]),
    ])
    ns = neighbor_solicit(1, A, V6A, V6B)
    assert (ns.eth_dst, ns.ipv6_dst) == ("33:33:ff:00:00:0b", "ff02::1:ff00:b")
    assert deliveries(sw, ns) == {2}
    assert deliveries(sw, neighbor_solicit(1, A, V6A, "fd00::c")) == {4}
    assert deliveries(sw, neighbor_solicit(1, A, "::", V6B, sll="")) == {4}  # DAD: no sll
    assert deliveries(sw, neighbor_solicit(1, C, V6A, V6B)) == {4}  # another sll
    assert deliveries(sw, neighbor_advert(2, B, V6B, A, V6A)) == {3}
    assert deliveries(sw, neighbor_advert(2, C, "fe80::c", A, V6A, tll=C)) == set()
    assert deliveries(sw, neighbor_advert(2, B, "fe80::b", A, V6A, target_ip="fd01::b")) == set()


def test_neighbour_discovery_prerequisites_like_ovs():
    nd = {"eth_type": ETH_IPV6, "ip_proto": 58}
    Switch([flow(0, 1, **nd, icmpv6_type=135, icmpv6_code=0, ipv6_nd_sll=A)])
    Switch([flow(0, 1, **nd, icmpv6_type=136, ipv6_nd_tll=A)])  # code 0 need not be matched
    for bad in (flow(0, 1, **nd, icmpv6_type=136, ipv6_nd_sll=A),  # sll is NS only
                flow(0, 1, **nd, icmpv6_type=135, ipv6_nd_tll=A),  # tll is NA only
                flow(0, 1, **nd, icmpv6_type=135, icmpv6_code=1, ipv6_nd_target=V6A),
                flow(0, 1, **nd, icmpv6_type=128, ipv6_nd_target=V6A),
                flow(0, 1, eth_type=0x800, ip_proto=58, icmpv6_type=135),
                flow(0, 1, eth_type=ETH_IPV6, ip_proto=1, icmpv4_type=8),
                flow(0, 1, eth_type=0x800, ipv6_src=V6A),
                flow(0, 1, eth_type=ETH_IPV6, icmpv6_type=(128, 0xF0)),  # not maskable
                flow(0, 1, eth_type=ETH_IPV6, ipv6_label=1 << 20)):
        with pytest.raises(FlowError):
            Switch([bad])


def test_ipv6_set_field_move_and_learn():
    learn = Learn(5, 10, 60, (
        LearnSpec("match", "0x86dd", "NXM_OF_ETH_TYPE[]"),
        LearnSpec("match", "NXM_NX_IPV6_SRC[]", "NXM_NX_IPV6_DST[]"),
        LearnSpec("load", "NXM_OF_IN_PORT[]", "NXM_NX_REG1[0..15]"),
    ))
    sw = Switch([
        flow(0, 20, in_port=1, eth_type=ETH_IPV6, actions=[
            learn, SetField("ipv6_src", V6B), SetField("ipv6_label", 0x12345),
            MoveField("NXM_NX_IPV6_DST[0..15]", "NXM_NX_REG3[0..15]"), Output(2)]),
        flow(0, 10, in_port=2, eth_type=ETH_IPV6, actions=[Resubmit(5), OutputReg("reg1")]),
        flow(5, 0),
    ])
    result = sw.process(ipv6(1, A, B, V6A, "fd00::1:2", "udp"))
    [(port, out)] = result.outputs
    assert (port, out.ipv6_src, out.ipv6_dst, out.ipv6_label) == (2, V6B, "fd00::1:2", 0x12345)
    (learned,) = sw.learned()
    assert learned.match == (("eth_type", ETH_IPV6), ("ipv6_dst", V6A))
    assert deliveries(sw, ipv6(2, B, A, V6B, V6A, "udp")) == {1}
    assert deliveries(sw, ipv6(2, B, A, V6B, "fd00::c", "udp")) == set()
