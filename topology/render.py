"""Flows as `ovs-ofctl add-flows` text: what `socknet flows` prints. Field spellings
come from the field table (`topology.openflow.FIELDS`)."""

from __future__ import annotations

from collections.abc import Iterable

from topology.model import (
    CT_STATE_BITS,
    LEARNED_COOKIE,
    Action,
    Conjunction,
    Ct,
    Flow,
    Learn,
    MatchValue,
    MoveField,
    Output,
    OutputReg,
    Resubmit,
    SetField,
    SetReg,
    ToController,
)
from topology.openflow import FIELDS


def _ct_state_text(value: int, mask: int) -> str:
    out = []
    for name, bit in CT_STATE_BITS.items():
        if mask & bit:
            out.append(("+" if value & bit else "-") + name)
    return "".join(out)


def match_text(name: str, value: MatchValue) -> str:
    field = FIELDS[name].ofctl
    if name == "ct_state":
        assert isinstance(value, tuple)
        return f"ct_state={_ct_state_text(int(value[0]), int(value[1]))}"
    if name == "eth_type":
        return f"dl_type=0x{int(value):04x}"  # type: ignore[arg-type]
    if isinstance(value, tuple):
        v, m = value
        v_text = f"0x{v:x}" if isinstance(v, int) else v
        m_text = f"0x{m:x}" if isinstance(m, int) else m
        return f"{field}={v_text}/{m_text}"
    return f"{field}={value}"


def action_text(action: Action) -> str:
    match action:
        case Output(port=port):
            if port == "IN_PORT":
                return "in_port"
            return f"output:{port}"
        case OutputReg(reg=reg):
            return f"output:{FIELDS[reg].nxm}[0..15]"
        case SetReg(reg=reg, value=value):
            return f"load:0x{value:x}->{FIELDS[reg].nxm}[]"
        case SetField(field=field, value=value):
            return f"set_field:{value}->{FIELDS[field].ofctl}"
        case MoveField(src=src, dst=dst):
            return f"move:{src}->{dst}"
        case Resubmit(table=table):
            return f"resubmit(,{table})"
        case Ct(zone=zone, commit=commit, table=table, mark=mark, label=label):
            parts = (["commit"] if commit else []) + [f"zone={zone}"]
            if table is not None:
                parts.append(f"table={table}")
            execs = []
            if mark is not None:
                execs.append(f"set_field:0x{mark[0]:x}/0x{mark[1]:x}->ct_mark")
            if label is not None:
                execs.append(f"set_field:0x{label:x}/0xffffffff->ct_label")
            if execs:
                parts.append(f"exec({','.join(execs)})")
            return f"ct({','.join(parts)})"
        case Conjunction(id=cid, clause=clause, n_clauses=n):
            return f"conjunction({cid},{clause}/{n})"
        case ToController(max_len=max_len, meter=None):
            return f"CONTROLLER:{max_len}"
        case ToController(max_len=max_len, meter=meter):
            return f"controller(max_len={max_len},meter_id={meter})"
        case Learn(table=table, priority=priority, idle_timeout=idle, specs=specs):
            parts = [f"table={table}", f"idle_timeout={idle}", f"priority={priority}",
                     f"cookie=0x{LEARNED_COOKIE:x}"]
            for spec in specs:
                if spec.kind == "match":
                    parts.append(f"{spec.dst}={spec.src}")
                elif spec.kind == "load":
                    parts.append(f"load:{spec.src}->{spec.dst}")
                else:
                    parts.append(f"output:{spec.src}")
            return f"learn({','.join(parts)})"
    raise TypeError(f"cannot render action {action!r}")


def flow_text(flow: Flow) -> str:
    head = [f"cookie=0x{flow.cookie:x}", f"table={flow.table}", f"priority={flow.priority}"]
    if flow.idle_timeout:
        head.append(f"idle_timeout={flow.idle_timeout}")
    if flow.hard_timeout:
        head.append(f"hard_timeout={flow.hard_timeout}")
    head += [match_text(name, value) for name, value in flow.match]
    acts = [f"meter:{flow.meter}"] if flow.meter is not None else []
    acts += [action_text(a) for a in flow.actions]
    if flow.goto is not None:
        acts.append(f"goto_table:{flow.goto}")
    return ",".join(head) + " actions=" + (",".join(acts) if acts else "drop")


def sort_key(flow: Flow) -> tuple[int, int, str]:
    return (flow.table, -flow.priority, repr(flow.match))


def flows_text(flows: Iterable[Flow], *, comments: bool = False) -> str:
    lines = []
    for f in sorted(flows, key=sort_key):
        if comments and f.note:
            lines.append(f"# {f.note}")
        lines.append(flow_text(f))
    return "\n".join(lines) + ("\n" if lines else "")
