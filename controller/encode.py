"""Flow values -> os-ken OpenFlow 1.4 messages: flow-mods, deletes and bundles.

Every `topology.model` action maps onto exactly the wire action that
``ovs-ofctl`` itself produces for the text `topology.render` prints, so what
``socknet flows`` shows is what the controller sends (tests/test_encode.py
decodes both with ``ovs-ofctl ofp-parse`` / ``parse-flows`` and compares):

=========================  ===========================================================
model                      os-ken (OpenFlow 1.4 + Nicira extensions)
=========================  ===========================================================
Output(3 / "IN_PORT")      OFPActionOutput(port, max_len=0)
OutputReg("reg1")          NXActionOutputReg(ofs_nbits(0, 15), "reg1", max_len=0xffff)
SetReg("reg0", v)          NXActionRegLoad(ofs_nbits(0, 31), "reg0", v)  ("load:", not
                           RegLoad2/SetField: those decode as "set_field:v->reg0")
SetField(f, v)             OFPActionSetField(f=v)
MoveField(src, dst)        NXActionRegMove(src_field, dst_field, n_bits, src_ofs, dst_ofs)
Resubmit(t)                NXActionResubmitTable(in_port=0xfff8, table_id=t)
Ct(zone, commit, table,    NXActionCT(flags, zone_src="", zone_ofs_nbits=zone, table|0xff,
   mark, label)              actions=[...]): the exec() loads, see `masked_set_field`:
                           ct_mark mask all ones -> OFPActionSetField(ct_mark=v), else
                           one NXActionRegLoad per contiguous run of mask bits;
                           label -> NXActionRegLoad(ofs_nbits(0, 31), "ct_label", v)
Conjunction(id, k, n)      NXActionConjunction(clause=k - 1, n_clauses=n, id_=id)
                           (the wire clause is 0-based; ovs-ofctl prints k = clause + 1)
ToController(max_len)      OFPActionOutput(OFPP_CONTROLLER, max_len)
Learn(...)                 NXActionLearn(table_id, specs=[NXFlowSpecMatch/Load/Output])
Flow.meter = N             OFPInstructionMeter(N), first instruction ("meter:N" first)
=========================  ===========================================================

`meter_mod` builds the OFPMeterMod (one drop band, packets per second, with burst)
that creates or changes a meter. Send it before any flow naming the meter (OVS
refuses such a flow with OFPMMFC_INVALID_METER) and outside bundles (OVS does not
take meter mods in a bundle).

Every field name (match keys, SetField, subfields such as "NXM_OF_ETH_SRC[]" or
"NXM_NX_REG1[0..15]") is resolved through `topology.openflow.FIELDS`: a subfield
becomes os-ken's NXM-class field (``eth_src_nxm``, ``reg1``; see `NXM_FIELDS`), so it
keeps the width OVS gives it (NXM_OF_IN_PORT is 16 bits, OXM in_port 32). Every flow
passes `topology.flowcheck.check_flow` before it is encoded.

Speed: building and serializing one OFPFlowMod costs tens of microseconds in
os-ken. `flow_mod_add` caches, per (parser, Flow), the OFPMatch, the
instructions and their serialized bytes; the message it returns serializes by
packing the 40 fixed bytes and appending the cached tail.
"""

from __future__ import annotations

import functools
import inspect
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from os_ken.lib.pack_utils import msg_pack_into
from os_ken.ofproto import nicira_ext, ofproto_v1_4, ofproto_v1_4_parser

from topology import flowcheck, openflow
from topology.model import (
    ALL_ONES64,
    LEARNED_COOKIE,
    Action,
    Conjunction,
    Ct,
    Flow,
    Learn,
    LearnSpec,
    MoveField,
    Output,
    OutputReg,
    Resubmit,
    SetField,
    SetReg,
    ToController,
)

CACHE_SIZE = 1 << 12  # os-ken objects of recently encoded flows (kilobytes each)
WIRE_CACHE_SIZE = 1 << 18  # serialized match+instructions per flow (~100-300 bytes each)

BUNDLE_FLAGS_NAMES = ("OFPBF_ATOMIC", "OFPBF_ORDERED")

# NXM name -> os-ken field name (from the field table). The *_nxm names carry the NXM
# header (class 0/1) and the NXM width, exactly what ovs-ofctl means by the NXM name.
NXM_FIELDS: dict[str, str] = {f.nxm: f.nxm_field for f in openflow.FIELDS.values()}
# model name -> os-ken name in OFPMatch / OFPActionSetField, where they differ
_OSKN_NAMES = {f.name: f.oskn for f in openflow.FIELDS.values() if f.oskn}

_IN_PORT_16 = 0xFFF8  # OFPP_IN_PORT in 16 bits: "resubmit(,T)" keeps the in_port
_OUTPUT_REG_MAX_LEN = 0xFFFF  # what ovs-ofctl puts in output:<subfield>
_METER_COMMANDS = {"add": "OFPMC_ADD", "modify": "OFPMC_MODIFY"}


