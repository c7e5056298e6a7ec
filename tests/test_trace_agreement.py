"""OVS's own evaluator agrees with ours: `ovs-appctl ofproto/trace` vs `PolicySimulator`.

The compiled flows of a policy (exactly `PolicySimulator(policy).flows`) are
loaded into a real Open vSwitch (netdev datapath, private instance in its own
namespace); for a matrix of first packets entering from the mesh (port 1) OVS
decides allow (output to the service port 2) or deny, and the deciding rule
is read off the policy_rules flow it matched (cookie -> the flow's reg2 load).
Both must equal `PolicySimulator.trace`.

ofproto/trace stops at a ct(table=...) recirculation unless told the
conntrack state of the recirculated packet: every path through vmbr0's flows
has exactly one (policy_entry, zone 2), so each trace gets exactly one
``--ct-next`` and the test checks that OVS did recirculate exactly once.

One OVS instance for the module; one bridge per flow set.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labs import netns as nsl
from labs.ovs_instance import OvsInstance
from topology.check import (
    CLIENT_PORT,
    MESH_MAC,
    MESH_PORT,
    SERVICE_PORT,
    UNKNOWN_MAC,
    PolicySimulator,
)
from topology.config import parse_host_config
from topology.flows import Binding, desired_state
from topology.model import Flow, Output, SetField, SetReg, flow
from topology.openflow import ETH_IPV6, FIELDS, IP_PROTOS
from topology.ovs_trace import OvsTrace, flow_spec, parse_dpif_show, parse_trace
from topology.pipeline import METER_RATES, REG_RULE, SOCKET_PIPELINE, ZONE_POLICY
from topology.policy import Policy, parse_policy
from topology.render import flows_text
from topology.simulate import (
    PACKET_FIELDS,
    Packet,
    Switch,
    ipv4,
    ipv6,
    neighbor_advert,
    neighbor_solicit,
)

pytestmark = pytest.mark.ovs

RULES_TABLE = SOCKET_PIPELINE["policy_rules"]
CONTAINER_MAC = "02:00:00:00:02:00"
ICMP_ECHO_REQUEST = 8

EXAMPLE_POLICY = """\
tiers:
  edge: {cidrs: [10.10.0.0/24]}
  app:  {cidrs: [10.20.0.0/24], internal: true}
  db:   {cidrs: [10.30.0.0/24], internal: true}
externals:
  tailnet: {cidrs: [100.64.0.0/10]}
policy:
  default: deny
  rules:
    - {name: web-in,   from: internet, to: edge, tcp: [443, 80]}
    - {name: edge-app, from: edge,     to: app,  tcp: [3000, 8080]}
    - {name: app-db,   from: app,      to: db,   tcp: [5432]}
    - {name: admin,    from: tailnet,  to: [edge, app], tcp: ["22", "9000-9010"]}
    - {name: no-ssh-db, from: any,     to: db,   tcp: [22], action: deny, log: true}
tests:
  - {from: 10.20.0.5, to: 10.30.0.9, tcp: 5432, expect: allow}
  - {from: 10.30.0.9, to: 10.20.0.5, tcp: 3000, expect: deny}
"""

# udp, icmp, port ranges, internal tiers, literal CIDRs, proto any, logged and
# silent denies, 3-clause conjunctions, and a default allow.
MIXED_POLICY = """\
tiers:
  web:   {cidrs: [10.1.0.0/24, 10.1.1.0/24]}
  svc:   {cidrs: [10.2.0.0/23], internal: true}
  vault: {cidrs: [10.3.0.0/24], internal: true}
externals:
  office: {cidrs: [198.51.100.0/24, 203.0.113.0/25]}
