"""Why the bridges drop packets, declared once as data: one `DropReason` per reason.

Each reason names its drop flows by place (pipeline, table, priority); the
switch's own statistics of those flows are the drop counters that `socknet
status` and the metrics endpoint show (`topology.counters.drop_counters`), read
the same way as the policy's per-rule counters. Adding a reason (a refused
EtherType, say) is one entry in `DROP_REASONS`; tests/test_drops.py checks that
every entry names flows that exist and drop.

Policy denies are not here: they have per-rule counters of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.pipeline import PIPELINES


@dataclass(frozen=True)
class DropPoint:
    pipeline: str  # "mesh" or "socket", as in topology.pipeline.PIPELINES
    table: str
    priority: int

    @property
    def table_number(self) -> int:
        return PIPELINES[self.pipeline][self.table]


@dataclass(frozen=True)
class DropReason:
    name: str  # the `reason` label of the metrics and of `dropped` log events
    what: str  # one line for the operator
    points: tuple[DropPoint, ...]


DROP_REASONS: tuple[DropReason, ...] = (
    DropReason("no_role", "the ingress port has no role (or is not in OVSDB yet)",
               (DropPoint("mesh", "mesh_isolation", 0), DropPoint("socket", "classify", 0))),
    DropReason("spoofed_source", "a container sent with a MAC or IPv4 not its own (or "
               "before its addresses were known)", (DropPoint("socket", "spoof_guard", 10),)),
    DropReason("invalid_source_mac", "a frame with a multicast, broadcast or zero source MAC "
               "(never valid, never learned)",
               (DropPoint("mesh", "mesh_isolation", 110), DropPoint("socket", "spoof_guard", 40))),
    DropReason("kill_switch", "privacy container traffic with no WARP port to leave by",
               (DropPoint("socket", "privacy_egress", 0), DropPoint("socket", "privacy_ct", 0))),
)
REASONS_BY_NAME = {r.name: r for r in DROP_REASONS}

_BY_PLACE = {(p.pipeline, p.table_number, p.priority): r
             for r in DROP_REASONS for p in r.points}


def drop_reason_at(pipeline: str, table: int, priority: int) -> DropReason | None:
    """The reason a flow at this place drops for, or None if it is no counted drop."""
    return _BY_PLACE.get((pipeline, table, priority))


def reasons_of(pipeline: str) -> tuple[DropReason, ...]:
    """The reasons with a drop point on bridges of this pipeline, in table order."""
    return tuple(r for r in DROP_REASONS if any(p.pipeline == pipeline for p in r.points))
