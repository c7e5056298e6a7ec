"""Tier policy: parsing and validation (file:line: reason), the compiler (conjunction
flow counts, port ranges as masks, priorities), stateful behaviour on the compiled
flows in the simulator (replies, a deny that cuts live connections), the CLI
(`socknet check`, `socknet trace --json`, `socknet graph`) and topology.graph.
Pure and fast: no OVS."""

from __future__ import annotations

import json
import random
import textwrap
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli import main
from topology.check import PolicySimulator, run_tests
from topology.config import parse_host_config
from topology.flows import desired_state
from topology.graph import policy_graph, to_dot, to_mermaid
from topology.model import Conjunction, Flow, SetReg
from topology.pipeline import REG_RULE, SOCKET_PIPELINE
from topology.policy import (
    Policy,
    PolicyError,
    PortRange,
    Service,
    load_policy,
    parse_policy,
)
from topology.policy_compile import (
    _compile,
    clear_caches,
    compile_policy,
    port_prefixes,
    rule_flow_count,
    rule_priority,
)
from topology.simulate import Packet, Result, Switch, ipv4, ties

RULES_TABLE = SOCKET_PIPELINE["policy_rules"]

ISSUE_EXAMPLE = """\
tiers:                       # named sets of addresses
  edge: {cidrs: [10.10.0.0/24]}
  app:  {cidrs: [10.20.0.0/24], internal: true}   # internal: may not reach outside addresses
  db:   {cidrs: [10.30.0.0/24], internal: true}
externals:                   # named outside address sets
  tailnet: {cidrs: [100.64.0.0/10]}
policy:
  default: deny
  rules:                     # first match wins, in file order
    - {name: web-in,   from: internet, to: edge, tcp: [443, 80]}
    - {name: edge-app, from: edge,     to: app,  tcp: [3000, 8080]}
    - {name: app-db,   from: app,      to: db,   tcp: [5432]}
    - {name: admin,    from: tailnet,  to: [edge, app], tcp: ["22", "9000-9010"]}
    - {name: no-ssh-db, from: any,     to: db,   tcp: [22], action: deny, log: true}
tests:                       # checked before a policy is accepted
  - {from: 10.20.0.5, to: 10.30.0.9, tcp: 5432, expect: allow}
  - {from: 10.30.0.9, to: 10.20.0.5, tcp: 3000, expect: deny}
"""

BASE = """\
tiers:
  a: {cidrs: [10.0.1.0/24]}
  b: {cidrs: [10.0.2.0/24]}
  c: {cidrs: [10.0.3.0/24], internal: true}
externals:
  tailnet: {cidrs: [100.64.0.0/10]}
policy:
  default: deny
  rules:
"""


BASE_OK = BASE + "    - {name: ab, from: a, to: b, tcp: [80]}\n"