class DatapathLike(Protocol):
    """An os-ken Datapath, or anything with its ``ofproto`` / ``ofproto_parser`` modules."""

    ofproto: ModuleType
    ofproto_parser: ModuleType


@dataclass(frozen=True)
class Subfield:
    """A parsed "NXM_NX_REG1[0..15]": os-ken field name, first bit, number of bits."""

    field: str
    ofs: int
    n_bits: int

    @property
    def ofs_nbits(self) -> int:
        return nicira_ext.ofs_nbits(self.ofs, self.ofs + self.n_bits - 1)


# ---------------------------------------------------------------- fields


@functools.cache
def _field_widths(ofproto: ModuleType) -> dict[str, int]:
    return {f.name: f.type.size * 8 for f in ofproto.oxm_types}


def field_bits(ofproto: ModuleType, field: str) -> int:
    """Width in bits of an os-ken field name (``reg1`` -> 32, ``in_port_nxm`` -> 16)."""
    try:
        return _field_widths(ofproto)[field]
    except KeyError:
        raise ValueError(f"unknown os-ken field {field!r}") from None


@functools.cache
def parse_subfield(text: str, ofproto: ModuleType) -> Subfield:
    """ "NXM_OF_ETH_SRC[]" / "NXM_NX_REG1[0..15]" / "NXM_NX_REG1[3]" -> the os-ken view of
    `topology.openflow.parse_subfield` (the NXM field, so the NXM width applies)."""
    sub = openflow.parse_subfield(text)
    return Subfield(sub.spec.nxm_field, sub.start, sub.nbits)


# ---------------------------------------------------------------- actions


def _port_number(ofproto: ModuleType, port: int | str) -> int:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    number = getattr(ofproto, f"OFPP_{port.upper()}", None)
    if not isinstance(number, int):
        raise ValueError(f"unknown reserved port {port!r}")
    return number


def _mask_runs(mask: int) -> Iterable[tuple[int, int]]:
    """(first bit, number of bits) of each run of ones in ``mask``, lowest first."""
    ofs = 0
    while mask:
        while not mask & 1:
            mask >>= 1
            ofs += 1
        n = 0
        while mask & 1:
            mask >>= 1
            n += 1
        yield ofs, n
        ofs += n


def masked_set_field(parser: ModuleType, ofproto: ModuleType, field: str, value: int,
                     mask: int) -> list[Any]:
    """The OpenFlow 1.4 actions OVS encodes ``set_field:value/mask->field`` as.

    A whole field is an OFPAT_SET_FIELD; a partial one (OF1.4 has no masked set-field)
    one NXAST_REG_LOAD per contiguous run of mask bits, lowest run first, loading the
    value's bits there (value bits outside the mask are dropped, as ovs-ofctl does;
    an empty mask is no action at all). ``field`` is an os-ken name ("ct_mark").
    """
    width = field_bits(ofproto, field)
    mask &= (1 << width) - 1
    value &= mask
    if mask == (1 << width) - 1:
        return [parser.OFPActionSetField(**{field: value})]
    out = []
    for ofs, n_bits in _mask_runs(mask):
        if n_bits > 64:
            raise ValueError(f"set_field on {field}: a run of {n_bits} mask bits does not fit "
                             "one 64-bit load")
        out.append(parser.NXActionRegLoad(ofs_nbits=nicira_ext.ofs_nbits(ofs, ofs + n_bits - 1),
                                          dst=field, value=(value >> ofs) & ((1 << n_bits) - 1)))
    return out


def _ct_exec(parser: ModuleType, ofproto: ModuleType, ct: Ct) -> list[Any]:
    nested: list[Any] = []
    if ct.mark is not None:
        nested += masked_set_field(parser, ofproto, "ct_mark", ct.mark[0], ct.mark[1])
    if ct.label is not None:
        nested += masked_set_field(parser, ofproto, "ct_label", ct.label, openflow.CT_LABEL_MASK)
    return nested


def _learn_spec(parser: ModuleType, ofproto: ModuleType, spec: LearnSpec) -> Any:
    """One learn spec (checked by `topology.flowcheck.check_learn`)."""
    if spec.kind == "output":
        src = parse_subfield(spec.src, ofproto)
        return parser.NXFlowSpecOutput(src=(src.field, src.ofs), n_bits=src.n_bits, dst="")
    dst = parse_subfield(spec.dst, ofproto)
    src_value: int | tuple[str, int]
    if openflow.is_immediate(spec.src):
        src_value = int(spec.src, 0)
    else:
        src = parse_subfield(spec.src, ofproto)
        src_value = (src.field, src.ofs)
    cls = parser.NXFlowSpecMatch if spec.kind == "match" else parser.NXFlowSpecLoad
    return cls(src=src_value, dst=(dst.field, dst.ofs), n_bits=dst.n_bits)


