"""The OpenFlow pipeline of each bridge, declared once as data.

Every flow socknet computes is checked against this declaration
(`check_flows`, `check_against_pipeline`): its table must exist, it may only
match the fields its table declares, it may only go forward to a declared
table, and every table ends in a catch-all that drops or goes on (default
deny). Every field a table declares is a field of `topology.openflow.FIELDS`
(checked when this module is imported). What OVS itself refuses in a flow is
`topology.flowcheck.check_flow`. `docs/pipeline.md` is generated from the same
data (`pipeline_markdown`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from topology.model import Flow, Resubmit
from topology.openflow import FIELDS

# Register use on vmbr0 (one place, so tables and tests agree).
REG_CLASS = "reg0"  # class of the ingress port, set in `classify`
REG_OUT = "reg1"  # output port found by a privacy-host lookup (0 = unknown)
REG_RULE = "reg2"  # id of the policy rule that decided (0 = the default)

# Port classes carried in REG_CLASS.
CLASS_MESH = 1
CLASS_WARP = 2
CLASS_PRIVACY = 3
CLASS_SERVICE = 4
CLASS_GATEWAY = 5  # the host's router for service containers (the "internet" behind the host)

# Conntrack zone for connections the mesh opens towards privacy containers.
ZONE_PRIVACY = 1
# Conntrack zone of the tier policy (service containers, mesh, gateway).
ZONE_POLICY = 2

# OpenFlow meters (packets/s to the controller): denied-packet logs, address learning,
# and packets from ports the pipeline does not know yet (a new container's first packets
# arrive before its port's flows; a meter of their own, so an unknown port that floods
# can never use up the learning meter's budget), and copies of dropped packets that say
# why (topology.drops: a flood of spoofed frames costs the controller at most this much).
METER_LOG = 1
METER_LEARN = 2
METER_EARLY = 3
METER_DROP = 4
METER_RATES = {METER_LOG: 100, METER_LEARN: 200, METER_EARLY: 50, METER_DROP: 20}

LEARN_IDLE_TIMEOUT = 300
MESH_LEARN_IDLE_TIMEOUT = 60  # a remote MAC not heard from for this long is flooded again


@dataclass(frozen=True)
class Table:
    number: int
    name: str
    purpose: str
    matches: frozenset[str]
    reserved: bool = False  # a slot kept for a later stage (e.g. tier policy)


@dataclass(frozen=True)
class Pipeline:
    role: str  # "mesh" or "socket"
    tables: tuple[Table, ...]

    def by_name(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    def __hash__(self) -> int:
        # part of `_flow_problems`' cache key, hashed once per flow checked: the role
        # alone (equal pipelines have equal roles), not every table declaration
        return hash(self.role)

    def by_number(self, number: int) -> Table | None:
        for table in self.tables:
            if table.number == number:
                return table
        return None

    def __getitem__(self, name: str) -> int:
        return self.by_name(name).number


def _t(
    number: int, name: str, purpose: str, matches: Iterable[str], reserved: bool = False
) -> Table:
    return Table(number, name, purpose, frozenset(matches), reserved)


_L2 = ("eth_dst", "eth_src", "eth_type")
_ARP = ("arp_op", "arp_tpa", "arp_spa", "arp_sha", "arp_tha")
_L3 = ("ipv4_src", "ipv4_dst", "ip_proto")
_L4 = ("tcp_src", "tcp_dst", "udp_src", "udp_dst", "icmpv4_type", "icmpv4_code")

MESH_PIPELINE = Pipeline(
    role="mesh",
    tables=(
        _t(0, "mesh_isolation", "mesh uplink(s) -> to-socket (learning which peer each MAC "
           "is behind), to-socket -> mesh_l2; multicast and zero source MACs and everything "
           "else dropped", ["in_port", "eth_src"]),
        _t(1, "mesh_l2", "from to-socket: a learned MAC goes to its peer's uplink only, "
           "unknown destinations to every uplink; never back into the mesh", ["eth_dst"]),
    ),
)

SOCKET_PIPELINE = Pipeline(
    role="socket",
    tables=(
        _t(0, "classify", "tag the ingress port's class in reg0 (nothing is learned here); "
           "unknown ports dropped (with learn-first-packet a copy to the controller, "
           "rate-limited: a new port's first packets can arrive before its flows)",
           ["in_port"]),
        _t(10, "spoof_guard", "containers may only send with their bound MAC and IPv4 "
           "(declared by Proxmox or host.yaml, or learned once through the controller with "
           "learn-first-packet); multicast/zero source MACs dropped; the only MAC learning, "
           "on frames that passed: a privacy container its bound MAC, from-mesh and gateway "
           "any MAC but a local container's",
           ("in_port", REG_CLASS, "eth_src", "eth_type", "ipv4_src", "arp_spa", "arp_sha")),
        _t(20, "policy_entry", "service, mesh and gateway IPv4 into conntrack (zone 2); "
           "everything else goes on", (REG_CLASS, "eth_type")),
        _t(21, "policy_state", "replies of allowed connections pass; replies of cut ones and "
           "invalid packets drop; the rest is evaluated", ("ct_state", "ct_mark")),
        _t(22, "policy_rules", "first-match tier rules as conjunctive matches, priority by "
           "rule order; sets reg2 = rule id", ("eth_type", "ipv4_src", "ipv4_dst", "ip_proto",
           "tcp_dst", "udp_dst", "icmpv4_type", "conj_id")),
        _t(23, "policy_allow", "commit new connections with the rule id in ct_label",
           (REG_RULE, "ct_state", "ct_mark", "eth_type")),
        _t(24, "policy_deny", "drop; cut established connections (ct_mark blocked); log "
           "rate-limited to the controller", (REG_RULE, "ct_state", "ct_mark", "eth_type")),
        _t(30, "dispatch", "send each port class to its forwarding stage; a local service "
           "container's own gratuitous ARP goes on to the mesh instead of being answered here",
           (REG_CLASS, "in_port", "eth_type", "arp_op", "arp_tpa")),
        _t(35, "privacy_egress", "privacy containers: ARP/non-IP to WARP only, IPv4 to conntrack",
           (REG_CLASS, "eth_type")),
        _t(36, "privacy_ct", "privacy containers: replies to mesh-opened connections back to "
           "the mesh, everything else to WARP only (kill switch: no WARP port, no flow)",
           ("ct_state", "eth_type")),
        _t(37, "mesh_reply_l2", "learned: mesh host IPv4 -> its MAC, set as eth_dst on "
           "privacy replies towards the mesh", ("eth_type", "ipv4_dst")),
        _t(38, "privacy_lookup", "mesh/WARP traffic: look up which privacy container owns "
           "eth_dst (reg1)", (REG_CLASS,)),
        _t(40, "privacy_hosts", "privacy container MAC -> port (declared, or learned from "
           "its bound MAC in spoof_guard), loaded into reg1", ("eth_dst",)),
        _t(42, "privacy_deliver", "deliver to the privacy container in reg1 (mesh: commit "
           "to conntrack); misses from the mesh go to service switching",
           (REG_CLASS, REG_OUT, "eth_dst", "eth_type")),
        _t(50, "service_l2", "service containers + from-mesh: each local service "
           "container's bound MAC to its port, above the MACs learned behind from-mesh and "
           "the gateway; flood to service ports, gateway and from-mesh only", ("eth_dst",)),
    ),
)

PIPELINES = {"mesh": MESH_PIPELINE, "socket": SOCKET_PIPELINE}


class PipelineError(ValueError):
    pass


def check_declaration(pipeline: Pipeline) -> None:
    """Every table matches only fields of the field table, and numbers are unique."""
    problems = [f"table {t.name} declares unknown match fields {sorted(t.matches - FIELDS.keys())}"
                for t in pipeline.tables if t.matches - FIELDS.keys()]
    numbers = [t.number for t in pipeline.tables]
    if len(set(numbers)) != len(numbers):
        problems.append(f"{pipeline.role}: table numbers repeat: {numbers}")
    if problems:
        raise PipelineError("; ".join(problems))


for _pipeline in PIPELINES.values():
    check_declaration(_pipeline)


def check_flows(pipeline: Pipeline, flows: Iterable[Flow]) -> None:
    """Raise PipelineError naming every flow that breaks the declaration."""
    problems: list[str] = []
    catch_all: set[int] = set()
    for f in flows:
        problems.extend(_flow_problems(pipeline, f))
        if not f.match and f.priority == 0:
            catch_all.add(f.table)
    for table in pipeline.tables:
        if table.number not in catch_all:
            problems.append(f"table {table.name} has no priority-0 catch-all (default deny)")
    if problems:
        raise PipelineError("; ".join(problems))


def check_against_pipeline(pipeline: Pipeline, f: Flow) -> None:
    """One flow added to a desired state that was checked whole before."""
    problems = _flow_problems(pipeline, f)
    if problems:
        raise PipelineError("; ".join(problems))


@functools.lru_cache(maxsize=1 << 18)
def _flow_problems(pipeline: Pipeline, f: Flow) -> tuple[str, ...]:
    """What is wrong with one flow; cached, as desired states are recomputed often and
    mostly consist of the same flows (a large policy's above all)."""
    table = pipeline.by_number(f.table)
    if table is None:
        return (f"table {f.table} is not declared in the {pipeline.role} pipeline",)
    problems = []
    extra = {name for name, _ in f.match} - table.matches
    if extra:
        problems.append(f"table {table.name} may not match {sorted(extra)}: {f}")
    if f.goto is not None:
        target = pipeline.by_number(f.goto)
        if target is None or f.goto <= f.table:
            problems.append(f"table {table.name}: goto {f.goto} is not a later declared table")
    for action in f.actions:
        if isinstance(action, Resubmit) and pipeline.by_number(action.table) is None:
            problems.append(f"table {table.name}: resubmit to undeclared table {action.table}")
    return tuple(problems)


def pipeline_markdown() -> str:
    lines = [
        "# socknet OpenFlow pipeline",
        "",
        "Generated from `topology/pipeline.py` (`socknet pipeline`); one line per table, "
        "in packet order. Every table ends in a priority-0 catch-all that drops or goes on.",
        "",
    ]
    for role, pipeline in PIPELINES.items():
        bridge = "mesh" if role == "mesh" else "vmbr0 (socket network)"
        lines += [f"## {bridge}", "", "| table | name | purpose | matches |", "|---|---|---|---|"]
        for t in pipeline.tables:
            matches = ", ".join(sorted(t.matches))
            lines.append(f"| {t.number} | `{t.name}` | {t.purpose} | {matches} |")
        lines.append("")
    lines += [
        "Registers on vmbr0: `reg0` = ingress port class (1 from-mesh, 2 WARP, 3 privacy, "
        "4 service, 5 gateway); `reg1` = privacy container port found by `privacy_lookup`; "
        "`reg2` = id of the policy rule that decided (0 = default).",
        "",
        f"Conntrack zone {ZONE_PRIVACY}: connections opened from the mesh towards privacy "
        "containers (their replies may go back to the mesh, nothing else may). "
        f"Zone {ZONE_POLICY}: the tier policy; ct_label holds the allowing rule's id, "
        "ct_mark bit 1 marks a connection the policy committed, bit 0 one a deny has cut.",
        "",
        f"Meters: {METER_LOG} = denied-packet logs, {METER_LEARN} = address learning, "
        f"{METER_EARLY} = packets from ports without flows yet, {METER_DROP} = copies of "
        "dropped packets for `dropped` log events (packets/s to the controller, excess "
        "dropped in the switch).",
        "",
    ]
    return "\n".join(lines)