def policy_of(rules: str = "", tests: str = "", base: str = BASE) -> Policy:
    return parse_policy(base + textwrap.indent(textwrap.dedent(rules), "    ") + tests,
                        "p.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return info.value.problems


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------ parsing


def test_issue_example_parses_with_implicit_internal_rules_first():
    p = parse_policy(ISSUE_EXAMPLE, "policy.yaml")
    assert list(p.tiers) == ["edge", "app", "db"]
    assert p.internal == frozenset({"app", "db"})
    assert [r.name for r in p.rules] == ["internal:app", "internal:db", "web-in", "edge-app",
                                         "app-db", "admin", "no-ssh-db"]
    assert [r.rule_id for r in p.rules] == [60000, 60001, 1, 2, 3, 4, 5]
    admin = p.rules[5]
    assert admin.services == (Service("tcp", (PortRange(22, 22), PortRange(9000, 9010))),)
    assert admin.src.names == ("tailnet",) and admin.dst.names == ("edge", "app")
    assert admin.line == 13
    assert p.rules[-1].action == "deny" and p.rules[-1].log
    assert [(t.expect, t.line) for t in p.tests] == [("allow", 16), ("deny", 17)]
    assert p.source == "policy.yaml"


@pytest.mark.parametrize(("src", "dst", "proto", "port", "verdict", "rule"), [
    ("203.0.113.9", "10.10.0.5", "tcp", 443, "allow", "web-in"),
    ("203.0.113.9", "10.10.0.5", "tcp", 22, "deny", "default"),
    ("10.10.0.5", "10.20.0.7", "tcp", 8080, "allow", "edge-app"),
    ("10.20.0.7", "10.30.0.9", "tcp", 5432, "allow", "app-db"),
    ("10.30.0.9", "10.20.0.7", "tcp", 3000, "deny", "default"),
    ("100.100.0.1", "10.20.0.7", "tcp", 9010, "allow", "admin"),
    ("100.100.0.1", "10.20.0.7", "tcp", 9011, "deny", "default"),
    ("10.10.0.5", "10.30.0.9", "tcp", 22, "deny", "no-ssh-db"),
    ("10.20.0.7", "8.8.8.8", "udp", 53, "deny", "internal:app"),
    ("10.20.0.7", "100.100.0.1", "icmp", None, "deny", "internal:app"),
])
def test_verdicts_direct_and_compiled(src, dst, proto, port, verdict, rule):
    p = parse_policy(ISSUE_EXAMPLE)
    direct = p.verdict(src, dst, proto, port)
    traced = PolicySimulator(p).trace(src, dst, proto, port)
    assert (direct.verdict, direct.rule) == (verdict, rule)
    assert (traced.verdict, traced.rule, traced.rule_id) == (verdict, rule, direct.rule_id)


def test_protocols_lists_literal_cidrs_and_any():
    p = policy_of("""\
        - {name: dns, from: [a, 10.9.0.0/16], to: b, udp: [53], tcp: ["53"]}
        - {name: ping, from: any, to: b, icmp: true}
        - {name: all-tcp, from: a, to: c, tcp: true}
        - {name: anything, from: tailnet, to: c, proto: any}
        """)
    dns, ping, all_tcp, anything = p.rules[1:]
    assert {s.proto for s in dns.services} == {"tcp", "udp"}
    assert str(dns.src) == "a,10.9.0.0/16"
    assert ping.src.is_any and ping.services == (Service("icmp"),)
    assert all_tcp.services == (Service("tcp"),)
    assert anything.services == ()
    assert p.verdict("10.9.1.1", "10.0.2.1", "udp", 53).rule == "dns"
    assert p.verdict("10.9.1.1", "10.0.2.1", "udp", 54).rule == "default"
    assert p.verdict("1.2.3.4", "10.0.2.1", "icmp").rule == "ping"
    assert p.verdict("10.0.1.1", "10.0.3.1", "tcp", 65535).rule == "all-tcp"
    assert p.verdict("10.0.1.1", "10.0.3.1", "udp", 1).rule == "default"
    assert p.verdict("100.64.0.1", "10.0.3.1", "udp", 1).rule == "anything"


def test_default_allow():
    p = policy_of("- {name: no-ssh, from: any, to: any, tcp: [22], action: deny}\n",
                  base=BASE.replace("default: deny", "default: allow"))
    assert p.verdict("10.0.1.1", "10.0.2.2", "tcp", 80).verdict == "allow"
    assert p.verdict("10.0.1.1", "10.0.2.2", "tcp", 22).rule == "no-ssh"
    assert p.verdict("10.0.3.1", "1.1.1.1", "tcp", 80).rule == "internal:c"


def test_internet_is_everything_outside_the_tiers():
    p = policy_of("- {name: out, from: a, to: internet}\n")
    internet = p.rules[-1].dst
    for addr in ("0.0.0.0", "10.0.0.255", "10.0.4.0", "100.64.0.1", "255.255.255.255"):
        assert p.verdict("10.0.1.1", addr, "tcp", 1).rule == "out", addr
    for addr in ("10.0.1.0", "10.0.2.255", "10.0.3.7"):
        assert p.verdict("10.0.1.1", addr, "tcp", 1).rule == "default", addr
    assert len(internet.nets) < 40


# ------------------------------------------------------------------ errors: file:line: reason


def test_unknown_tier():
    msg = only_problem(BASE + "    - {name: x, from: a, to: dbb, tcp: [1]}\n")
    assert msg == "p.yaml:10: unknown tier or external 'dbb'"


def test_unknown_tier_in_a_list_names_its_line():
    text = BASE + "    - name: x\n      from: a\n      to:\n        - b\n        - nope\n"
    assert only_problem(text) == "p.yaml:14: unknown tier or external 'nope'"


@pytest.mark.parametrize(("cidr", "why"), [
    ("10.0.9.1/24", "has host bits set"),
    ("10.0.9.0/33", "not a valid netmask"),
    ("300.0.0.0/8", "bad CIDR"),
])
def test_bad_cidr_in_a_tier(cidr, why):
    msg = only_problem(BASE_OK.replace("10.0.2.0/24", cidr))
    assert msg.startswith(f"p.yaml:3: bad CIDR '{cidr}'") and why in msg


def test_bad_cidr_in_a_rule():
    assert only_problem(BASE + "    - {name: x, from: 10.0.0.1/8, to: a}\n") == \
        "p.yaml:10: bad CIDR '10.0.0.1/8'"


@pytest.mark.parametrize(("ports", "why"), [
    ("[0]", "port 0 out of range 1-65535"),
    ("[65536]", "port 65536 out of range 1-65535"),
    ('["90-80"]', "port range '90-80' is reversed"),
    ('["ssh"]', "'ssh' is not a port or a range like 9000-9010"),
    ('["1-2-3"]', "is not a port or a range"),
    ('["80-70000"]', "out of range 1-65535"),
    ("[]", "empty tcp port list (use tcp: true for all)"),
])
def test_bad_port_or_range(ports, why):
    msg = only_problem(BASE + f"    - {{name: x, from: a, to: b, tcp: {ports}}}\n")
    assert msg.startswith("p.yaml:10: ") and why in msg, msg


def test_bad_port_in_a_block_list_names_its_line():
    text = BASE + "    - name: x\n      from: a\n      to: b\n      udp:\n        - 53\n" \
        "        - 99999\n"
    assert only_problem(text) == "p.yaml:15: port 99999 out of range 1-65535"


def test_duplicate_rule_name():
    text = BASE + "    - {name: x, from: a, to: b, tcp: [1]}\n    - {name: x, from: b, to: a}\n"
    assert only_problem(text) == "p.yaml:11: duplicate rule name 'x'"


def test_shadowed_rule():
    text = BASE + ("    - {name: wide, from: any, to: b, tcp: [1-1000]}\n"
                   "    - {name: narrow, from: a, to: b, tcp: [80, 443]}\n")
    assert only_problem(text) == ("p.yaml:11: rule 'narrow' can never match: rule 'wide' "
                                  "(line 10) already decides every packet it covers")


def test_partly_covered_rule_is_accepted():
    policy_of("""\
        - {name: wide, from: any, to: b, tcp: [1-1000]}
        - {name: wider, from: a, to: b, tcp: [80, 1001]}
        - {name: udp-too, from: a, to: b, udp: [80]}
        - {name: any-proto, from: a, to: b}
        """)


def test_rule_from_an_internal_tier_to_outside_can_never_match():
    text = BASE + "    - {name: c-out, from: c, to: [tailnet, 8.8.8.8/32], tcp: [443]}\n"
    assert only_problem(text) == ("p.yaml:10: rule 'c-out' can never match: tier 'c' is "
                                  "internal and may not reach outside addresses")


def test_overlapping_tiers():
    text = BASE_OK.replace("b: {cidrs: [10.0.2.0/24]}", "b: {cidrs: [10.0.0.0/16]}")
    found = problems(text)
    assert "p.yaml:3: tier 'b' overlaps tier 'a': an address must belong to one tier" in found
    assert any("tier 'c' overlaps tier 'b'" in p and p.startswith("p.yaml:4:") for p in found)


@pytest.mark.parametrize(("text", "expected"), [
    (BASE_OK.replace("  b: {", "  internet: {").replace("to: b", "to: internet"),
     "p.yaml:3: tier name 'internet' is reserved (built in)"),
    (BASE_OK.replace("  tailnet: {", "  any: {"),
     "p.yaml:6: external name 'any' is reserved (built in)"),
    (BASE_OK.replace("  tailnet: {", "  a: {"),
     "p.yaml:6: external name 'a' is already used by a tier"),
    (BASE + "    - {name: default, from: a, to: b}\n",
     "p.yaml:10: rule name 'default' is reserved (the default and the implicit "
     "internal-tier rules are named so)"),
    (BASE + "    - {name: 'internal:a', from: a, to: b}\n",
     "p.yaml:10: rule name 'internal:a' is reserved (the default and the implicit "
     "internal-tier rules are named so)"),
])
def test_reserved_names(text, expected):
    assert only_problem(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    (BASE + "    - {name: x, from: a, to: b, port: 80}\n",
     "p.yaml:10: policy.rules.0.port: unknown key"),
    (BASE_OK.replace("  a: {cidrs: [10.0.1.0/24]}", "  a: {cidrs: [10.0.1.0/24], vlan: 3}"),
     "p.yaml:2: tiers.a.vlan: unknown key"),
    (BASE_OK + "rulez: []\n", "p.yaml:11: rulez: unknown key"),
    (BASE + "    - {name: x, from: a, to: b, action: reject}\n",
     "p.yaml:10: policy.rules.0.action: Input should be 'allow' or 'deny'"),
    (BASE_OK.replace("default: deny", "default: drop"),
     "p.yaml:8: policy.default: Input should be 'allow' or 'deny'"),
    (BASE + "    - {name: x, to: b}\n",
     "p.yaml:10: policy.rules.0.from: required field is missing"),
])
def test_unknown_keys_and_schema_errors(text, expected):
    assert only_problem(text) == expected