def encode_action(parser: ModuleType, ofproto: ModuleType, action: Action) -> Any:
    """One model action -> one os-ken action object. The action must have passed
    `topology.flowcheck.check_flow` (as every flow does before it is encoded here)."""
    match action:
        case Output(port=port):
            number = _port_number(ofproto, port)
            max_len = ofproto.OFPCML_NO_BUFFER if number == ofproto.OFPP_CONTROLLER else 0
            return parser.OFPActionOutput(number, max_len)
        case OutputReg(reg=reg):
            src = parse_subfield(f"{reg}[0..15]", ofproto)
            return parser.NXActionOutputReg(ofs_nbits=src.ofs_nbits, src=src.field,
                                            max_len=_OUTPUT_REG_MAX_LEN)
        case SetReg(reg=reg, value=value):
            spec = openflow.register(reg)
            return parser.NXActionRegLoad(ofs_nbits=nicira_ext.ofs_nbits(0, spec.width - 1),
                                          dst=spec.nxm_field, value=value)
        case SetField(field=field, value=value):
            return parser.OFPActionSetField(**{openflow.field(field).oskn_name: value})
        case MoveField(src=src_text, dst=dst_text):
            src = parse_subfield(src_text, ofproto)
            dst = parse_subfield(dst_text, ofproto)
            return parser.NXActionRegMove(src_field=src.field, dst_field=dst.field,
                                          n_bits=src.n_bits, src_ofs=src.ofs, dst_ofs=dst.ofs)
        case Resubmit(table=table):
            return parser.NXActionResubmitTable(in_port=_IN_PORT_16, table_id=table)
        case Ct(zone=zone, commit=commit, table=table):
            return parser.NXActionCT(
                flags=nicira_ext.NX_CT_F_COMMIT if commit else 0,
                zone_src="",  # empty: zone_ofs_nbits holds the immediate zone
                zone_ofs_nbits=zone,
                recirc_table=nicira_ext.NX_CT_RECIRC_NONE if table is None else table,
                alg=0,
                actions=_ct_exec(parser, ofproto, action),
            )
        case Conjunction(id=cid, clause=clause, n_clauses=n):
            return parser.NXActionConjunction(clause=clause - 1, n_clauses=n, id_=cid)
        case ToController(max_len=max_len, meter=meter):
            if meter is None:
                return parser.OFPActionOutput(ofproto.OFPP_CONTROLLER, max_len)
            return _controller_with_meter(parser, max_len, meter)
        case Learn(table=table, priority=priority, idle_timeout=idle, specs=specs):
            return parser.NXActionLearn(
                table_id=table,
                specs=[_learn_spec(parser, ofproto, s) for s in specs],
                idle_timeout=idle,
                hard_timeout=0,
                priority=priority,
                cookie=LEARNED_COOKIE,
                flags=0,
            )
    raise TypeError(f"cannot encode action {action!r}")


# ---------------------------------------------------------------- flows (cached)


@dataclass(frozen=True)
class Encoded:
    """A Flow in os-ken terms. Shared between messages: never mutate."""

    cookie: int
    match: Any  # OFPMatch
    instructions: tuple[Any, ...]  # OFPInstruction*
    tail: bytes  # match + instructions, serialized


def _serialize_tail(match: Any, instructions: Sequence[Any]) -> bytes:
    buf = bytearray()
    offset = match.serialize(buf, 0)
    for inst in instructions:
        inst.serialize(buf, offset)
        offset += inst.len
    return bytes(buf)


def check_flow(flow: Flow) -> None:
    """`topology.flowcheck.check_flow` (what OVS refuses in a whole flow: on the switch one
    such flow fails the whole bundle), its FlowError (a ValueError) naming the flow."""
    try:
        flowcheck.check_flow(flow)
    except openflow.FlowError as exc:
        raise openflow.FlowError(f"{flow!r}: {exc}") from None


@functools.lru_cache(maxsize=CACHE_SIZE)
def _encoded(parser: ModuleType, flow: Flow) -> Encoded:
    ofproto = parser.ofproto
    check_flow(flow)
    match = parser.OFPMatch(**{_OSKN_NAMES.get(name, name): value for name, value in flow.match})
    instructions: list[Any] = []
    if flow.meter is not None:  # OVS decodes the instructions in the order meter, apply, goto
        instructions.append(parser.OFPInstructionMeter(flow.meter))
    if flow.actions:
        actions = [encode_action(parser, ofproto, a) for a in flow.actions]
        instructions.append(parser.OFPInstructionActions(ofproto.OFPIT_APPLY_ACTIONS, actions))
    if flow.goto is not None:
        instructions.append(parser.OFPInstructionGotoTable(flow.goto))
    return Encoded(flow.cookie, match, tuple(instructions), _serialize_tail(match, instructions))


def encoded(dp: DatapathLike, flow: Flow) -> Encoded:
    """The cached os-ken encoding of ``flow`` (built on first use)."""
    return _encoded(dp.ofproto_parser, flow)


def cache_info() -> Any:
    """``functools`` cache statistics of the per-Flow encoding cache."""
    return _encoded.cache_info()


