"""Tier policy -> flows of the policy stage (tables 20-24 of vmbr0). No I/O.

Each rule becomes one conjunctive match (sources x destinations x services
cost |S| + |D| + |P| + 1 flows) at its own priority, so first-match order is
the priority order. Connections are stateful through conntrack zone
ZONE_POLICY: the allowing rule's id is committed into ct_label; replies of
allowed connections pass without re-evaluation; every packet in the original
direction is evaluated again, so a new deny cuts a live session on its next
packet and marks the connection blocked (ct_mark bit 0) so its replies drop too.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable
from ipaddress import IPv4Network

from topology.model import (
    Conjunction,
    Ct,
    Flow,
    MatchValue,
    Owner,
    SetReg,
    ToController,
    ct_state,
    flow,
)
from topology.openflow import ETH_IPV4, IP_PROTOS
from topology.pipeline import (
    CLASS_GATEWAY,
    CLASS_MESH,
    CLASS_SERVICE,
    METER_LOG,
    REG_CLASS,
    REG_RULE,
    SOCKET_PIPELINE,
    ZONE_POLICY,
)
from topology.policy import AddressSet, Policy, PortRange, Rule, Service
from topology.policy import clear_caches as clear_policy_caches

# ct_mark bits of zone ZONE_POLICY: bit 1 = committed by the policy, bit 0 = a deny cut it.
COMMITTED = (0b10, 0b10)
ALLOWED = (0b10, 0b11)  # committed and not cut: written on allow, matched for replies
BLOCKED = (0b11, 0b11)  # written when a deny cuts a committed connection
IS_BLOCKED = (0b01, 0b01)
RULE_PRIORITY_TOP = 60000
RULE_PRIORITY_STEP = 10
POLICED_CLASSES = (CLASS_SERVICE, CLASS_MESH, CLASS_GATEWAY)

Match = dict[str, MatchValue]


def port_prefixes(r: PortRange) -> list[MatchValue]:
    """A port range as the fewest value/mask matches (exact ports as plain ints)."""
    return [lo if size == 1 else (lo, 0xFFFF & ~(size - 1)) for lo, size in r.blocks()]


def _net(net: IPv4Network) -> MatchValue:
    if net.prefixlen == 32:
        return str(net.network_address)
    return (str(net.network_address), str(net.netmask))


def _dimensions(rule: Rule) -> list[list[Match]]:
    dims: list[list[Match]] = []
    if not rule.src.is_any:
        dims.append([{"ipv4_src": _net(n)} for n in rule.src.nets])
    if not rule.dst.is_any:
        dims.append([{"ipv4_dst": _net(n)} for n in rule.dst.nets])
    if rule.services:
        services: list[Match] = []
        for svc in rule.services:
            proto = IP_PROTOS[svc.proto]
            if not svc.ports or svc.proto == "icmp":
                services.append({"ip_proto": proto})
                continue
            field = f"{svc.proto}_dst"
            for r in svc.ports:
                services += [{"ip_proto": proto, field: v} for v in port_prefixes(r)]
        dims.append(services)
    return dims


def _side(addresses: AddressSet) -> str:
    text = str(addresses)
    return text if len(text) <= 60 else f"{len(addresses.names)} address sets"


def rule_priority(position: int) -> int:
    return RULE_PRIORITY_TOP - RULE_PRIORITY_STEP * position


RuleKey = tuple[int, int, str, str, AddressSet, AddressSet, tuple[Service, ...]]


def _rule_key(rule: Rule, position: int) -> RuleKey:
    """Everything `_rule_flows` reads from a rule (not its line or `log`)."""
    return (position, rule.rule_id, rule.name, rule.action, rule.src, rule.dst, rule.services)


class _RuleFlowCache:
    """Flows of each rule of the last compiled policy, by `_rule_key`.

    A reload usually changes a rule or two: the other rules' flows are the very Flow
    objects installed now (cookies and hashes already computed), so recompiling,
    checking and diffing them costs next to nothing. Only the last policy's: those
    flows are the running desired state's own objects, so keeping them costs no
    memory (an older policy's flows could double a large policy's footprint).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[RuleKey, tuple[Flow, ...]] = {}

    def flows(self, rules: Iterable[tuple[int, Rule]]) -> list[tuple[Flow, ...]]:
        current: dict[RuleKey, tuple[Flow, ...]] = {}
        with self._lock:
            last = self._last
        out = []
        for position, rule in rules:
            key = _rule_key(rule, position)
            found = current.get(key) or last.get(key)
            if found is None:
                found = tuple(_rule_flows(rule, position))
            current[key] = found
            out.append(found)
        with self._lock:
            self._last = current
        return out

    def clear(self) -> None:
        with self._lock:
            self._last = {}


_RULE_FLOWS = _RuleFlowCache()


def clear_caches() -> None:
    """Forget every compiled policy and rule, and the parser's rule sides: the next
    parse and compile start cold (what benchmarks of a first compile must time)."""
    global _last
    _last = None
    _RULE_FLOWS.clear()
    clear_policy_caches()