policy:
  default: allow
  rules:
    - {name: dns,           from: [web, svc], to: svc, udp: [53]}
    - {name: no-vault-ping, from: any, to: vault, icmp: true, action: deny, log: true}
    - {name: vault-api,     from: [svc, 10.9.9.9/32], to: vault, tcp: ["8200-8201"]}
    - {name: vault-rest,    from: any, to: vault, action: deny}
    - {name: office-hi,     from: office, to: [web, 192.0.2.0/28],
       tcp: ["1024-2047", 8443], udp: ["5000-5100"]}
    - {name: office-ping,   from: office, to: 192.0.2.0/28, icmp: true}
    - {name: quarantine,    from: [172.16.0.0/12, 192.168.7.7/32], to: any,
       action: deny, log: true}
    - {name: no-telnet,     from: any, to: web, tcp: [23], udp: [23], action: deny}
    - {name: syslog,        from: web, to: 10.50.0.0/16, udp: true}
    - {name: mgmt,          from: 192.0.2.0/24, to: svc, proto: any}
"""

Probe = tuple[str, str, str, int | None]  # src, dst, proto, destination port

EXAMPLE_MATRIX: list[Probe] = [
    ("8.8.8.8", "10.10.0.5", "tcp", 443),  # web-in (conjunctive)
    ("8.8.8.8", "10.10.0.5", "tcp", 80),
    ("255.255.255.254", "10.10.0.0", "tcp", 80),
    ("10.9.255.255", "10.10.0.255", "tcp", 443),
    ("10.10.1.0", "10.10.0.1", "tcp", 443),  # just outside edge: internet
    ("100.64.1.1", "10.10.0.5", "tcp", 443),  # tailnet is internet too
    ("8.8.8.8", "10.10.0.5", "tcp", 8080),  # default
    ("8.8.8.8", "10.10.0.5", "udp", 443),
    ("8.8.8.8", "10.10.0.5", "icmp", None),
    ("10.10.0.255", "10.10.0.1", "tcp", 443),  # edge -> edge is not internet
    ("10.10.0.7", "10.20.0.5", "tcp", 3000),  # edge-app
    ("10.10.0.7", "10.20.0.5", "tcp", 8080),
    ("10.10.0.7", "10.20.0.5", "tcp", 3001),
    ("10.10.0.7", "10.30.0.9", "tcp", 5432),
    ("10.20.0.5", "10.30.0.9", "tcp", 5432),  # app-db
    ("10.30.0.9", "10.20.0.5", "tcp", 3000),
    ("10.20.0.255", "10.20.0.1", "tcp", 3000),
    ("10.20.0.5", "10.10.0.5", "tcp", 443),
    ("10.20.0.5", "8.8.8.8", "tcp", 443),  # internal:app
    ("10.30.0.9", "1.1.1.1", "udp", 53),  # internal:db
    ("10.30.0.9", "100.64.0.1", "tcp", 22),
    ("10.30.0.0", "10.10.0.1", "icmp", None),
    ("100.64.0.1", "10.10.0.5", "tcp", 22),  # admin
    ("100.127.255.254", "10.20.0.5", "tcp", 9000),
    ("100.64.0.1", "10.20.0.5", "tcp", 9007),
    ("100.64.0.1", "10.20.0.5", "tcp", 9008),
    ("100.64.0.1", "10.20.0.5", "tcp", 9010),
    ("100.64.0.1", "10.20.0.5", "tcp", 8999),
    ("100.64.0.1", "10.20.0.5", "tcp", 9011),
    ("100.128.0.1", "10.10.0.5", "tcp", 22),
    ("100.64.0.1", "10.10.0.5", "udp", 22),
    ("100.64.0.1", "10.30.0.9", "tcp", 22),  # no-ssh-db (logged)
    ("10.20.0.5", "10.30.0.9", "tcp", 22),
    ("10.10.0.0", "10.30.0.255", "tcp", 22),
    ("8.8.8.8", "10.30.0.9", "tcp", 5432),
]

MIXED_MATRIX: list[Probe] = [
    ("10.1.0.5", "10.2.1.9", "udp", 53),  # dns
    ("10.2.0.1", "10.2.1.255", "udp", 53),
    ("10.1.0.5", "10.2.1.9", "tcp", 53),  # default allow
    ("8.8.8.8", "10.2.0.1", "udp", 53),
    ("10.2.0.9", "8.8.8.8", "udp", 53),  # internal:svc
    ("10.3.0.9", "1.1.1.1", "icmp", None),  # internal:vault
    ("10.3.0.9", "10.1.0.1", "tcp", 443),
    ("10.1.0.5", "10.3.0.5", "icmp", None),  # no-vault-ping
    ("10.2.0.5", "10.3.0.5", "tcp", 8200),  # vault-api
    ("10.2.1.5", "10.3.0.5", "tcp", 8201),
    ("10.9.9.9", "10.3.0.255", "tcp", 8201),
    ("10.2.0.5", "10.3.0.5", "tcp", 8202),  # vault-rest
    ("10.2.0.5", "10.3.0.5", "tcp", 8199),
    ("10.9.9.8", "10.3.0.5", "tcp", 8201),
    ("10.9.9.9", "10.3.0.5", "udp", 8200),
    ("198.51.100.7", "10.1.1.200", "tcp", 1024),  # office-hi
    ("198.51.100.7", "10.1.0.1", "tcp", 2047),
    ("198.51.100.7", "10.1.0.1", "tcp", 2048),
    ("198.51.100.7", "10.1.0.1", "tcp", 1023),
    ("203.0.113.127", "192.0.2.15", "udp", 5000),
    ("203.0.113.1", "192.0.2.0", "udp", 5100),
    ("203.0.113.1", "192.0.2.0", "udp", 5101),
    ("203.0.113.1", "192.0.2.0", "tcp", 5000),
    ("203.0.113.128", "192.0.2.15", "udp", 5000),
    ("198.51.100.7", "192.0.2.16", "tcp", 8443),
    ("198.51.100.255", "192.0.2.3", "tcp", 8443),
    ("198.51.100.7", "192.0.2.1", "icmp", None),  # office-ping
    ("198.51.100.7", "10.1.0.1", "icmp", None),
    ("172.16.5.5", "10.1.0.1", "tcp", 443),  # quarantine
    ("172.31.255.255", "10.2.0.1", "udp", 53),
    ("172.16.5.5", "10.3.0.1", "icmp", None),
    ("192.168.7.7", "8.8.8.8", "icmp", None),
    ("192.168.7.8", "8.8.8.8", "icmp", None),
    ("8.8.8.8", "10.1.0.1", "tcp", 23),  # no-telnet (silent)
    ("8.8.8.8", "10.1.1.1", "udp", 23),
    ("8.8.8.8", "10.1.0.1", "tcp", 24),
    ("10.1.0.9", "10.50.3.3", "udp", 514),  # syslog
    ("10.1.0.9", "10.50.3.3", "tcp", 514),
    ("192.0.2.200", "10.2.1.1", "icmp", None),  # mgmt
    ("192.0.2.200", "10.2.1.1", "tcp", 22),
    ("192.0.2.200", "10.2.1.1", "udp", 53),
]

POLICIES = {"example": (EXAMPLE_POLICY, EXAMPLE_MATRIX), "mixed": (MIXED_POLICY, MIXED_MATRIX)}

# Connections the mesh opens and the policy allows; their replies leave the
# service container (port 2) towards the mesh (port 1).
REPLY_PROBES: dict[str, list[Probe]] = {
    "example": [("8.8.8.8", "10.10.0.5", "tcp", 443), ("10.20.0.5", "10.30.0.9", "tcp", 5432)],
    "mixed": [("10.1.0.5", "10.2.1.9", "udp", 53), ("198.51.100.7", "192.0.2.1", "icmp", None),
              ("8.8.8.8", "10.1.0.1", "tcp", 443)],
}


# ---------------------------------------------------------------- OVS side


@dataclass
class Bridge:
    ovs: OvsInstance
    name: str
    dp_ports: dict[int, int]  # OpenFlow port -> datapath port
    rule_of_cookie: dict[int, int]  # policy_rules flow cookie -> rule id it loads into reg2

    def trace(self, spec: str, ct_next: list[str]) -> OvsTrace:
        args = ["ofproto/trace", self.name, spec]
        for flags in ct_next:
            args += ["--ct-next", flags]
        trace = parse_trace(self.ovs.appctl(*args))
        recircs = trace.text.count("resume conntrack with ct_state=")
        assert recircs == len(ct_next), (
            f"expected {len(ct_next)} ct recirculation(s), OVS did {recircs}:\n{trace.text}")
        return trace

    def decision(self, trace: OvsTrace, out_port: int) -> tuple[str, int | None]:
        """(allow|deny, rule id or None if policy_rules was not consulted).

        allow iff some pass outputs to ``out_port``.
        """
        verdict = "allow" if self.dp_ports[out_port] in trace.output_dp_ports() else "deny"
        hits = trace.hits_in(RULES_TABLE)
        if not hits:
            return verdict, None
        assert len(hits) == 1, f"policy_rules looked up {len(hits)} times:\n{trace.text}"
        hit = hits[0]
        assert hit.cookie in self.rule_of_cookie, f"not a rule flow: {hit}\n{trace.text}"
        rule_id = self.rule_of_cookie[hit.cookie]
        loaded = dict(hit.loads).get(REG_RULE)
        assert loaded == rule_id, f"cookie says rule {rule_id}, trace loads {loaded}:\n{trace.text}"
        return verdict, rule_id


def rule_cookies(flows: frozenset[Flow]) -> dict[int, int]:
    return {
        f.cookie: a.value
        for f in flows if f.table == RULES_TABLE
        for a in f.actions if isinstance(a, SetReg) and a.reg == REG_RULE
    }


def packet_spec(pkt: Packet, ct_mark: int | None = None, ct_label: int | None = None) -> str:
    """The ofproto/trace flow of ``pkt``; ct_mark/ct_label: of its connection, if any."""
    proto = {1: "icmp", 6: "tcp", 17: "udp"}[pkt.ip_proto or 0]
    fields: list[tuple[str, object]] = [
        (proto, None), ("in_port", pkt.in_port), ("dl_src", pkt.eth_src),
        ("dl_dst", pkt.eth_dst), ("nw_src", pkt.ipv4_src), ("nw_dst", pkt.ipv4_dst),
    ]
    if proto == "icmp":
        fields += [("icmp_type", pkt.icmpv4_type), ("icmp_code", pkt.icmpv4_code)]
    else:
        fields += [(f"{proto}_src", getattr(pkt, f"{proto}_src")),
                   (f"{proto}_dst", getattr(pkt, f"{proto}_dst"))]
    if ct_mark is not None:
        fields.append(("ct_mark", hex(ct_mark)))
    if ct_label is not None:
        fields.append(("ct_label", hex(ct_label)))
    return flow_spec(fields)


def first_packet(src: str, dst: str, proto: str, port: int | None) -> Packet:
    """The packet `PolicySimulator.trace` sends in from the mesh."""
    return ipv4(MESH_PORT, MESH_MAC, UNKNOWN_MAC, src, dst, proto,  # type: ignore[arg-type]
                sport=CLIENT_PORT, dport=port or 0, icmp_type=ICMP_ECHO_REQUEST)


@pytest.fixture(scope="module")
def ovs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OvsInstance]:
    """One private OVS in a fresh namespace for the whole module (as conftest's fixtures)."""
    uid = secrets.token_hex(3)
    ns = nsl.create_netns(f"sn{uid}tr")
    inst = OvsInstance(f"trace{uid}", Path(tmp_path_factory.mktemp(f"ovs{uid}")) / "ovs",
                       netns=ns)
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
        nsl.delete_netns(ns, kill_procs=True)


@pytest.fixture(scope="module")
def make_bridge(
    ovs: OvsInstance, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, frozenset[Flow]], Bridge]:
    """``make(tag, flows)``: a secure netdev bridge, ports 1 and 2, meters, ``flows`` loaded."""
    tmp = tmp_path_factory.mktemp("flows")
    made: list[str] = []

    def make(tag: str, flows: frozenset[Flow]) -> Bridge:
        n = len(made)
        br = f"tr{n}{tag}"[:15]
        p1, p2 = f"tr{n}m", f"tr{n}s"
        ovs.vsctl(
            "add-br", br, "--", "set", "bridge", br, "datapath_type=netdev", "fail_mode=secure",
            "protocols=OpenFlow13,OpenFlow14",
            "--", "add-port", br, p1,
            "--", "set", "interface", p1, "type=internal", f"ofport_request={MESH_PORT}",
            "--", "add-port", br, p2,
            "--", "set", "interface", p2, "type=internal", f"ofport_request={SERVICE_PORT}",
        )  # fmt: skip
        made.append(br)
        assert ovs.ofport(p1) == MESH_PORT and ovs.ofport(p2) == SERVICE_PORT
        mgmt = ovs.mgmt(br)
        for meter, rate in sorted(METER_RATES.items()):
            ovs.ofctl("add-meter", mgmt,
                      f"meter={meter},pktps,burst,band=type=drop,rate={rate},burst_size={rate}")
        path = tmp / f"{br}.flows"
        path.write_text(flows_text(flows))
        ovs.ofctl("add-flows", mgmt, str(path))
        assert len(ovs.dump_flows(br)) == len(flows), "OVS did not keep every flow"
        dp = parse_dpif_show(ovs.appctl("dpif/show"))[br]
        return Bridge(ovs, br, dp, rule_cookies(flows))

    return make