def cache_clear() -> None:
    """Forget every cached encoding (tests; or to release memory after a large churn):
    per flow, and the per-field and per-instruction pieces flows are packed from."""
    _encoded.cache_clear()
    _TAILS.clear()
    _INSTRUCTIONS.clear()


# parser -> {Flow: match + instructions bytes}. A plain dict, emptied when full: an LRU
# costs two more objects per flow for the cyclic collector to walk, which at 100k new
# flows cost more than the packing itself.
_TAILS: dict[ModuleType, dict[Flow, bytes]] = {}


def _wire_tail(parser: ModuleType, flow: Flow) -> bytes:
    """Only the bytes of match + instructions: what big bundles need, kept for many flows
    (the os-ken objects behind them would cost kilobytes per flow)."""
    tails = _TAILS.get(parser)
    if tails is None:
        tails = _TAILS[parser] = {}
    tail = tails.get(flow)
    if tail is None:
        tail = _new_wire_tail(parser, flow, tails)
    return tail


def _new_wire_tail(parser: ModuleType, flow: Flow, tails: dict[Flow, bytes]) -> bytes:
    """Packed from per-field OXM TLVs and cached instruction bytes, many times cheaper
    than building an OFPMatch; byte-identical to os-ken's own serialization
    (tests/test_encode.py). Kept in ``tails``."""
    tail = _pack_wire_tail(parser, flow)
    if len(tails) >= WIRE_CACHE_SIZE:
        tails.clear()
    tails[flow] = tail
    return tail


def _pack_wire_tail(parser: ModuleType, flow: Flow) -> bytes:
    key = (parser, flow.actions, flow.goto, flow.meter)
    found = _INSTRUCTIONS.get(key)
    if found is None:
        if any(type(action) is Learn for action in flow.actions):
            # os-ken pads learn specs relative to their place in the whole message: let
            # it lay these few pipeline flows out itself
            return _encoded.__wrapped__(parser, flow).tail
        check_flow(flow)
        found = (_instruction_bytes(parser, flow.actions, flow.goto, flow.meter),
                 flowcheck.actions_read_match(flow.actions))
        if len(_INSTRUCTIONS) >= _SMALL_CACHE_SIZE:
            _INSTRUCTIONS.clear()
        _INSTRUCTIONS[key] = found
    else:  # these actions passed the check already: only what depends on this flow
        try:
            values = flowcheck.check_flow_match(flow)
            if found[1]:
                flowcheck.check_flow_actions(flow, values)
        except openflow.FlowError as exc:
            raise openflow.FlowError(f"{flow!r}: {exc}") from None
    return _match_bytes(parser.ofproto, flow.match) + found[0]


def _instruction_bytes(parser: ModuleType, actions: tuple[Action, ...], goto: int | None,
                       meter: int | None) -> bytes:
    """Meter, apply-actions and goto instructions (in the order OVS decodes them)."""
    ofproto = parser.ofproto
    parts = []
    if meter is not None:
        parts.append(struct.pack("!HHI", ofproto.OFPIT_METER, 8, meter))
    if actions:
        acts = b"".join(_action_bytes(parser, a) for a in actions)
        parts.append(struct.pack("!HH4x", ofproto.OFPIT_APPLY_ACTIONS, 8 + len(acts)))
        parts.append(acts)
    if goto is not None:
        parts.append(struct.pack("!HHB3x", ofproto.OFPIT_GOTO_TABLE, 8, goto))
    return b"".join(parts)


_SMALL_CACHE_SIZE = 1 << 16
# (parser, actions, goto, meter) -> (instruction bytes, whether checking those actions
# depends on the match): few distinct combinations even in a large policy
_INSTRUCTIONS: dict[tuple[Any, ...], tuple[bytes, bool]] = {}


def _match_bytes(ofproto: ModuleType, match: tuple[tuple[str, Any], ...]) -> bytes:
    """An OXM ofp_match: TLVs sorted by OXM type (os-ken's order), header, padding."""
    heads = _OXM_HEADS.get(ofproto)
    if heads is None:
        heads = _OXM_HEADS[ofproto] = ({}, {})
    plain, masked = heads
    tlvs = []
    for name, value in match:
        if type(value) is tuple:
            head = masked.get(name)
            if head is None:
                head = masked[name] = _learn_oxm_head(ofproto, name, value)
            if head:
                order, header, width = head
                tlvs.append((order, header + _pack(value[0], width) + _pack(value[1], width)))
                continue
        else:
            head = plain.get(name)
            if head is None:
                head = plain[name] = _learn_oxm_head(ofproto, name, value)
            if head:
                order, header, width = head
                if type(value) is int:
                    tlvs.append((order, header + value.to_bytes(width, "big")))
                else:
                    tlvs.append((order, header + _pack(value, width)))
                continue
        tlvs.append(_oskn_tlv(ofproto, name, value))  # an experimenter field: os-ken packs it
    if len(tlvs) > 1:
        tlvs.sort()
    body = b"".join([t for _, t in tlvs])
    length = 4 + len(body)
    return _MATCH_HEAD.pack(ofproto.OFPMT_OXM, length) + body + _PADDING[-length % 8]