def test_several_problems_are_all_reported():
    text = BASE + ("    - {name: x, from: nope, to: b}\n"
                   "    - {name: y, from: a, to: b, tcp: [0]}\n"
                   "    - {name: y, from: a, to: c}\n")
    found = problems(text)
    assert [p.split(":")[1] for p in found] == ["10", "11", "12"]


TESTS_BASE = BASE + "    - {name: ab, from: a, to: b, tcp: [80]}\ntests:\n"


@pytest.mark.parametrize(("entry", "expected"), [
    ("{from: 10.0.1.1, to: 10.0.2.1, expect: allow}",
     "p.yaml:12: a test names exactly one of tcp: PORT, udp: PORT, icmp: true"),
    ("{from: 10.0.1.1, to: 10.0.2.1, tcp: 80, udp: 53, expect: allow}",
     "p.yaml:12: a test names exactly one of tcp: PORT, udp: PORT, icmp: true"),
    ("{from: a, to: 10.0.2.1, tcp: 80, expect: allow}",
     "p.yaml:12: test address 'a' is not an IPv4 address"),
    ("{from: 10.0.1.1, to: 10.0.2.1, tcp: 0, expect: allow}",
     "p.yaml:12: tests.0.tcp: port 0 out of range 1-65535"),
    ("{from: 10.0.1.1, to: 10.0.2.1, tcp: 80, expect: maybe}",
     "p.yaml:12: tests.0.expect: Input should be 'allow' or 'deny'"),
    ("{from: 10.0.1.1, to: 10.0.2.1, tcp: 80, expect: allow, rule: ba}",
     "p.yaml:12: test names unknown rule 'ba'"),
    ("{from: 10.0.1.1, to: 10.0.2.1, tcp: 80, expect: allow, rule: 'internal:a'}",
     "p.yaml:12: test names unknown rule 'internal:a'"),
    ("{from: 10.0.1.1, to: 10.0.2.1, tcp: 80, allow: true}",
     "p.yaml:12: tests.0.allow: unknown key"),
])
def test_bad_test_entries(entry, expected):
    assert expected in problems(TESTS_BASE + f"  - {entry}\n")


