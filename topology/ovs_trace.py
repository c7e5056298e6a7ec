"""Reading `ovs-appctl ofproto/trace` and `ovs-appctl dpif/show` output. No I/O.

`ovs-appctl ofproto/trace BRIDGE FLOW [--ct-next FLAGS]...` is OVS's own
evaluation of the installed flows: each pass (the packet as received, then
one per ct(table=...) recirculation) lists the OpenFlow tables it visited,
as ``<table>. <match>, priority <p>, cookie <c>`` followed by the actions run,
and ends with ``Datapath actions: ...``. The datapath actions name DATAPATH
port numbers, which differ from OpenFlow port numbers: `parse_dpif_show`
gives the mapping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_TABLE_LINE = re.compile(
    r"^(?P<indent>\s*)(?P<table>\d+)\.\s+(?:(?P<match>.*?),\s+)?priority\s+(?P<priority>\d+)"
    r"(?:,\s+cookie\s+(?P<cookie>0x[0-9a-fA-F]+))?\s*$"
)
_NO_MATCH_LINE = re.compile(r"^\s*(?P<table>\d+)\.\s+No match\.?\s*$")
_LOAD_REG = re.compile(r"^\s*(?:load:(?P<v1>0x[0-9a-fA-F]+|\d+)->NXM_NX_(?P<r1>REG\d+)\[\]"
                       r"|set_field:(?P<v2>0x[0-9a-fA-F]+|\d+)->(?P<r2>reg\d+))\s*$")
_DP_ACTIONS = re.compile(r"^Datapath actions:\s*(?P<actions>.*)$")
_DPIF_BRIDGE = re.compile(r"^\s{2}(?P<bridge>\S+):\s*$")
_DPIF_PORT = re.compile(r"^\s{4}(?P<name>\S+)\s+(?P<ofport>\d+)/(?P<dpport>\d+):")


@dataclass(frozen=True)
class TableHit:
    """One flow an ofproto/trace pass found (``cookie`` None if OVS did not print one)."""

    table: int
    match: str
    priority: int
    cookie: int | None
    recirc: int  # 0: the packet as received, n: the n-th recirculation
    loads: tuple[tuple[str, int], ...] = ()  # (regN, value) loaded right there


@dataclass(frozen=True)
class OvsTrace:
    hits: tuple[TableHit, ...]
    datapath_actions: tuple[str, ...]  # one line per pass, in order
    text: str = field(default="", repr=False, compare=False)

    @property
    def final_actions(self) -> str:
        return self.datapath_actions[-1] if self.datapath_actions else ""

    def output_dp_ports(self) -> set[int]:
        """Datapath ports some pass outputs to (bare port numbers among the actions)."""
        out: set[int] = set()
        for line in self.datapath_actions:
            out.update(int(a) for a in split_actions(line) if a.isdigit())
        return out

    def hits_in(self, table: int) -> list[TableHit]:
        return [h for h in self.hits if h.table == table]

    def ct_commits(self) -> list[CtCommit]:
        """The ``ct(commit,...)`` datapath actions, in order."""
        out = []
        for line in self.datapath_actions:
            for action in split_actions(line):
                if action.startswith("ct(") and action.endswith(")"):
                    args = split_actions(action[3:-1])
                    if "commit" in args:
                        out.append(CtCommit.parse(args))
        return out


@dataclass(frozen=True)
class CtCommit:
    """What one ``ct(commit,zone=Z,mark=V/M,label=V/M)`` datapath action stores."""

    zone: int = 0
    mark: tuple[int, int] | None = None  # (value, mask)
    label: tuple[int, int] | None = None

    @classmethod
    def parse(cls, args: Iterable[str]) -> CtCommit:
        kw: dict[str, object] = {}
        for arg in args:
            key, _, value = arg.partition("=")
            if key == "zone":
                kw["zone"] = int(value, 0)
            elif key in ("mark", "label"):
                v, _, m = value.partition("/")
                kw[key] = (int(v, 0), int(m, 0) if m else -1)
        return cls(**kw)  # type: ignore[arg-type]

    def applied(self, mark: int = 0, label: int = 0) -> tuple[int, int]:
        """(ct_mark, ct_label) of a connection that had ``mark``/``label`` before the commit."""
        def put(old: int, new: tuple[int, int] | None) -> int:
            if new is None:
                return old
            value, mask = new
            return value if mask == -1 else (old & ~mask) | (value & mask)
        return put(mark, self.mark), put(label, self.label)


def split_actions(text: str) -> list[str]:
    """Top-level comma-separated actions: ``ct(a,b),recirc(0x1),2`` -> 3 items."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return [p for p in parts if p]


def parse_trace(text: str) -> OvsTrace:
    """Parse the output of one ``ovs-appctl ofproto/trace``."""
    hits: list[TableHit] = []
    dp_actions: list[str] = []
    recirc = 0
    current: dict[str, object] | None = None
    loads: list[tuple[str, int]] = []

    def flush() -> None:
        nonlocal current, loads
        if current is not None:
            hits.append(TableHit(loads=tuple(loads), **current))  # type: ignore[arg-type]
        current, loads = None, []

    for line in text.splitlines():
        if m := _DP_ACTIONS.match(line):
            flush()
            dp_actions.append(m["actions"].strip())
            continue
        if line.startswith("recirc(") or "resume conntrack" in line:
            flush()
            if line.startswith("recirc("):
                recirc += 1
            continue
        if m := _TABLE_LINE.match(line):
            flush()
            cookie = int(m["cookie"], 16) if m["cookie"] else None
            current = {"table": int(m["table"]), "match": m["match"] or "",
                       "priority": int(m["priority"]), "cookie": cookie, "recirc": recirc}
            continue
        if _NO_MATCH_LINE.match(line):
            flush()
            continue
        if current is not None and (m := _LOAD_REG.match(line)):
            reg = (m["r1"] or m["r2"]).lower()
            loads.append((reg, int(m["v1"] or m["v2"], 0)))
    flush()
    return OvsTrace(tuple(hits), tuple(dp_actions), text)


def parse_dpif_show(text: str) -> dict[str, dict[int, int]]:
    """``ovs-appctl dpif/show`` -> bridge -> OpenFlow port -> datapath port."""
    out: dict[str, dict[int, int]] = {}
    bridge: str | None = None
    for line in text.splitlines():
        if m := _DPIF_BRIDGE.match(line):
            bridge = m["bridge"]
            out.setdefault(bridge, {})
        elif bridge is not None and (m := _DPIF_PORT.match(line)):
            out[bridge][int(m["ofport"])] = int(m["dpport"])
    return out


def flow_spec(fields: Mapping[str, object] | Iterable[tuple[str, object]]) -> str:
    """``{"in_port": 1, "tcp": None, ...}`` -> ``in_port=1,tcp,...`` (None: a bare keyword)."""
    items = fields.items() if isinstance(fields, Mapping) else fields
    return ",".join(k if v is None else f"{k}={v}" for k, v in items)