_MATCH_HEAD = struct.Struct("!HH")
_PADDING = [bytes(n) for n in range(8)]

# ofproto -> ({field: head}, {masked field: head}), a head being (os-ken's sort key,
# 4-byte OXM header, value width), or () for an experimenter field: learnt from os-ken
# on first use, so the layout is os-ken's and only the packing is ours.
OxmHead = tuple[int, bytes, int] | tuple[()]
_OXM_HEADS: dict[ModuleType, tuple[dict[str, OxmHead], dict[str, OxmHead]]] = {}


def _oskn_tlv(ofproto: ModuleType, name: str, value: Any) -> tuple[int, bytes]:
    num, v, m = ofproto.oxm_from_user(_OSKN_NAMES.get(name, name), value)
    buf = bytearray()
    ofproto.oxm_serialize(num, v, m, buf, 0)
    return (num[0] if isinstance(num, tuple) else num), bytes(buf)


def _learn_oxm_head(ofproto: ModuleType, name: str, value: Any) -> OxmHead:
    order, tlv = _oskn_tlv(ofproto, name, value)
    if tlv[:2] == b"\xff\xff":
        return ()
    width = tlv[3] // 2 if isinstance(value, tuple) else tlv[3]
    return order, tlv[:4], width


def _pack(value: int | str, width: int) -> bytes:
    if isinstance(value, int):
        return value.to_bytes(width, "big")
    if width == 16:
        return socket.inet_pton(socket.AF_INET6, value)
    if ":" in value:
        return bytes.fromhex(value.replace(":", ""))
    return socket.inet_aton(value) if width == 4 else value.encode()


@functools.lru_cache(maxsize=1 << 16)
def _action_bytes(parser: ModuleType, action: Any) -> bytes:
    if type(action) is SetField:
        fast = _set_field_bytes(parser.ofproto, action.field, action.value)
        if fast is not None:
            return fast
    buf = bytearray()
    encode_action(parser, parser.ofproto, action).serialize(buf, 0)
    return bytes(buf)


def _set_field_bytes(ofproto: ModuleType, field: str, value: Any) -> bytes | None:
    """OFPAT_SET_FIELD of a plain OXM field (each remote host's ARP responder sets its own
    MAC and IPv4: new actions on the packet-in path). Its OXM TLV, zero-padded to 8 bytes,
    is laid out as in a one-field match, under the action's header instead of the match's.
    None: let os-ken do it (masked, experimenter)."""
    if isinstance(value, tuple):
        return None
    match = _match_bytes(ofproto, ((field, value),))
    if not _OXM_HEADS[ofproto][0][field]:  # an experimenter field
        return None
    return _MATCH_HEAD.pack(ofproto.OFPAT_SET_FIELD, len(match)) + match[_MATCH_HEAD.size:]


@functools.cache
def _fast_flow_mod_class(parser: ModuleType) -> type:
    """An OFPFlowMod subclass serializing from an `Encoded` tail when it still applies."""
    base = parser.OFPFlowMod
    ofproto = parser.ofproto
    head_fmt = ofproto.OFP_FLOW_MOD_PACK_STR0
    header_size = ofproto.OFP_HEADER_SIZE

    def _serialize_body(self: Any) -> None:
        enc: Encoded | None = self._encoded
        if enc is None or self.match is not enc.match or self.instructions is not enc.instructions:
            base._serialize_body(self)  # someone replaced match/instructions: slow path
            return
        msg_pack_into(head_fmt, self.buf, header_size,
                      self.cookie, self.cookie_mask, self.table_id, self.command,
                      self.idle_timeout, self.hard_timeout, self.priority, self.buffer_id,
                      self.out_port, self.out_group, self.flags, self.importance)
        self.buf += enc.tail

    cls = type("OFPFlowMod", (base,), {
        "_serialize_body": _serialize_body,
        "_encoded": None,
        "__module__": __name__,
        "__doc__": "OFPFlowMod whose match and instructions come pre-serialized.",
    })
    return cls


def flow_mod_add(dp: DatapathLike, flow: Flow) -> Any:
    """OFPFC_ADD for ``flow``: a fresh message (xid unset) over cached match/instructions."""
    ofproto = dp.ofproto
    enc = _encoded(dp.ofproto_parser, flow)
    msg = _fast_flow_mod_class(dp.ofproto_parser)(
        dp,
        cookie=enc.cookie,
        cookie_mask=0,
        table_id=flow.table,
        command=ofproto.OFPFC_ADD,
        idle_timeout=flow.idle_timeout,
        hard_timeout=flow.hard_timeout,
        priority=flow.priority,
        buffer_id=ofproto.OFP_NO_BUFFER,
        out_port=ofproto.OFPP_ANY,
        out_group=ofproto.OFPG_ANY,
        flags=0,
        match=enc.match,
        instructions=enc.instructions,
    )
    msg.instructions = enc.instructions  # OFPFlowMod turns an empty tuple into a new []
    msg._encoded = enc
    return msg