# ---------------------------------------------------------------- the matrix


@pytest.fixture(scope="module", params=sorted(POLICIES))
def loaded(request: pytest.FixtureRequest,
           make_bridge: Callable[[str, frozenset[Flow]], Bridge]
           ) -> tuple[str, Policy, PolicySimulator, Bridge]:
    name = request.param
    policy = parse_policy(POLICIES[name][0], f"<{name}>")
    sim = PolicySimulator(policy)
    return name, policy, sim, make_bridge(name, sim.flows)


def test_matrix_covers_every_rule_and_outcome(loaded) -> None:
    name, policy, sim, _ = loaded
    probes = POLICIES[name][1]
    decided = {sim.trace(*p).rule for p in probes}
    assert decided == {r.name for r in policy.rules} | {"default"}
    assert {sim.trace(*p).verdict for p in probes} == {"allow", "deny"}


def test_ovs_trace_agrees_with_simulator(loaded) -> None:
    name, policy, sim, bridge = loaded
    probes = list(POLICIES[name][1])
    probes += [(str(t.src), str(t.dst), t.proto, t.port) for t in policy.tests]
    disagreements = []
    for probe in probes:
        ours = sim.trace(*probe)
        pkt = first_packet(*probe)
        trace = bridge.trace(packet_spec(pkt), ["trk,new"])
        verdict, rule_id = bridge.decision(trace, SERVICE_PORT)
        rule = policy.rule_by_id(rule_id) if rule_id else None
        theirs = (verdict, rule.name if rule else "default")
        if theirs != (ours.verdict, ours.rule):
            ref = policy.verdict(*probe)
            disagreements.append(
                f"{probe}: OVS {theirs} (datapath: {trace.final_actions}), simulator "
                f"{(ours.verdict, ours.rule)}, reference {(ref.verdict, ref.rule)}\n"
                f"--- simulator ---\n" + "\n".join(ours.tables) +
                f"\n--- ofproto/trace {packet_spec(pkt)} ---\n{trace.text}")
    assert not disagreements, f"{len(disagreements)}/{len(probes)} packets disagree:\n" + \
        "\n\n".join(disagreements)
    assert len(probes) >= 30


