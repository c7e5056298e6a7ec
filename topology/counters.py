"""Counters read from the switch's own flow statistics: packets and bytes per policy rule
and per drop reason. One way of counting, whatever read the statistics (OpenFlow flow
stats in the running controller, ``ovs-ofctl dump-flows`` in `socknet status`): both
hand `FlowCount` values to the functions here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from topology.drops import drop_reason_at, reasons_of
from topology.pipeline import SOCKET_PIPELINE


@dataclass(frozen=True)
class FlowCount:
    table: int
    priority: int
    packets: int
    bytes: int
    rule_id: int | None = None  # what the flow loads into REG_RULE, if anything


def rule_counters(flows: Iterable[FlowCount]) -> dict[int, tuple[int, int]]:
    """rule id -> (packets, bytes), summed over the policy_rules flows that decide it."""
    table = SOCKET_PIPELINE["policy_rules"]
    pkts: Counter[int] = Counter()
    nbytes: Counter[int] = Counter()
    for f in flows:
        if f.table == table and f.rule_id is not None:
            pkts[f.rule_id] += f.packets
            nbytes[f.rule_id] += f.bytes
    return {k: (pkts[k], nbytes[k]) for k in pkts}


def drop_counters(pipeline: str, flows: Iterable[FlowCount]) -> dict[str, tuple[int, int]]:
    """reason -> (packets, bytes) dropped for it on a bridge of ``pipeline``; every reason
    that can happen there is listed, zeros included (a counter that is absent cannot be
    told apart from one that is broken)."""
    pkts: Counter[str] = Counter({r.name: 0 for r in reasons_of(pipeline)})
    nbytes: Counter[str] = Counter({r.name: 0 for r in reasons_of(pipeline)})
    for f in flows:
        reason = drop_reason_at(pipeline, f.table, f.priority)
        if reason is not None:
            pkts[reason.name] += f.packets
            nbytes[reason.name] += f.bytes
    return {k: (pkts[k], nbytes[k]) for k in pkts}