# ---------------------------------------------------------------- deletes


def _delete(dp: DatapathLike, command: int, *, table: int, cookie: int, cookie_mask: int,
            out_port: int | None = None, priority: int = 0, match: Any = None) -> Any:
    ofproto, parser = dp.ofproto, dp.ofproto_parser
    return parser.OFPFlowMod(
        dp,
        cookie=cookie,
        cookie_mask=cookie_mask,
        table_id=table,
        command=command,
        priority=priority,
        buffer_id=ofproto.OFP_NO_BUFFER,
        out_port=ofproto.OFPP_ANY if out_port is None else out_port,
        out_group=ofproto.OFPG_ANY,
        match=match if match is not None else parser.OFPMatch(),
    )


def flow_mod_delete_cookie(dp: DatapathLike, cookie: int, cookie_mask: int = ALL_ONES64,
                           table: int | None = None) -> Any:
    """OFPFC_DELETE of every flow whose cookie matches ``cookie``/``cookie_mask`` (all tables
    unless ``table`` is given)."""
    return _delete(dp, dp.ofproto.OFPFC_DELETE,
                   table=dp.ofproto.OFPTT_ALL if table is None else table,
                   cookie=cookie, cookie_mask=cookie_mask)


def flow_mod_delete_out_port(dp: DatapathLike, table: int, out_port: int, cookie: int = 0,
                             cookie_mask: int = 0) -> Any:
    """OFPFC_DELETE of flows in ``table`` that output to ``out_port`` (an output action,
    not a register load), restricted to ``cookie``/``cookie_mask``."""
    return _delete(dp, dp.ofproto.OFPFC_DELETE, table=table, cookie=cookie,
                   cookie_mask=cookie_mask, out_port=out_port)


def flow_mod_delete_strict(dp: DatapathLike, stats: Any) -> Any:
    """OFPFC_DELETE_STRICT of exactly the flow an OFPFlowStats entry describes
    (same table, priority, match, and cookie)."""
    return _delete(dp, dp.ofproto.OFPFC_DELETE_STRICT, table=stats.table_id,
                   cookie=stats.cookie, cookie_mask=ALL_ONES64, priority=stats.priority,
                   match=stats.match)


def _iter_actions(instructions: Iterable[Any]) -> Iterable[Any]:
    for inst in instructions:
        yield from getattr(inst, "actions", None) or ()


def loaded_value(stats: Any, reg: str) -> int | None:
    """The value the flow's actions load into register ``reg`` ("reg1"), bits placed where
    they land in the register; None if it loads nothing there.

    Understands all three encodings OVS may report a load with: NXAST_REG_LOAD
    ("load:3->NXM_NX_REG1[0..15]"), NXAST_REG_LOAD2 and OFPAT_SET_FIELD (masked or not).
    The last load wins, as on the switch.
    """
    names = {reg, NXM_FIELDS.get(reg, reg)}
    found: int | None = None
    for act in _iter_actions(getattr(stats, "instructions", ())):
        kind = type(act).__name__
        if kind == "NXActionRegLoad" and act.dst in names:
            ofs, n_bits = act.ofs_nbits >> 6, (act.ofs_nbits & 0x3F) + 1
            found = (act.value & ((1 << n_bits) - 1)) << ofs
        elif kind == "NXActionRegLoad2" and act.dst in names:
            found = act.value if act.mask is None else act.value & act.mask
        elif kind == "OFPActionSetField" and act.key in names:
            value = act.value
            found = value[0] & value[1] if isinstance(value, tuple | list) else value
    return found


# ---------------------------------------------------------------- meters


def meter_mod(dp: DatapathLike, meter_id: int, rate_pps: int, burst: int,
              command: str = "add") -> Any:
    """OFPMeterMod adding (or modifying) meter ``meter_id``: drop what exceeds
    ``rate_pps`` packets per second, allowing bursts of ``burst`` packets
    (flags PKTPS|BURST; ovs-ofctl: ``meter=N pktps burst bands=type=drop rate=R
    burst_size=B``)."""
    ofproto, parser = dp.ofproto, dp.ofproto_parser
    if command not in _METER_COMMANDS:
        raise ValueError(f"meter command {command!r}: expected one of {sorted(_METER_COMMANDS)}")
    if not 1 <= meter_id <= ofproto.OFPM_MAX:
        raise ValueError(f"meter id {meter_id} out of range 1..{ofproto.OFPM_MAX:#x}")
    if not 1 <= rate_pps <= 0xFFFFFFFF or not 0 <= burst <= 0xFFFFFFFF:
        raise ValueError(f"meter {meter_id}: rate {rate_pps} / burst {burst} out of range")
    return parser.OFPMeterMod(
        dp,
        command=getattr(ofproto, _METER_COMMANDS[command]),
        flags=ofproto.OFPMF_PKTPS | ofproto.OFPMF_BURST,
        meter_id=meter_id,
        bands=[parser.OFPMeterBandDrop(rate=rate_pps, burst_size=burst)],
    )