def test_tests_may_name_implicit_rules_and_the_default():
    p = parse_policy(TESTS_BASE + "  - {from: 10.0.3.1, to: 1.1.1.1, udp: 53, expect: deny, "
                     "rule: 'internal:c'}\n  - {from: 10.0.3.1, to: 10.0.1.1, icmp: true, "
                     "expect: deny, rule: default}\n", "p.yaml")
    assert [o.passed for o in run_tests(p)] == [True, True]


def test_yaml_syntax_error_and_unreadable_file(tmp_path: Path):
    assert only_problem("tiers:\n  a: {cidrs: [10.0.0.0/24]\n").startswith(
        "p.yaml:3: YAML syntax error")
    assert only_problem("- just a list\n") == \
        "p.yaml:1: expected a mapping with tiers, policy and tests"
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.yaml")
    assert info.value.problems[0].endswith("missing.yaml: cannot read: No such file or directory")


# ------------------------------------------------------------------ compiler


def _rule_flows(flows: frozenset[Flow], priority: int) -> list[Flow]:
    return [f for f in flows if f.table == RULES_TABLE and f.priority == priority]


def test_conjunction_grows_with_the_sum_not_the_product():
    srcs = [f"10.1.{2 * i}.0/24" for i in range(100)]  # not adjacent: nothing collapses
    dsts = [f"10.2.{2 * i}.0/24" for i in range(100)]
    ports = [1000 + 2 * k for k in range(10)]
    text = (BASE + f"    - name: big\n      from: {json.dumps(srcs)}\n"
            f"      to: {json.dumps(dsts)}\n      tcp: {ports}\n")
    p = parse_policy(text)
    big = p.rules[-1]
    flows = compile_policy(p)
    mine = _rule_flows(flows, rule_priority(len(p.rules) - 1))
    assert len(mine) == 100 + 100 + 10 + 1 == 211  # not 100 * 100 * 10 = 100,000
    clauses = [a for f in mine for a in f.actions if isinstance(a, Conjunction)]
    assert len(clauses) == 210 and {c.n_clauses for c in clauses} == {3}
    assert {c.id for c in clauses} == {big.rule_id}
    assert sorted(sum(1 for c in clauses if c.clause == k) for k in (1, 2, 3)) == [10, 100, 100]
    # the internal tier's implicit rule and the default make up the rest of the table
    assert rule_flow_count(flows) == 211 + len(_rule_flows(flows, rule_priority(0))) + 1
    sim = PolicySimulator(p)
    for src, dst, port in (("10.1.0.0", "10.2.0.0", 1000), ("10.1.198.255", "10.2.198.255", 1018),
                           ("10.1.100.7", "10.2.50.1", 1010)):
        assert sim.trace(src, dst, "tcp", port).rule == "big"
    for src, dst, port in (("10.1.1.0", "10.2.0.0", 1000), ("10.1.0.0", "10.2.199.0", 1000),
                           ("10.1.0.0", "10.2.0.0", 1001), ("10.1.200.0", "10.2.0.0", 1000)):
        assert sim.trace(src, dst, "tcp", port).rule == "default"


def test_small_rules_are_plain_flows():
    p = policy_of("""\
        - {name: one, from: a, to: b, tcp: [80]}
        - {name: two-by-two, from: [a, 10.9.0.0/16], to: [b, 10.8.0.0/16], tcp: [80]}
        - {name: anywhere, from: any, to: any, udp: [53, 123]}
        - {name: everything, from: tailnet, to: any}
        """)
    flows = compile_policy(p)
    counts = [len(_rule_flows(flows, rule_priority(i))) for i in range(1, 5)]
    assert counts == [1, 4, 2, 1]
    assert not any(isinstance(a, Conjunction) for f in flows for a in f.actions)


