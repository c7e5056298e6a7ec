"""What Open vSwitch refuses in a flow as a whole, checked once. Pure, no os-ken.

`check_flow` is the one check: the encoder (controller/encode.py) runs it on every flow
it packs, before the bytes can fail a whole bundle on the switch; the simulator
(topology/simulate.py) runs it on every flow it installs, after checking every value of
the match. It reads the field table (`topology.openflow`): known fields, masks,
prerequisites (ovs-fields(7)), writability, subfield widths; and OVS's rules for
conjunctions, ct, learn, meters and goto_table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from topology.model import (
    CT_STATE_BITS,
    Ct,
    Flow,
    Learn,
    LearnSpec,
    MatchValue,
    MoveField,
    Output,
    OutputReg,
    Resubmit,
    SetField,
    SetReg,
    ToController,
)
from topology.openflow import (
    FIELDS,
    IP_ETH_TYPES,
    MAX_CONJ_CLAUSES,
    MAX_CONJ_ID,
    MAX_CT_ZONE,
    MAX_METER,
    MAX_PRIORITY,
    MAX_TABLE,
    RESERVED_PORTS,
    FlowError,
    Subfield,
    Values,
    field,
    is_immediate,
    match_value,
    need_prereqs,
    parse_subfield,
    register,
    to_int,
)

# fields whose value the whole-flow check reads (prerequisites, ct's +inv): their full mask
_READ_BY_CHECKS = {n: FIELDS[n].full
                   for n in {n for f in FIELDS.values() for n, _ in f.prereqs} | {"ct_state"}}
_PREREQS = {f.name: f.prereqs for f in FIELDS.values() if f.prereqs}
# fields of which `check_flow` need not read any value (not those, no prerequisites),
# and whether they are maskable
_QUIET_FIELDS = {f.name: f.maskable for f in FIELDS.values()
                 if not f.prereqs and f.name not in _READ_BY_CHECKS}


def _need_writable(name: str) -> None:
    if not FIELDS[name].writable:
        raise FlowError(f"{name} is read-only")


def checked_values(match: Iterable[tuple[str, MatchValue]]) -> Values:
    """What `check_flow` reads of a match, checked: every field known and not masked
    unless maskable, and the (value, mask) of the fields the check looks at. The
    simulator passes every value (`match_value`) instead."""
    return _read_match(match)[0]


def _read_match(match: Iterable[tuple[str, MatchValue]]) -> tuple[Values, bool]:
    """`checked_values`, and whether some field has prerequisites (one pass: this runs
    for every flow the encoder packs)."""
    out: dict[str, tuple[int, int]] | None = None
    dependent = False
    for name, value in match:
        full = _READ_BY_CHECKS.get(name)
        if full is not None:
            if out is None:
                out = {}
            out[name] = (value, full) if type(value) is int else match_value(name, value)
            if not dependent:
                dependent = name in _PREREQS
            continue
        maskable = _QUIET_FIELDS.get(name)
        if maskable is None:  # a field with prerequisites, or no field at all
            spec = FIELDS.get(name)
            if spec is None:
                raise FlowError(f"unknown field {name!r}")
            dependent = True
            maskable = spec.maskable
        if not maskable and type(value) is not int:
            match_value(name, value)
    return (_NOTHING if out is None else out), dependent


_NOTHING: Values = MappingProxyType({})
_UNMATCHED = (0, 0)


@dataclass(frozen=True)
class ConjClause:
    """conjunction(id, clause/n_clauses), read from any action class named Conjunction
    (the simulator's tests bring their own)."""

    id: int
    clause: int
    n_clauses: int


def conjunction(action: object) -> ConjClause | None:
    if type(action).__name__ != "Conjunction":
        return None
    try:
        return _CLAUSES[action]  # a large policy is 100k of them, a few per rule apart
    except (KeyError, TypeError):  # TypeError: not hashable
        pass
    conj: Any = action
    try:
        clause = ConjClause(int(conj.id), int(conj.clause), int(conj.n_clauses))
    except (AttributeError, TypeError, ValueError):
        raise FlowError(f"{action!r}: a Conjunction needs integer id, clause, n_clauses") from None
    if len(_CLAUSES) >= 1 << 16:
        _CLAUSES.clear()
    with contextlib.suppress(TypeError):
        _CLAUSES[action] = clause
    return clause


_CLAUSES: dict[object, ConjClause] = {}


def conjunctions(flow: Flow) -> tuple[ConjClause, ...]:
    """The flow's conjunction clauses; OVS refuses them mixed with anything else."""
    clauses = tuple(c for a in flow.actions if (c := conjunction(a)) is not None)
    if not clauses:
        return ()
    if len(clauses) != len(flow.actions) or flow.goto is not None:
        raise FlowError("a flow with conjunction actions may have no other action or "
                        "goto_table (OVS rejects it)")
    for c in clauses:
        if not 2 <= c.n_clauses <= MAX_CONJ_CLAUSES or not 1 <= c.clause <= c.n_clauses:
            raise FlowError(f"conjunction({c.id},{c.clause}/{c.n_clauses}) needs "
                            f"1 <= k <= n and 2 <= n <= {MAX_CONJ_CLAUSES}")
        if not 0 <= c.id <= MAX_CONJ_ID:
            raise FlowError(f"conjunction id {c.id} does not fit 32 bits")
    return clauses


OtherAction = Callable[[Any, Values], None]


def check_flow(flow: Flow, values: Values | None = None,
               other: OtherAction | None = None) -> tuple[ConjClause, ...]:
    """Raise FlowError for what OVS refuses in a flow as a whole (on flow-mod, failing
    the whole bundle): table, priority, meter and goto_table out of range or backwards;
    unknown fields, masks on fields that cannot be masked, match prerequisites (ipv4_src
    needs eth_type=0x800, nd_sll an NS ...) for the match and for every field an action
    reads or writes; conjunctions mixed with other actions; ct without an IPv4/IPv6
    eth_type, ct(commit) on +inv, ct exec without commit; learn specs whose widths or
    prerequisites do not fit. Returns the conjunction clauses.

    ``values``: the match as (value, mask) integers if the caller has them (the
    simulator, which also checks every value), else `checked_values` reads what the
    check needs. ``other`` checks actions that are not model actions (the simulator's
    learned loads). In two halves (`check_flow_match`, `check_flow_actions`) so that
    the encoder checks a list of actions that does not read the match
    (`actions_read_match`) once, not once per flow.
    """
    return check_flow_actions(flow, check_flow_match(flow, values), other)


def check_flow_match(flow: Flow, values: Values | None = None) -> Values:
    """The first half of `check_flow`: table, priority, meter, goto_table and the match.
    Returns the match values the actions' checks need. Runs for every flow the encoder
    packs: keep it cheap."""
    table, goto, meter = flow.table, flow.goto, flow.meter
    if not 0 <= table <= MAX_TABLE:
        raise FlowError(f"table {table} is not 0..{MAX_TABLE}")
    if not 0 <= flow.priority <= MAX_PRIORITY:
        raise FlowError(f"priority {flow.priority} is not 0..{MAX_PRIORITY}")
    if meter is not None and not 1 <= meter <= MAX_METER:
        raise FlowError(f"meter id {meter} out of range 1..{MAX_METER:#x}")
    if goto is not None and not table < goto <= MAX_TABLE:
        raise FlowError("goto_table must go to a later table (OFPBIC_BAD_TABLE_ID)")
    match = flow.match
    if values is None:
        values, dependent = _read_match(match)
        if not dependent:  # no field with prerequisites (in_port, eth_src, registers ...)
            return values
    for name, _ in match:
        for prereq, allowed in _PREREQS.get(name, ()):
            value, mask = values.get(prereq, _UNMATCHED)
            if (value & mask) not in allowed:
                need_prereqs(name, values)  # raises, naming them all
    return values


def check_flow_actions(flow: Flow, values: Values,
                       other: OtherAction | None = None) -> tuple[ConjClause, ...]:
    """The second half of `check_flow`: the actions, given the match's ``values``."""
    for action in flow.actions:
        check = _ACTION_CHECKS.get(type(action))
        if check is not None:
            check(action, values)
        elif type(action).__name__ == "Conjunction":
            return conjunctions(flow)
        elif other is not None:
            other(action, values)
        else:
            raise FlowError(f"unknown action {action!r}")
    return ()


def actions_read_match(actions: Iterable[object]) -> bool:
    """Does the check of these actions depend on the match (prerequisites of the fields
    they use, ct's eth_type)? If not, `check_flow_actions` gives the same verdict for
    every flow with these actions and goto_table."""
    return any(type(a) not in _MATCH_FREE_ACTIONS and type(a).__name__ != "Conjunction"
               for a in actions)


def _check_output(action: Output, _values: Values) -> None:
    port = action.port
    if type(port) is int:
        if not 0 <= port <= 0xFFFFFFFF:
            raise FlowError(f"bad port {port}")
    elif port not in RESERVED_PORTS:
        raise FlowError(f"unsupported port {port!r}")


def _check_output_reg(action: OutputReg, _values: Values) -> None:
    register(action.reg)


def _check_set_reg(action: SetReg, _values: Values) -> None:
    spec = register(action.reg)
    value = action.value
    if type(value) is not int or not 0 <= value <= spec.full:
        to_int(spec, value)  # the error, or a value in another spelling that fits


def _check_set_field(action: SetField, values: Values) -> None:
    spec = field(action.field)
    _need_writable(spec.name)
    need_prereqs(spec.name, values)
    if isinstance(action.value, tuple):
        raise FlowError(f"set_field {spec.name}: a masked value {action.value!r}")
    to_int(spec, action.value)


def _check_move(action: MoveField, values: Values) -> None:
    s, d = parse_subfield(action.src), parse_subfield(action.dst)
    if s.nbits != d.nbits:
        raise FlowError(f"move {action.src} -> {action.dst}: {s.nbits} vs {d.nbits} bits")
    _need_writable(d.field)
    need_prereqs(s.field, values)
    need_prereqs(d.field, values)


def _check_resubmit(action: Resubmit, _values: Values) -> None:
    if not 0 <= action.table <= MAX_TABLE:
        raise FlowError(f"resubmit to table {action.table}: not 0..{MAX_TABLE}")


def _check_controller(action: ToController, _values: Values) -> None:
    if not 0 <= action.max_len <= 0xFFFF:
        raise FlowError(f"CONTROLLER:{action.max_len}: max_len does not fit 16 bits")
    if action.meter is not None and not 0 < action.meter < MAX_METER:
        raise FlowError(f"controller(meter_id={action.meter}): out of range")


def _check_ct(ct: Ct, values: Values) -> None:
    if not 0 <= ct.zone <= MAX_CT_ZONE:
        raise FlowError(f"ct zone {ct.zone} is not 16 bits")
    if ct.table is not None and not 0 <= ct.table <= MAX_TABLE:
        raise FlowError(f"ct table {ct.table} is not 0..{MAX_TABLE}")
    eth_type, eth_mask = values.get("eth_type", (0, 0))
    if eth_mask != FIELDS["eth_type"].full or eth_type not in IP_ETH_TYPES:
        raise FlowError("ct needs eth_type=0x800 or 0x86dd in the match "
                        "(OVS: OFPBAC_MATCH_INCONSISTENT)")
    state, mask = values.get("ct_state", (0, 0))
    if ct.commit and state & mask & CT_STATE_BITS["inv"]:
        raise FlowError("ct(commit) on ct_state=+inv (OVS: OFPBAC_MATCH_INCONSISTENT)")
    if not ct.commit and (ct.mark is not None or ct.label is not None):
        raise FlowError("ct exec (ct_mark, ct_label) needs commit (OVS: OFPBAC_BAD_ARGUMENT)")
    if ct.mark is not None and (ct.mark[0] & ~ct.mark[1] or ct.mark[1] >> 32
                                or ct.mark[0] < 0 or ct.mark[1] < 0):
        raise FlowError(f"bad ct_mark value/mask {ct.mark}")
    if ct.label is not None and ct.label < 0:  # only its low 32 bits are written
        raise FlowError(f"ct label {ct.label} is negative")


def _learn_source(spec: LearnSpec, dst: Subfield, values: Values) -> None:
    if not is_immediate(spec.src):
        src = parse_subfield(spec.src)
        if src.nbits != dst.nbits:
            raise FlowError(f"learn {spec.src} -> {spec.dst}: widths differ "
                            f"({src.nbits} vs {dst.nbits} bits)")
        need_prereqs(src.field, values)
    elif int(spec.src, 0) >> dst.nbits:
        raise FlowError(f"learn immediate {spec.src} does not fit {spec.dst}")


def check_learn(learn: Learn, values: Values) -> None:
    """learn_check() of OVS: sources valid in this flow, destinations in the learned one.

    Match specs build the learned match in order, so a prerequisite (e.g.
    "0x800" -> NXM_OF_ETH_TYPE[]) must come before the field that needs it.
    """
    if not 0 <= learn.table <= MAX_TABLE:
        raise FlowError(f"learn table {learn.table} is not 0..{MAX_TABLE}")
    learned: dict[str, tuple[int, int]] = {}
    for spec in learn.specs:
        if spec.kind == "output":
            need_prereqs(parse_subfield(spec.src).field, values)
            continue
        if spec.kind not in ("match", "load"):
            raise FlowError(f"unknown learn spec kind {spec.kind!r}")
        dst = parse_subfield(spec.dst)
        _learn_source(spec, dst, values)
        need_prereqs(dst.field, learned, "(learned flow) ")
        if spec.kind == "load":
            _need_writable(dst.field)
        elif is_immediate(spec.src):  # OVS records immediates only (learn_check)
            value = int(spec.src, 0) << dst.start
            old_v, old_m = learned.get(dst.field, (0, 0))
            learned[dst.field] = ((old_v & ~dst.mask) | value, old_m | dst.mask)


_ACTION_CHECKS: dict[type, Callable[[Any, Values], None]] = {
    Output: _check_output,
    OutputReg: _check_output_reg,
    SetReg: _check_set_reg,
    SetField: _check_set_field,
    MoveField: _check_move,
    Resubmit: _check_resubmit,
    Ct: _check_ct,
    Learn: check_learn,
    ToController: _check_controller,
}
_MATCH_FREE_ACTIONS = frozenset({Output, OutputReg, SetReg, Resubmit, ToController})
