"""Verdicts of a policy from its COMPILED flows, through the flow-table simulator.

`trace()` builds a minimal host (from-mesh on port 1, a service container on
port 2), compiles the policy into vmbr0's flows and sends a first packet of
the connection in from the mesh: allowed if it comes out of port 2. The
deciding rule is read off the policy_rules flow that matched (its reg2 load),
not from the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from topology.config import HostConfig, parse_host_config
from topology.flows import desired_state
from topology.model import SetReg
from topology.pipeline import REG_RULE, SOCKET_PIPELINE
from topology.policy import Policy, PolicyError, parse_policy
from topology.simulate import Conntrack, Switch, ipv4

MESH_PORT, SERVICE_PORT = 1, 2
MESH_MAC, UNKNOWN_MAC = "02:00:00:00:ee:01", "02:00:00:00:77:77"
CLIENT_PORT = 40000


@lru_cache(maxsize=1)
def _host() -> HostConfig:
    return parse_host_config("bridges: {mesh: {}, socket: {}}\n")


@dataclass(frozen=True)
class TraceResult:
    verdict: Literal["allow", "deny"]
    rule: str
    rule_id: int
    tables: tuple[str, ...] = field(default=())  # the tables visited, with the flow found

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "rule": self.rule, "rule_id": self.rule_id,
                "tables": list(self.tables)}


class PolicySimulator:
    """Compiled flows of one policy in a simulated switch; each trace starts fresh."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        ports = {"vmbr0": {"from-mesh": MESH_PORT, "veth200": SERVICE_PORT}}
        self.flows = desired_state(_host(), ports, policy)["vmbr0"]
        self.switch = Switch(self.flows, ports={MESH_PORT, SERVICE_PORT})

    def trace(self, src: str, dst: str, proto: str, port: int | None = None) -> TraceResult:
        self.switch.conntrack = Conntrack()  # a first packet: no connection known yet
        pkt = ipv4(MESH_PORT, MESH_MAC, UNKNOWN_MAC, str(src), str(dst), proto,  # type: ignore[arg-type]
                   sport=CLIENT_PORT, dport=port or 0)
        result = self.switch.process(pkt)
        rule_id = 0
        rules_table = SOCKET_PIPELINE["policy_rules"]
        names = {t.number: t.name for t in SOCKET_PIPELINE.tables}
        visited = []
        for step in result.trace:
            note = step.flow.note if step.flow is not None and step.flow.note else ""
            name = names.get(step.table, str(step.table))
            visited.append(f"{step.table} {note or name + ': miss'}")
            if step.table == rules_table and step.flow is not None:
                for action in step.flow.actions:
                    if isinstance(action, SetReg) and action.reg == REG_RULE:
                        rule_id = action.value
        rule = self.policy.rule_by_id(rule_id) if rule_id else None
        verdict: Literal["allow", "deny"] = "allow" if SERVICE_PORT in result.ports else "deny"
        return TraceResult(verdict, rule.name if rule else "default", rule_id, tuple(visited))


@dataclass(frozen=True)
class TestOutcome:
    description: str
    line: int
    expect: str
    got: TraceResult
    expect_rule: str | None

    @property
    def passed(self) -> bool:
        if self.got.verdict != self.expect:
            return False
        return self.expect_rule is None or self.expect_rule == self.got.rule

    def __str__(self) -> str:
        status = "pass" if self.passed else "FAIL"
        want = self.expect + (f" by {self.expect_rule}" if self.expect_rule else "")
        return (f"{status}: line {self.line}: {self.description}: expected {want}, "
                f"got {self.got.verdict} by {self.got.rule}")


def run_tests(policy: Policy, sim: PolicySimulator | None = None) -> list[TestOutcome]:
    if not policy.tests:
        return []  # nothing to run: no need to build the simulated switch
    sim = sim or PolicySimulator(policy)
    return [
        TestOutcome(t.describe(), t.line, t.expect, sim.trace(str(t.src), str(t.dst), t.proto,
                                                              t.port), t.rule)
        for t in policy.tests
    ]


def failing_tests(policy: Policy) -> list[str]:
    if not policy.tests:
        return []  # nothing to run: no need to build the simulated switch
    return [str(o) for o in run_tests(policy) if not o.passed]


def check_policy_text(text: str, path: str = "<policy>") -> tuple[Policy | None, list[str]]:
    """A policy given as text (a fleet generation): parsed, validated and its tests run
    on the compiled flows, as `socknet check` does. The policy, or the problems."""
    try:
        policy = parse_policy(text, path)
    except PolicyError as exc:
        return None, exc.problems
    failures = failing_tests(policy)
    if failures:
        return None, [f"test failed: {f}" for f in failures]
    return policy, []