def _covered(prefixes: list[int | tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for v in prefixes:
        value, mask = (v, 0xFFFF) if isinstance(v, int) else v
        assert value & ~mask & 0xFFFF == 0, (value, mask)
        size = (~mask & 0xFFFF) + 1
        assert size & (size - 1) == 0 and mask == 0xFFFF & ~(size - 1), (value, mask)
        out.append((value, value + size - 1))
    return sorted(out)


def _minimal_count(lo: int, hi: int, base: int = 0, size: int = 1 << 16) -> int:
    """Fewest aligned blocks covering exactly [lo, hi]: split the binary trie."""
    end = base + size - 1
    if hi < base or end < lo:
        return 0
    if lo <= base and end <= hi:
        return 1
    half = size // 2
    return _minimal_count(lo, hi, base, half) + _minimal_count(lo, hi, base + half, half)


def test_port_ranges_become_exact_minimal_masks():
    rng = random.Random(20240601)
    cases = [(1, 65535), (1, 1), (65535, 65535), (1024, 65535), (1, 1023), (9000, 9010),
             (32767, 32768), (2, 65534), (80, 80), (0x8000, 0xFFFF)]
    for _ in range(3000):
        lo = rng.randint(1, 65535)
        hi = min(65535, lo + rng.choice((0, 1, 2, rng.randint(0, 300), rng.randint(0, 65535))))
        cases.append((lo, hi))
    for lo, hi in cases:
        prefixes = port_prefixes(PortRange(lo, hi))
        blocks = _covered(prefixes)
        assert blocks[0][0] == lo and blocks[-1][1] == hi, (lo, hi)
        assert all(a[1] + 1 == b[0] for a, b in zip(blocks, blocks[1:], strict=False)), (lo, hi)
        assert len(prefixes) == _minimal_count(lo, hi) <= 30, (lo, hi)
    assert port_prefixes(PortRange(1, 65535))[0] == 1
    assert port_prefixes(PortRange(80, 80)) == [80]
    assert port_prefixes(PortRange(9000, 9010)) == [(9000, 0xFFF8), (9008, 0xFFFE), 9010]


def test_port_range_verdicts_at_the_edges():
    p = policy_of("- {name: r, from: a, to: b, tcp: ['9000-9010', 8080], udp: ['1-1023']}\n")
    sim = PolicySimulator(p)
    for proto, port, rule in (("tcp", 8999, "default"), ("tcp", 9000, "r"), ("tcp", 9010, "r"),
                              ("tcp", 9011, "default"), ("tcp", 8080, "r"),
                              ("udp", 1, "r"), ("udp", 1023, "r"), ("udp", 1024, "default"),
                              ("udp", 9000, "default"), ("tcp", 1, "default")):
        assert sim.trace("10.0.1.1", "10.0.2.1", proto, port).rule == rule, (proto, port)


def test_priorities_follow_rule_order():
    p = policy_of("""\
        - {name: r1, from: a, to: b, tcp: [1, 2, 3], udp: [4, 5, 6]}
        - {name: r2, from: any, to: b, action: deny}
        - {name: r3, from: [a, b, 10.9.0.0/24, 10.9.2.0/24], to: [c, 10.8.0.0/24], tcp: [1-100]}
        - {name: r4, from: b, to: a}
        """)
    flows = compile_policy(p)
    by_rule: dict[int, set[int]] = {}
    for f in flows:
        if f.table != RULES_TABLE:
            continue
        for a in f.actions:
            if isinstance(a, SetReg) and a.reg == REG_RULE:
                by_rule.setdefault(a.value, set()).add(f.priority)
            if isinstance(a, Conjunction):
                by_rule.setdefault(a.id, set()).add(f.priority)
    order = [r.rule_id for r in p.rules]
    assert order == [60000, 1, 2, 3, 4]  # the implicit internal-tier rule first
    priorities = [by_rule[i] for i in order]
    assert all(len(s) == 1 for s in priorities)
    flat = [s.pop() for s in priorities]
    assert flat == sorted(flat, reverse=True) and len(set(flat)) == len(flat)
    assert by_rule[0] == {0}  # the default, below every rule


def test_no_policy_passes_everything_on():
    flows = compile_policy(None)
    assert rule_flow_count(flows) == 1


# ------------------------------------------------------------------ reloads: what is reused


def _cold(policy: Policy) -> frozenset[Flow]:
    clear_caches()
    return _compile(policy)


@pytest.mark.parametrize("edit", [
    ("tcp: [5432]", "tcp: [5433]"),  # one rule's ports
    ("no-ssh-db, from: any,     to: db,   tcp: [22], action: deny",
     "no-ssh-db, from: any,     to: db,   tcp: [22], action: allow"),  # one rule's action
    ("db:   {cidrs: [10.30.0.0/24]", "db:   {cidrs: [10.31.0.0/24]"),  # a tier used by 2 rules
    ("  rules:                     # first match wins, in file order\n",
     "  rules:\n    - {name: first, from: 10.1.2.3, to: edge, udp: [53]}\n"),  # all move down
    ("web-in,   from: internet", "web-in,   from: [tailnet, 10.99.0.0/16]"),
])
def test_a_reload_compiles_what_changed_and_equals_a_cold_compile(edit: tuple[str, str]):
    clear_caches()
    before = parse_policy(ISSUE_EXAMPLE, "p.yaml")
    old = compile_policy(before)
    assert edit[0] in ISSUE_EXAMPLE
    after = parse_policy(ISSUE_EXAMPLE.replace(edit[0], edit[1]), "p.yaml")
    new = compile_policy(after)
    assert new != old
    cold = _cold(after)
    assert new == cold
    assert {f.cookie for f in new} == {f.cookie for f in cold}
    assert sorted(f.note for f in new) == sorted(f.note for f in cold)


def test_a_reload_reuses_the_flows_of_unchanged_rules():
    clear_caches()
    before = parse_policy(ISSUE_EXAMPLE, "p.yaml")
    old = {f: f for f in compile_policy(before)}
    after = parse_policy(ISSUE_EXAMPLE.replace("tcp: [5432]", "tcp: [5433]"), "p.yaml")
    # the file rules' address sets come back: comparing and hashing them is identity
    assert [r.src for r in after.rules] == [r.src for r in before.rules]
    assert all(a.src is b.src and a.dst is b.dst
               for a, b in zip(after.rules, before.rules, strict=True) if not a.implicit)
    reused = changed = 0
    for f in compile_policy(after):
        if f.table != RULES_TABLE or f.priority == 0:
            continue
        if f in old and old[f] is f:
            reused += 1
        else:
            changed += 1
            assert "app-db" in f.note
    assert changed == 1 and reused > 0


def test_same_text_parses_to_equal_policies_and_shared_sides():
    clear_caches()
    a = parse_policy(ISSUE_EXAMPLE, "p.yaml")
    b = parse_policy(ISSUE_EXAMPLE, "p.yaml")
    first = next(k for k, r in enumerate(a.rules) if not r.implicit)
    assert a == b and a.rules[first].dst is b.rules[first].dst
    # a changed tier gives new sides for the rules that name it, equal to a cold parse
    text = ISSUE_EXAMPLE.replace("10.30.0.0/24", "10.30.0.0/23")
    warm = parse_policy(text, "p.yaml")
    clear_caches()
    assert warm == parse_policy(text, "p.yaml")
    assert IPv4Network("10.30.0.0/23") in warm.tiers["db"].nets


# ------------------------------------------------------------------ stateful, in the simulator

STATE_POLICY = """\
tiers:
  clients: {cidrs: [10.0.1.0/24]}
  servers: {cidrs: [10.0.2.0/24]}
policy:
  default: deny
  rules:
"""
ALLOW = """\
    - {name: db, from: clients, to: servers, tcp: [5432]}
    - {name: syslog, from: clients, to: servers, udp: [514]}
    - {name: ping, from: clients, to: servers, icmp: true}
"""
CUT = "    - {name: cut, from: 10.0.1.5/32, to: servers, action: deny, log: true}\n"
STATE_HOST = """\
bridges:
  mesh: {}
  socket: {}
containers:
  200: {mac: "02:00:00:00:02:00", ip: 10.0.2.9/24}
"""
MESH_PORT, SERVER_PORT = 1, 2
PORTS = {"vmbr0": {"from-mesh": MESH_PORT, "veth200": SERVER_PORT}}
CLIENT_MAC, SERVER_MAC = "02:00:00:00:ee:01", "02:00:00:00:02:00"
CLIENT, OTHER_CLIENT, SERVER = "10.0.1.5", "10.0.1.6", "10.0.2.9"


def _flows(policy_text: str) -> frozenset[Flow]:
    policy = parse_policy(policy_text)
    return desired_state(parse_host_config(STATE_HOST), PORTS, policy)["vmbr0"]


def _send(sw: Switch, pkt: Packet) -> Result:
    result = sw.process(pkt)
    assert not ties(result), result.describe()
    return result


def _request(proto: str = "tcp", client: str = CLIENT, dport: int = 5432,
             sport: int = 40000) -> Packet:
    return ipv4(MESH_PORT, CLIENT_MAC, SERVER_MAC, client, SERVER, proto,  # type: ignore[arg-type]
                sport=sport, dport=dport)


def _reply(request: Packet) -> Packet:
    return request.reply(SERVER_PORT)


@pytest.fixture
def switch() -> Switch:
    return Switch(_flows(STATE_POLICY + ALLOW), ports={MESH_PORT, SERVER_PORT})


@pytest.mark.parametrize(("proto", "dport"), [("tcp", 5432), ("udp", 514), ("icmp", 0)])
def test_replies_of_an_allowed_connection_pass(switch: Switch, proto: str, dport: int):
    req = _request(proto, dport=dport)
    assert _send(switch, req).ports == {SERVER_PORT}
    for _ in range(2):
        assert _send(switch, _reply(req)).ports == {MESH_PORT}
        assert _send(switch, req).ports == {SERVER_PORT}
    [conn] = switch.conntrack.connections()
    assert conn.seen_reply and conn.label == parse_policy(STATE_POLICY + ALLOW).verdict(
        CLIENT, SERVER, proto, dport or None).rule_id


def test_reverse_new_connections_are_denied(switch: Switch):
    req = _request()
    assert _send(switch, req).ports == {SERVER_PORT}
    # the server opens its own connection back: not a reply, evaluated and denied
    back = ipv4(SERVER_PORT, SERVER_MAC, CLIENT_MAC, SERVER, CLIENT, "tcp", sport=5432,
                dport=22)
    assert _send(switch, back).ports == set()
    # ... also on the client's own port, from another source port
    back = ipv4(SERVER_PORT, SERVER_MAC, CLIENT_MAC, SERVER, CLIENT, "tcp", sport=5433,
                dport=40000)
    assert _send(switch, back).ports == set()
    # a reply that was never asked for is not a reply
    lone = _reply(_request(sport=40001))
    assert _send(switch, lone).ports == set()
    # nor is a connection the policy never allowed (its first packet was dropped)
    ssh = _request(dport=22)
    assert _send(switch, ssh).ports == set()
    assert _send(switch, _reply(ssh)).ports == set()


def test_a_new_deny_cuts_an_established_connection(switch: Switch):
    req = _request()
    other = _request(client=OTHER_CLIENT)
    for pkt in (req, other):
        assert _send(switch, pkt).ports == {SERVER_PORT}
        assert _send(switch, _reply(pkt)).ports == {MESH_PORT}

    # the same switch, new flows, conntrack kept (what a reload does)
    switch.replace_flows(_flows(STATE_POLICY + CUT + ALLOW))
    assert len(switch.conntrack.connections()) == 2
    cut = _send(switch, req)
    assert cut.ports == set()  # its next packet is dropped ...
    assert cut.packet_ins  # ... and logged (log: true)
    conn = next(c for c in switch.conntrack.connections() if c.src == CLIENT)
    assert conn.mark & 1  # ct_mark: blocked
    assert _send(switch, _reply(req)).ports == set()  # replies drop too
    assert _send(switch, req).ports == set()
    # a connection the new deny does not forbid goes on
    assert _send(switch, other).ports == {SERVER_PORT}
    assert _send(switch, _reply(other)).ports == {MESH_PORT}

    # the deny removed again: the next packet in the original direction unblocks it
    switch.replace_flows(_flows(STATE_POLICY + ALLOW))
    assert _send(switch, _reply(req)).ports == set()  # still cut until then
    assert _send(switch, req).ports == {SERVER_PORT}
    assert _send(switch, _reply(req)).ports == {MESH_PORT}
    assert not next(c for c in switch.conntrack.connections() if c.src == CLIENT).mark & 1


def test_a_new_deny_cuts_a_connection_that_has_seen_no_reply_yet(switch: Switch):
    """A one-way UDP stream (syslog): committed, no reply yet. After the deny, the
    server may not use the old 5-tuple to reach the client either."""
    req = _request("udp", dport=514)
    assert _send(switch, req).ports == {SERVER_PORT}
    switch.replace_flows(_flows(STATE_POLICY + CUT + ALLOW))
    assert _send(switch, req).ports == set()
    assert _send(switch, _reply(req)).ports == set()


def test_a_denied_first_packet_leaves_no_connection(switch: Switch):
    switch.replace_flows(_flows(STATE_POLICY + CUT + ALLOW))
    assert _send(switch, _request()).ports == set()
    assert switch.conntrack.connections() == []


def test_trace_starts_each_packet_fresh():
    sim = PolicySimulator(parse_policy(STATE_POLICY + ALLOW))
    first = sim.trace(CLIENT, SERVER, "tcp", 5432)
    again = sim.trace(CLIENT, SERVER, "tcp", 5432)
    assert first == again and first.verdict == "allow" and first.rule == "db"
    reverse = sim.trace(SERVER, CLIENT, "tcp", 40000)
    assert (reverse.verdict, reverse.rule) == ("deny", "default")


# ------------------------------------------------------------------ CLI

GOOD_TESTS = """\
tests:
  - {from: 10.0.1.5, to: 10.0.2.9, tcp: 5432, expect: allow, rule: db}
  - {from: 10.0.2.9, to: 10.0.1.5, tcp: 5432, expect: deny, rule: default}
  - {from: 10.0.1.5, to: 10.0.2.9, icmp: true, expect: allow}
"""


def _write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_check_exit_codes(tmp_path: Path):
    runner = CliRunner()
    good = _write(tmp_path, STATE_POLICY + ALLOW + GOOD_TESTS)
    result = runner.invoke(main, ["check", good])
    assert result.exit_code == 0, result.output
    assert "3/3 tests passed" in result.output
    assert "pass: line 11: 10.0.1.5 -> 10.0.2.9 tcp/5432: expected allow by db" in result.output

    failing = _write(tmp_path, STATE_POLICY + ALLOW + GOOD_TESTS.replace(
        "tcp: 5432, expect: deny", "tcp: 5432, expect: allow"), "failing.yaml")
    result = runner.invoke(main, ["check", "-q", failing])
    assert result.exit_code == 1, result.output
    assert ("FAIL: line 12: 10.0.2.9 -> 10.0.1.5 tcp/5432: expected allow by default, "
            "got deny by default") in result.output
    assert "pass:" not in result.output and "2/3 tests passed" in result.output

    wrong_rule = _write(tmp_path, STATE_POLICY + ALLOW + GOOD_TESTS.replace(
        "expect: allow, rule: db", "expect: allow, rule: syslog"), "wrong-rule.yaml")
    assert runner.invoke(main, ["check", wrong_rule]).exit_code == 1

    invalid = _write(tmp_path, STATE_POLICY + ALLOW + "    - {name: db, from: a, to: b}\n",
                     "invalid.yaml")
    result = runner.invoke(main, ["check", invalid])
    assert result.exit_code == 2
    assert f"socknet: {invalid}:10: duplicate rule name 'db'" in result.output
    assert f"socknet: {invalid}:10: unknown tier or external 'a'" in result.output
    assert runner.invoke(main, ["check", str(tmp_path / "nope.yaml")]).exit_code == 2


def test_trace_json(tmp_path: Path):
    path = _write(tmp_path, STATE_POLICY + CUT + ALLOW)
    runner = CliRunner()
    result = runner.invoke(main, ["trace", "--policy", path, "--src", OTHER_CLIENT, "--dst",
                                  SERVER, "--tcp", "5432", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "allow" and data["rule"] == "db" and data["rule_id"] == 2
    assert (data["src"], data["dst"], data["proto"], data["port"]) == (OTHER_CLIENT, SERVER,
                                                                       "tcp", 5432)
    tables = data["tables"]
    assert isinstance(tables, list) and all(isinstance(t, str) for t in tables)
    assert any(t.startswith(f"{RULES_TABLE} policy_rules: allow db") for t in tables), tables

    result = runner.invoke(main, ["trace", "--policy", path, "--src", SERVER, "--dst", CLIENT,
                                  "--icmp", "--json"])
    data = json.loads(result.output)
    assert (data["verdict"], data["rule"], data["rule_id"], data["port"]) == ("deny", "default",
                                                                              0, None)
    result = runner.invoke(main, ["trace", "--policy", path, "--src", CLIENT, "--dst", SERVER,
                                  "--udp", "514", "--json"])
    assert json.loads(result.output)["rule"] == "cut"
    assert json.loads(result.output)["verdict"] == "deny"


def test_trace_text_and_bad_input(tmp_path: Path):
    path = _write(tmp_path, STATE_POLICY + ALLOW)
    runner = CliRunner()
    result = runner.invoke(main, ["trace", "--policy", path, "--src", CLIENT, "--dst", SERVER,
                                  "--udp", "514"])
    assert result.exit_code == 0
    assert result.output.startswith(f"{CLIENT} -> {SERVER} udp/514: allow (rule: syslog)")
    for args in (["--tcp", "1", "--udp", "2"], [], ["--tcp", "1", "--icmp"]):
        bad = runner.invoke(main, ["trace", "--policy", path, "--src", CLIENT, "--dst", SERVER,
                                   *args])
        assert bad.exit_code == 2 and "exactly one of" in bad.output
    bad = runner.invoke(main, ["trace", "--policy", path, "--src", "10.0.1", "--dst", SERVER,
                               "--tcp", "1"])
    assert bad.exit_code == 2 and "--src '10.0.1' is not an IPv4 address" in bad.output


# ------------------------------------------------------------------ graph


GRAPH_POLICY = STATE_POLICY.replace("  servers: {cidrs: [10.0.2.0/24]}",
                                    "  servers: {cidrs: [10.0.2.0/24], internal: true}\n"
                                    "externals:\n  tailnet: {cidrs: [100.64.0.0/10]}") + ALLOW + \
    CUT + "    - {name: in, from: [internet, tailnet], to: clients, tcp: [443, \"8000-8010\"]}\n"


def test_graph_nodes_and_edges():
    g = policy_graph(parse_policy(GRAPH_POLICY))
    assert [(n.name, n.kind) for n in g.nodes] == [
        ("clients", "tier"), ("servers", "tier"), ("tailnet", "external"),
        ("10.0.1.5/32", "cidr"), ("internet", "internet")]
    assert g.node("servers").internal and "internal: no internet" in g.node("servers").lines
    assert g.node("10.0.1.5/32").in_tier == "clients"
    clients, servers = g.node("clients").id, g.node("servers").id
    [allowed] = [e for e in g.edges if (e.src, e.dst, e.action) == (clients, servers, "allow")]
    assert [r.name for r in allowed.rules] == ["db", "syslog", "ping"]
    assert allowed.lines == ("db:", "tcp/5432", "syslog:", "udp/514", "ping:", "icmp")
    [denied] = [e for e in g.edges if e.action == "deny"]
    assert denied.lines == ("cut (log):", "any")
    assert len([e for e in g.edges if e.dst == clients]) == 2  # from internet and tailnet
    assert g.default == "deny"


def test_graph_mermaid_and_dot_text():
    p = parse_policy(GRAPH_POLICY)
    mermaid = to_mermaid(p, "g.yaml")
    assert "flowchart LR" in mermaid and "title: g.yaml" in mermaid
    assert 'n0["clients<br/>10.0.1.0/24"]' in mermaid
    assert 'n0 -->|"db:<br/>tcp/5432<br/>syslog:<br/>udp/514<br/>ping:<br/>icmp"| n1' in mermaid
    assert 'n3 -.->|"cut (log):<br/>any"| n1' in mermaid
    assert "linkStyle 1 stroke:#dc2626" in mermaid
    dot = to_dot(p, "g.yaml")
    assert dot.startswith("digraph policy {") and dot.rstrip().endswith("}")
    assert 'n0 -> n1 [label="db:\\ntcp/5432\\nsyslog:\\nudp/514\\nping:\\nicmp"];' in dot
    assert 'n3 -> n1 [label="cut (log):\\nany", style=dashed' in dot
    assert "subgraph cluster_tiers" in dot


def test_graph_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _write(tmp_path, GRAPH_POLICY)
    runner = CliRunner()
    result = runner.invoke(main, ["graph", path])
    assert result.exit_code == 0 and result.output.startswith("---\ntitle: policy.yaml")
    out = tmp_path / "g.dot"
    result = runner.invoke(main, ["graph", path, "--format", "dot", "-o", str(out)])
    assert result.exit_code == 0 and out.read_text().startswith("digraph")
    assert runner.invoke(main, ["graph", str(tmp_path / "nope.yaml")]).exit_code == 2
    monkeypatch.setattr("topology.graph.shutil.which", lambda name: None)
    result = runner.invoke(main, ["graph", path, "--format", "svg", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "Graphviz `dot` is not installed: apt-get install graphviz" in result.output
    assert not (tmp_path / "x").exists()