# ---------------------------------------------------------------- replies


def _sim_decision(switch: Switch, pkt: Packet, out_port: int) -> tuple[str, int | None]:
    """(allow|deny, rule id or None if policy_rules was not consulted) from our simulator."""
    result = switch.process(pkt)
    rule_id = None
    for step in result.trace:
        if step.table == RULES_TABLE and step.flow is not None:
            rule_id = next(a.value for a in step.flow.actions
                           if isinstance(a, SetReg) and a.reg == REG_RULE)
    return ("allow" if out_port in result.ports else "deny"), rule_id


def bound_flows(policy: Policy, ip: str) -> frozenset[Flow]:
    """vmbr0's flows as in `PolicySimulator`, but the container's addresses are known
    (its MAC and ``ip``, the address the probe opens a connection to): its replies pass
    spoof_guard. (A MAC alone allows no IP source, issue 11.)"""
    host = parse_host_config("bridges: {mesh: {}, socket: {}}\n")
    ports = {"vmbr0": {"from-mesh": MESH_PORT, "veth200": SERVICE_PORT}}
    return desired_state(host, ports, policy,
                         learned={"veth200": Binding(CONTAINER_MAC, ip)})["vmbr0"]


def committed(trace: OvsTrace, before: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(ct_mark, ct_label) of the policy zone's connection after this trace's commit.

    ofproto/trace keeps no connections: what a trace commits is carried into the
    next trace of the same connection by hand (as ct_mark/ct_label of its flow).
    """
    commits = [c for c in trace.ct_commits() if c.zone == ZONE_POLICY]
    assert len(commits) == 1, f"expected one commit in zone {ZONE_POLICY}:\n{trace.text}"
    return commits[0].applied(*before)


@pytest.mark.parametrize("name", sorted(REPLY_PROBES))
def test_replies_of_allowed_connections(name: str, make_bridge) -> None:
    """A reply (+est+rpl) passes policy_state without the rules; without the connection
    it is evaluated like any first packet (and, with a default deny, dropped)."""
    policy = parse_policy(POLICIES[name][0], f"<{name}>")
    for i, probe in enumerate(REPLY_PROBES[name]):
        flows = bound_flows(policy, probe[1])
        bridge = make_bridge(f"{name}r{i}", flows)
        fwd = first_packet(*probe)
        reply = fwd.reply(SERVICE_PORT, src_mac=CONTAINER_MAC)
        sim = Switch(flows, ports={MESH_PORT, SERVICE_PORT})
        allowed_by = _sim_decision(sim, fwd, SERVICE_PORT)
        assert allowed_by[0] == "allow", probe

        # OVS: the first packet commits the connection, the rule id in ct_label
        trace = bridge.trace(packet_spec(fwd), ["trk,new"])
        assert bridge.decision(trace, SERVICE_PORT) == allowed_by, trace.text
        mark, label = committed(trace)
        assert label & 0xFFFFFFFF == allowed_by[1], trace.text

        # its reply: no rule consulted, out to the mesh
        assert _sim_decision(sim, reply, MESH_PORT) == ("allow", None), probe
        trace = bridge.trace(packet_spec(reply, mark, label), ["trk,est,rpl"])
        assert bridge.decision(trace, MESH_PORT) == ("allow", None), f"{probe}:\n{trace.text}"

        # the same packet without the connection: an ICMP echo reply cannot open one
        # (conntrack: +inv, dropped unevaluated); TCP/UDP are evaluated like any first
        # packet (with the example's default deny: dropped)
        fresh = Switch(flows, ports={MESH_PORT, SERVICE_PORT})
        ours = _sim_decision(fresh, reply, MESH_PORT)
        unsolicited = probe[2] == "icmp"
        trace = bridge.trace(packet_spec(reply), ["trk,inv" if unsolicited else "trk,new"])
        assert bridge.decision(trace, MESH_PORT) == ours, f"{probe}:\n{trace.text}"
        if unsolicited:
            assert ours == ("deny", None), probe
            continue
        ref = policy.verdict(reply.ipv4_src or "", reply.ipv4_dst or "", probe[2],
                             reply.tcp_dst or reply.udp_dst)
        assert ours == (ref.verdict, ref.rule_id), probe
        if policy.default == "deny":
            assert ours == ("deny", 0), probe


def test_a_new_deny_cuts_a_live_connection_and_a_new_allow_restores_it(make_bridge) -> None:
    """Policy change on a live connection, step by step in both evaluators."""
    before = parse_policy(EXAMPLE_POLICY)
    after = parse_policy("\n".join(line for line in EXAMPLE_POLICY.splitlines()
                                   if "web-in" not in line))
    flows_before, flows_after = bound_flows(before, "10.10.0.5"), bound_flows(after, "10.10.0.5")
    br_before, br_after = make_bridge("cutA", flows_before), make_bridge("cutB", flows_after)
    fwd = first_packet("8.8.8.8", "10.10.0.5", "tcp", 443)
    reply = fwd.reply(SERVICE_PORT, src_mac=CONTAINER_MAC)
    web_in = next(r.rule_id for r in before.rules if r.name == "web-in")
    sim = Switch(flows_before, ports={MESH_PORT, SERVICE_PORT})
    steps: list[tuple[str, Bridge, Packet, str, int, tuple[str, int | None]]] = [
        ("open", br_before, fwd, "trk,new", SERVICE_PORT, ("allow", web_in)),
        ("reply", br_before, reply, "trk,est,rpl", MESH_PORT, ("allow", None)),
        ("after the change", br_after, fwd, "trk,est", SERVICE_PORT, ("deny", 0)),
        ("reply of the cut connection", br_after, reply, "trk,est,rpl", MESH_PORT,
         ("deny", None)),
        ("rule back", br_before, fwd, "trk,est", SERVICE_PORT, ("allow", web_in)),
        ("reply again", br_before, reply, "trk,est,rpl", MESH_PORT, ("allow", None)),
    ]
    conn = (0, 0)  # (ct_mark, ct_label) of the connection, as OVS's commits left it
    for what, bridge, pkt, ct, out_port, want in steps:
        sim.replace_flows(flows_before if bridge is br_before else flows_after)
        assert _sim_decision(sim, pkt, out_port) == want, f"simulator, {what}"
        spec = packet_spec(pkt, *conn) if "est" in ct else packet_spec(pkt)
        trace = bridge.trace(spec, [ct])
        assert bridge.decision(trace, out_port) == want, f"OVS, {what}:\n{trace.text}"
        if trace.ct_commits():
            conn = committed(trace, conn)


# ---------------------------------------------------------------- IPv6 fields

V6A, V6B = "fd00::a", "fd00::b"
MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
_V6 = {"eth_type": ETH_IPV6}
_ICMP6 = {**_V6, "ip_proto": IP_PROTOS["icmpv6"]}
IPV6_FLOWS = frozenset([
    flow(0, 60, **_V6, ipv6_src=("fd00::", "ffff:ffff::"), ip_proto=6, tcp_dst=5432,
         actions=[Output(SERVICE_PORT)]),
    flow(0, 50, **_V6, ipv6_dst=V6B, ipv6_label=(0x100, 0xFFF00), actions=[Output(SERVICE_PORT)]),
    flow(0, 40, **_ICMP6, icmpv6_type=128, icmpv6_code=0, actions=[Output(SERVICE_PORT)]),
    flow(0, 35, **_ICMP6, icmpv6_type=135, ipv6_nd_target=V6B, ipv6_nd_sll=MAC_A,
         actions=[Output(SERVICE_PORT)]),
    flow(0, 34, **_ICMP6, icmpv6_type=136, ipv6_nd_target=("fd00::", "ffff::"),
         ipv6_nd_tll=MAC_B, actions=[Output(SERVICE_PORT)]),
    flow(0, 30, **_ICMP6, icmpv6_type=135, actions=[SetField("ipv6_label", 7),
                                                    Output(SERVICE_PORT)]),
    flow(0, 5, eth_type=0x800, actions=[Output(SERVICE_PORT)]),
    flow(0, 0),
])
IPV6_PACKETS = [
    ipv6(MESH_PORT, MAC_A, MAC_B, V6A, V6B, "tcp", dport=5432),
    ipv6(MESH_PORT, MAC_A, MAC_B, "fd01::a", V6B, "tcp", dport=5432),
    ipv6(MESH_PORT, MAC_A, MAC_B, "fd01::a", V6B, "udp", label=0x1FF),
    ipv6(MESH_PORT, MAC_A, MAC_B, "fd01::a", V6B, "udp", label=0x200),
    ipv6(MESH_PORT, MAC_A, MAC_B, V6A, "fd00::c", "icmpv6"),
    ipv6(MESH_PORT, MAC_A, MAC_B, V6A, "fd00::c", "icmpv6", icmp_type=129),
    neighbor_solicit(MESH_PORT, MAC_A, V6A, V6B),
    neighbor_solicit(MESH_PORT, MAC_A, V6A, "fd00::c"),
    neighbor_solicit(MESH_PORT, MAC_A, "::", V6B, sll=""),
    neighbor_solicit(MESH_PORT, MAC_C, V6A, V6B),
    neighbor_advert(MESH_PORT, MAC_B, V6B, MAC_A, V6A),
    neighbor_advert(MESH_PORT, MAC_C, "fe80::c", MAC_A, V6A, tll=MAC_C),
    neighbor_advert(MESH_PORT, MAC_B, "fe80::b", MAC_A, V6A, target_ip="fd01::b"),
    ipv4(MESH_PORT, MAC_A, MAC_B, "10.0.0.1", "10.0.0.2"),
]


def any_packet_spec(pkt: Packet) -> str:
    """The ofproto/trace flow of any simulated packet, every header it carries spelled as
    `topology.render` spells matches (prerequisites come first in `PACKET_FIELDS`)."""
    fields: list[tuple[str, object]] = []
    for name in PACKET_FIELDS:
        value = getattr(pkt, name)
        if value is not None:
            fields.append((FIELDS[name].ofctl, hex(value) if name == "eth_type" else value))
    return flow_spec(fields)


def test_ipv6_field_matches_agree_with_ofproto_trace(make_bridge) -> None:
    """The simulator's matching on the IPv6, ICMPv6 and neighbour discovery fields is
    OVS's: the same flow (by cookie) for every packet."""
    bridge = make_bridge("v6", IPV6_FLOWS)
    sim = Switch(IPV6_FLOWS, ports={MESH_PORT, SERVICE_PORT})
    seen = set()
    for pkt in IPV6_PACKETS:
        trace = bridge.trace(any_packet_spec(pkt), [])
        ours = sim.process(pkt)
        theirs = [h.cookie for h in trace.hits if h.table == 0]
        assert theirs == [ours.trace[0].cookie], (
            f"{any_packet_spec(pkt)}: OVS {theirs}, simulator {ours.trace[0].flow}\n{trace.text}")
        sent = bridge.dp_ports[SERVICE_PORT] in trace.output_dp_ports()
        assert sent == (SERVICE_PORT in ours.ports), trace.text
        seen.add(ours.trace[0].cookie)
    assert seen == {f.cookie for f in IPV6_FLOWS}  # every flow was the answer once