def _rule_flows(rule: Rule, position: int) -> list[Flow]:
    t = SOCKET_PIPELINE["policy_rules"]
    prio = rule_priority(position)
    target = SOCKET_PIPELINE["policy_allow" if rule.action == "allow" else "policy_deny"]
    decide = [SetReg(REG_RULE, rule.rule_id)]
    # one note string shared by all the rule's flows (a 100k-flow policy keeps them all)
    note = f"policy_rules: {rule.action} {rule.name}: {_side(rule.src)} -> {_side(rule.dst)}"
    dims = _dimensions(rule)
    sizes = [len(d) for d in dims]
    if len(dims) <= 1 or math.prod(sizes) <= sum(sizes) + 1:
        out = []
        for combo in itertools.product(*dims):
            match: Match = {"eth_type": ETH_IPV4}
            for part in combo:
                match.update(part)
            out.append(flow(t, prio, actions=decide, goto=target, owner=Owner.POLICY,
                            note=note, **match))
        return out
    n = len(dims)
    out = [flow(t, prio, actions=decide, goto=target, owner=Owner.POLICY, note=note,
                eth_type=ETH_IPV4, conj_id=rule.rule_id)]
    for k, dim in enumerate(dims, start=1):
        for part in dim:
            out.append(flow(t, prio, actions=[Conjunction(rule.rule_id, k, n)],
                            owner=Owner.POLICY, note=note,
                            eth_type=ETH_IPV4, **part))
    return out


_last: tuple[Policy | None, frozenset[Flow]] | None = None


def compile_policy(policy: Policy | None) -> frozenset[Flow]:
    """Flows of tables 20-24. Without a policy: pass everything on (issue-2 behaviour).

    The last result is kept: port and address changes recompute the desired state
    often, the policy rarely changes (Policy is immutable, so identity is enough).
    """
    global _last
    if _last is not None and _last[0] is policy:
        return _last[1]
    flows = _compile(policy)
    _last = (policy, flows)
    return flows


def _compile(policy: Policy | None) -> frozenset[Flow]:
    p = SOCKET_PIPELINE
    entry, state, rules_t = p["policy_entry"], p["policy_state"], p["policy_rules"]
    allow, deny, after = p["policy_allow"], p["policy_deny"], p["dispatch"]
    out: set[Flow] = {
        flow(entry, 0, goto=after, note="policy_entry: not policed, go on"),
        flow(state, 0, goto=rules_t, note="policy_state: evaluate the rules"),
        flow(allow, 0, goto=after, note="policy_allow: established, go on"),
        flow(deny, 0, note="policy_deny: drop"),
    }
    if policy is None:
        out.add(flow(rules_t, 0, note="policy_rules: (no policy)"))
        return frozenset(out)
    for cls in POLICED_CLASSES:
        out.add(flow(entry, 10, eth_type=ETH_IPV4, owner=Owner.POLICY,
                     actions=[Ct(zone=ZONE_POLICY, table=state)],
                     note="policy_entry: IPv4 through conntrack", **{REG_CLASS: cls}))
    out |= {
        flow(state, 30, ct_state=ct_state("+trk+inv"), note="policy_state: invalid, drop"),
        flow(state, 20, ct_state=ct_state("+trk+est+rpl"), ct_mark=ALLOWED, goto=after,
             note="policy_state: reply of an allowed connection"),
        flow(state, 20, ct_state=ct_state("+trk+rel+rpl"), ct_mark=ALLOWED, goto=after,
             note="policy_state: related reply (ICMP error) of an allowed connection"),
        flow(state, 15, ct_state=ct_state("+trk+rpl"), ct_mark=IS_BLOCKED,
             note="policy_state: reply of a connection a deny has cut, drop"),
    }
    default_target = allow if policy.default == "allow" else deny
    out.add(flow(rules_t, 0, actions=[SetReg(REG_RULE, 0)], goto=default_target,
                 owner=Owner.POLICY, note=f"policy_rules: default {policy.default}"))
    for rule_flows in _RULE_FLOWS.flows(enumerate(policy.rules)):
        out.update(rule_flows)

    allowing = [r.rule_id for r in policy.rules if r.action == "allow"]
    if policy.default == "allow":
        allowing.append(0)
    for rule_id in allowing:
        out.add(flow(allow, 20, ct_state=ct_state("+trk+new"), owner=Owner.POLICY,
                     eth_type=ETH_IPV4,
                     actions=[Ct(zone=ZONE_POLICY, commit=True, mark=ALLOWED, label=rule_id)],
                     goto=after, note=f"policy_allow: commit, rule id {rule_id} in ct_label",
                     **{REG_RULE: rule_id}))
    out.add(flow(allow, 10, ct_state=ct_state("+trk"), ct_mark=IS_BLOCKED, owner=Owner.POLICY,
                 eth_type=ETH_IPV4,
                 actions=[Ct(zone=ZONE_POLICY, commit=True, mark=ALLOWED)], goto=after,
                 note="policy_allow: allowed again, unblock the connection"))

    block = Ct(zone=ZONE_POLICY, commit=True, mark=BLOCKED)
    # Only connections the policy committed are marked: a denied first packet leaves
    # no conntrack state behind.
    out.add(flow(deny, 20, ct_state=ct_state("+trk"), ct_mark=COMMITTED, actions=[block],
                 owner=Owner.POLICY, eth_type=ETH_IPV4,
                 note="policy_deny: cut the committed connection (replies drop too)"))
    logged = [r.rule_id for r in policy.rules if r.action == "deny" and r.log]
    if policy.default == "deny" and policy.log_default:
        logged.append(0)
    for rule_id in logged:
        report = ToController(meter=METER_LOG)
        out.add(flow(deny, 30, ct_state=ct_state("+trk"), ct_mark=COMMITTED,
                     actions=[block, report], eth_type=ETH_IPV4, owner=Owner.POLICY,
                     note=f"policy_deny: log (rate-limited) and cut, rule id {rule_id}",
                     **{REG_RULE: rule_id}))
        out.add(flow(deny, 25, actions=[report], owner=Owner.POLICY,
                     note=f"policy_deny: log (rate-limited), rule id {rule_id}",
                     **{REG_RULE: rule_id}))
    return frozenset(out)


def rule_flow_count(flows: Iterable[Flow]) -> int:
    t = SOCKET_PIPELINE["policy_rules"]
    return sum(1 for f in flows if f.table == t)
