"""Property: for random small policies, the verdict and the deciding rule read off the
COMPILED flows (flow-table simulator, `PolicySimulator.trace`) equal the direct
evaluation of the rules (`Policy.verdict`); and, statefully, the reply of an
allowed connection passes while the answer to a denied one is a new connection
of its own (allowed only if the policy allows that direction).

Policies are generated as YAML text, so the parser and validation are part of the
round trip; generated files that fail validation (shadowed rules, mostly) are
skipped with `assume`. Addresses are drawn from inside, at the edges of and just
outside every CIDR the policy names, plus anywhere at random; ports at the edges
of every range plus anywhere.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from topology.check import PolicySimulator
from topology.config import parse_host_config
from topology.flows import desired_state
from topology.policy import Policy, PolicyError, parse_policy
from topology.simulate import Conntrack, Switch, ipv4

# A small universe, so that tiers, externals and literal CIDRs meet and overlap often.
BASES = (IPv4Address("10.0.0.0"), IPv4Address("100.64.0.0"), IPv4Address("192.168.0.0"))
PORT_EDGES = (1, 2, 79, 80, 81, 443, 1023, 1024, 8080, 32767, 32768, 65534, 65535)


@st.composite
def networks(draw: st.DrawFn) -> IPv4Network:
    base = int(draw(st.sampled_from(BASES)))
    plen = draw(st.integers(14, 32))
    offset = draw(st.integers(0, 2**18 - 1))
    addr = (base + offset) & (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
    return IPv4Network((addr, plen))


def _disjoint(nets: list[IPv4Network]) -> list[IPv4Network]:
    out: list[IPv4Network] = []
    for n in nets:
        if not any(n.overlaps(o) for o in out):
            out.append(n)
    return out


ports = st.one_of(st.sampled_from(PORT_EDGES), st.integers(1, 65535))


@st.composite
def port_specs(draw: st.DrawFn) -> list[int | str]:
    specs: list[int | str] = []
    for _ in range(draw(st.integers(1, 3))):
        a, b = sorted((draw(ports), draw(ports)))
        kind = draw(st.sampled_from(("single", "range", "range", "text")))
        if kind == "single":
            specs.append(a)
        elif kind == "text":
            specs.append(str(b))
        else:
            specs.append(f"{a}-{b}")
    return specs


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kind = draw(st.sampled_from(("any", "l4", "l4", "l4", "icmp")))
    if kind == "any":
        if draw(st.booleans()):
            out["proto"] = "any"
        return out
    if kind == "icmp":
        return {"icmp": True}
    for proto in ("tcp", "udp"):
        choice = draw(st.sampled_from(("none", "ports", "ports", "all")))
        if choice == "ports":
            out[proto] = draw(port_specs())
        elif choice == "all":
            out[proto] = True
    if draw(st.integers(0, 4)) == 0:
        out["icmp"] = True
    if not out:
        out["tcp"] = draw(port_specs())
    return out


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    tier_nets = _disjoint(draw(st.lists(networks(), min_size=1, max_size=6)))
    n_tiers = draw(st.integers(1, min(4, len(tier_nets))))
    tiers: dict[str, Any] = {}
    for i in range(n_tiers):
        mine = tier_nets[i::n_tiers]
        tiers[f"t{i}"] = {"cidrs": [str(n) for n in mine], "internal": draw(st.booleans())}
    externals = {
        f"x{i}": {"cidrs": [str(n) for n in draw(st.lists(networks(), min_size=1, max_size=2))]}
        for i in range(draw(st.integers(0, 2)))
    }
    names = [*tiers, *externals, "internet", "any"]
    side_item = st.one_of(st.sampled_from(names), networks().map(str))

    def side() -> str | list[str]:
        items = draw(st.lists(side_item, min_size=1, max_size=3, unique=True))
        return items[0] if len(items) == 1 and draw(st.booleans()) else items

    rules = []
    for i in range(draw(st.integers(1, 6))):
        rule: dict[str, Any] = {"name": f"r{i}", "from": side(), "to": side()}
        rule.update(draw(services()))
        rule["action"] = draw(st.sampled_from(("allow", "deny")))
        if draw(st.booleans()):
            rule["log"] = True
        rules.append(rule)
    return {
        "tiers": tiers,
        "externals": externals,
        "policy": {"default": draw(st.sampled_from(("allow", "deny"))),
                   "log_default": draw(st.booleans()), "rules": rules},
    }


def _parse(spec: dict[str, Any]) -> Policy:
    try:
        return parse_policy(yaml.safe_dump(spec, sort_keys=False), "random.yaml")
    except PolicyError:
        assume(False)
        raise  # unreachable


def _candidate_addresses(policy: Policy) -> list[str]:
    nets: set[IPv4Network] = set()
    for s in (*policy.tiers.values(), *policy.externals.values()):
        nets.update(s.nets)
    for rule in policy.rules:
        for s in (rule.src, rule.dst):
            if not s.is_any and len(s.nets) < 50:  # "internet" is many prefixes: skip
                nets.update(s.nets)
    out: set[int] = {0, 0xFFFFFFFF, int(BASES[0]) + 5}
    for n in nets:
        lo, hi = int(n.network_address), int(n.broadcast_address)
        out.update(a for a in (lo - 1, lo, lo + 1, (lo + hi) // 2, hi - 1, hi, hi + 1)
                   if 0 <= a <= 0xFFFFFFFF)
    return [str(IPv4Address(a)) for a in sorted(out)]


def _packets(policy: Policy, data: st.DataObject, count: int
             ) -> list[tuple[str, str, str, int | None]]:
    addrs = _candidate_addresses(policy)
    address = st.one_of(st.sampled_from(addrs), st.integers(0, 2**32 - 1).map(
        lambda a: str(IPv4Address(a))))
    port = st.one_of(st.sampled_from(_candidate_ports(policy)), st.integers(1, 65535))
    out = []
    for _ in range(count):
        src, dst = data.draw(address), data.draw(address)
        proto = data.draw(st.sampled_from(("tcp", "udp", "icmp")))
        out.append((src, dst, proto, None if proto == "icmp" else data.draw(port)))
    return out


def _candidate_ports(policy: Policy) -> list[int]:
    out = set(PORT_EDGES)
    for rule in policy.rules:
        for svc in rule.services:
            for r in svc.ports:
                out.update(p for p in (r.lo - 1, r.lo, r.lo + 1, r.hi - 1, r.hi, r.hi + 1)
                           if 1 <= p <= 65535)
    return sorted(out)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(spec=policies(), data=st.data())
def test_compiled_flows_agree_with_direct_evaluation(spec: dict[str, Any],
                                                     data: st.DataObject) -> None:
    policy = _parse(spec)
    sim = PolicySimulator(policy)
    for src, dst, proto, p in _packets(policy, data, 25):
        want = policy.verdict(src, dst, proto, p)
        got = sim.trace(src, dst, proto, p)
        assert (got.verdict, got.rule, got.rule_id) == (want.verdict, want.rule, want.rule_id), (
            f"{src} -> {dst} {proto}/{p}: simulator {got.verdict} by {got.rule}, "
            f"direct {want.verdict} by {want.rule}\n" + "\n".join(got.tables))


# The host's gateway port is policed but not spoof-guarded: answers may come from any
# address there, so one switch serves every random packet.
GATEWAY_HOST = "bridges: {mesh: {}, socket: {gateway: gw0}}\n"
MESH, GATEWAY = 1, 3
MESH_MAC, GATEWAY_MAC = "02:00:00:00:ee:01", "02:00:00:00:99:01"
CLIENT_PORT = 40000


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(spec=policies(), data=st.data())
def test_replies_pass_only_for_allowed_connections(spec: dict[str, Any],
                                                   data: st.DataObject) -> None:
    policy = _parse(spec)
    ports = {"vmbr0": {"from-mesh": MESH, "gw0": GATEWAY}}
    flows = desired_state(parse_host_config(GATEWAY_HOST), ports, policy)["vmbr0"]
    switch = Switch(flows, ports={MESH, GATEWAY})
    for src, dst, proto, p in _packets(policy, data, 10):
        switch.conntrack = Conntrack()
        request = ipv4(MESH, MESH_MAC, GATEWAY_MAC, src, dst, proto,  # type: ignore[arg-type]
                       sport=CLIENT_PORT, dport=p or 0)
        allowed = policy.verdict(src, dst, proto, p).verdict == "allow"
        assert (GATEWAY in switch.process(request).ports) == allowed
        reply = request.reply(GATEWAY)
        if allowed:
            answered = True
        elif proto == "icmp":
            answered = False  # an echo reply without a request is invalid
        else:  # no connection: the answer is a new connection the other way
            answered = policy.verdict(dst, src, proto, CLIENT_PORT).verdict == "allow"
        what = f"{src} -> {dst} {proto}/{p}: request {'allowed' if allowed else 'denied'}"
        assert (MESH in switch.process(reply).ports) == answered, what
        if allowed:  # the connection goes on both ways
            assert GATEWAY in switch.process(request).ports, what
            assert MESH in switch.process(reply).ports, what