# ---------------------------------------------------------------- bundles


def bundle_flags(ofproto: ModuleType) -> int:
    flags = 0
    for name in BUNDLE_FLAGS_NAMES:
        flags |= getattr(ofproto, name)
    return flags


def bundle_messages(dp: DatapathLike, msgs: Sequence[Any], bundle_id: int) -> list[Any]:
    """OPEN_REQUEST, one OFPBundleAddMsg per message, COMMIT_REQUEST (flags ATOMIC|ORDERED
    on all of them: OVS rejects an add or commit whose flags differ from the open).

    The inner messages must not have been sent or serialized with an xid yet: os-ken
    gives each the xid of its OFPBundleAddMsg (``set_xid`` asserts it was unset).
    """
    ofproto, parser = dp.ofproto, dp.ofproto_parser
    flags = bundle_flags(ofproto)
    out: list[Any] = [parser.OFPBundleCtrlMsg(dp, bundle_id, ofproto.OFPBCT_OPEN_REQUEST,
                                              flags, [])]
    out += [parser.OFPBundleAddMsg(dp, bundle_id, flags, m, []) for m in msgs]
    out.append(parser.OFPBundleCtrlMsg(dp, bundle_id, ofproto.OFPBCT_COMMIT_REQUEST, flags, []))
    return out


def serialize(msg: Any, xid: int) -> bytes:
    """Set ``xid`` and serialize: the bytes os-ken's Datapath.send_msg would write."""
    msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


__all__ = [
    "CACHE_SIZE",
    "NXM_FIELDS",
    "DatapathLike",
    "Encoded",
    "Subfield",
    "bundle_messages",
    "cache_clear",
    "cache_info",
    "check_flow",
    "encode_action",
    "encoded",
    "field_bits",
    "flow_mod_add",
    "flow_mod_delete_cookie",
    "flow_mod_delete_out_port",
    "flow_mod_delete_strict",
    "loaded_value",
    "masked_set_field",
    "meter_mod",
    "parse_subfield",
    "serialize",
]


def packet_out_through_pipeline(dp: DatapathLike, in_port: int, data: bytes) -> Any:
    """A packet-out that enters the flow tables as if received on ``in_port``."""
    ofp, parser = dp.ofproto, dp.ofproto_parser
    return parser.OFPPacketOut(dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=in_port,
                               actions=[parser.OFPActionOutput(ofp.OFPP_TABLE)], data=data)


NXAC2PT_METER_ID = 5  # OVS: a meter for this controller action only


def register_controller2_meter(parser: ModuleType) -> None:
    """Teach os-ken the NXAST_CONTROLLER2 meter_id property, both ways.

    os-ken 4.x knows max_len, controller_id, reason, userdata and pause only;
    an unknown property even breaks its parser, so flow stats of any flow with
    controller(meter_id=N) could not be read back without this.
    """
    nonlocals = inspect.getclosurevars(parser.NXActionController2.parser.__func__).nonlocals
    prop = nonlocals["NXActionController2Prop"]
    if NXAC2PT_METER_ID in prop._TYPES:
        return

    @prop.register_type(NXAC2PT_METER_ID)
    class NXActionController2PropMeterId(prop):  # type: ignore[misc, valid-type]
        _arg_name = "meter_id"

        @classmethod
        def parser_prop(cls, buf: bytes, length: int) -> tuple[int, int]:
            (meter_id,) = struct.unpack_from("!I", buf, 0)
            return meter_id, 4

        @classmethod
        def serialize_prop(cls, meter_id: int) -> bytearray:
            return bytearray(struct.pack("!HHI", NXAC2PT_METER_ID, 8, meter_id))


def _controller_with_meter(parser: ModuleType, max_len: int, meter: int) -> Any:
    """NXAST_CONTROLLER2 with max_len and meter_id properties."""
    register_controller2_meter(parser)
    return parser.NXActionController2(max_len=max_len, meter_id=meter)


def set_field_value(stats: Any, field: str) -> Any | None:
    """The value a flow's actions set into ``field`` (set_field), or None."""
    for action in _iter_actions(getattr(stats, "instructions", [])):
        if getattr(action, "key", None) == field:
            return action.value
    return None


# Flow stats of our own flows carry controller(meter_id=N): os-ken must parse them from
# the first reply on, before this process has encoded anything.
register_controller2_meter(ofproto_v1_4_parser)


# ---------------------------------------------------------------- raw bundles
# Building and serializing one os-ken message per flow costs ~27 us even with cached
# match/instructions; a big policy install is bundle-add messages around flow-mods
# and nothing else, so those are packed here straight into one buffer.

_HEADER = struct.Struct("!BBHI")
_BUNDLE_ADD_HEAD = struct.Struct("!BBHI" + ofproto_v1_4.OFP_BUNDLE_ADD_MSG_0_PACK_STR[1:])
_FLOW_MOD_FIXED = struct.Struct(ofproto_v1_4.OFP_FLOW_MOD_PACK_STR0)
_EMPTY_MATCH = b"\x00\x01\x00\x04\x00\x00\x00\x00"  # OXM match with no fields, padded


def raw_bundle_adds(dp: DatapathLike, bundle_id: int, plan_items: Sequence[Flow | int],
                    first_xid: int) -> bytes:
    """OFPT_BUNDLE_ADD_MESSAGEs, byte for byte what os-ken would send for
    ``bundle_messages(dp, [flow_mod_add(f) | flow_mod_delete_cookie(c) ...], bundle_id)``
    minus the open and commit: a Flow is added, an int cookie deleted (all tables).
    Message k carries xid ``first_xid + k``."""
    return b"".join(raw_bundle_chunks(dp, bundle_id, plan_items, first_xid))


# bundle-add header + bundle id and flags, the inner flow-mod's header and its 40 fixed
# bytes, packed in one go: everything of a bundled flow-mod before its match
_BUNDLED_FLOW_MOD = struct.Struct(
    "!BBHI" + ofproto_v1_4.OFP_BUNDLE_ADD_MSG_0_PACK_STR[1:] + "BBHI"
    + ofproto_v1_4.OFP_FLOW_MOD_PACK_STR0[1:])
CHUNK_MESSAGES = 4096


def raw_bundle_chunks(dp: DatapathLike, bundle_id: int, plan_items: Sequence[Flow | int],
                      first_xid: int, chunk: int | None = None) -> Iterator[bytes]:
    """`raw_bundle_adds` in pieces of ``chunk`` (default CHUNK_MESSAGES) messages, so the
    first can be on its way to the switch (which checks each bundled message as it
    arrives, on its own core) while the rest are being packed. Each flow's cookie is
    worked out here if nobody asked for it before (`reconcile.plan` on an empty switch
    does not)."""
    chunk = chunk or CHUNK_MESSAGES
    ofp = dp.ofproto
    version, flags, max_xid = ofp.OFP_VERSION, bundle_flags(ofp), ofp.MAX_XID
    parser = dp.ofproto_parser
    pack = _BUNDLED_FLOW_MOD.pack
    fixed = _BUNDLED_FLOW_MOD.size
    inner_fixed = fixed - _BUNDLE_ADD_HEAD.size
    t_bundle_add, t_flow_mod = ofproto_v1_4.OFPT_BUNDLE_ADD_MESSAGE, ofproto_v1_4.OFPT_FLOW_MOD
    add, delete = ofp.OFPFC_ADD, ofp.OFPFC_DELETE
    no_buffer, any_port, any_group, all_tables = (ofp.OFP_NO_BUFFER, ofp.OFPP_ANY,
                                                  ofp.OFPG_ANY, ofp.OFPTT_ALL)
    tails = _TAILS.get(parser)
    if tails is None:
        tails = _TAILS[parser] = {}
    cached = tails.get
    out: list[bytes] = []
    for k, item in enumerate(plan_items):
        xid = (first_xid + k) & max_xid
        if isinstance(item, Flow):
            tail = cached(item)
            if tail is None:
                tail = _new_wire_tail(parser, item, tails)
            n = len(tail)
            out.append(pack(version, t_bundle_add, fixed + n, xid, bundle_id, flags,
                            version, t_flow_mod, inner_fixed + n, xid,
                            item.cookie, 0, item.table, add, item.idle_timeout,
                            item.hard_timeout, item.priority, no_buffer, any_port, any_group,
                            0, 0))
            out.append(tail)
        else:
            n = len(_EMPTY_MATCH)
            out.append(pack(version, t_bundle_add, fixed + n, xid, bundle_id, flags,
                            version, t_flow_mod, inner_fixed + n, xid,
                            item, ALL_ONES64, all_tables, delete, 0, 0, 0, no_buffer,
                            any_port, any_group, 0, 0))
            out.append(_EMPTY_MATCH)
        if len(out) >= 2 * chunk:
            yield b"".join(out)
            out = []
    if out:
        yield b"".join(out)


def raw_flow_mod_add(dp: DatapathLike, flow: Flow, xid: int) -> bytes:
    """One OFPT_FLOW_MOD ADD, byte for byte what os-ken sends for
    ``flow_mod_add(dp, flow)`` with that xid (the learning fast path sends it alone)."""
    ofp = dp.ofproto
    body = _FLOW_MOD_FIXED.pack(
        flow.cookie, 0, flow.table, ofp.OFPFC_ADD, flow.idle_timeout, flow.hard_timeout,
        flow.priority, ofp.OFP_NO_BUFFER, ofp.OFPP_ANY, ofp.OFPG_ANY, 0, 0,
    ) + _wire_tail(dp.ofproto_parser, flow)
    return _HEADER.pack(ofp.OFP_VERSION, ofp.OFPT_FLOW_MOD, _HEADER.size + len(body),
                        xid & ofp.MAX_XID) + body
