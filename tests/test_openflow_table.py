"""topology.openflow: the one table of OpenFlow fields, proven field by field.

For EVERY field of the table, flows matching it (masked too, where maskable), setting it
(where writable) and moving its bits into a register (NXM subfield) are

- packed by the raw packer production uses (`encode.raw_flow_mod_add`) into exactly the
  bytes of a plain os-ken OFPFlowMod built from the same flow;
- decoded by Open vSwitch (``ovs-ofctl ofp-parse``) exactly as OVS parses their text
  rendering (``ovs-ofctl parse-flows`` of `topology.render.flows_text`), with no field
  dropped for a missing prerequisite;
- accepted by the one whole-flow check, and the same flows with a prerequisite missing
  or wrong are refused by it exactly when OVS refuses them (OFPBMC_BAD_PREREQ).

Then: every field the consumers name is in the table; the simulator matches packets on
every field a `Packet` carries.
"""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest
from os_ken.ofproto import nicira_ext, ofproto_v1_4, ofproto_v1_4_parser
from test_encode import OFCTL, needs_ofctl

from controller import encode
from topology import flowcheck, openflow
from topology.model import Flow, MatchValue, MoveField, Output, SetField, ct_state
from topology.openflow import FIELDS, Field, FlowError
from topology.pipeline import PIPELINES, Pipeline, PipelineError, Table, check_declaration
from topology.render import flows_text, sort_key
from topology.simulate import PACKET_FIELDS, Packet, Switch, compile_flow

OFP = ofproto_v1_4
PARSER = ofproto_v1_4_parser
DP = types.SimpleNamespace(ofproto=OFP, ofproto_parser=PARSER)
ROOT = Path(__file__).resolve().parent.parent
OUT_PORT = 2

# ---------------------------------------------------------------- samples per field

_EXACT: dict[str, MatchValue] = {"mac": "02:00:00:00:00:05", "ipv4": "10.1.2.3",
                                 "ipv6": "fd00::5"}
_MASKED: dict[str, tuple[str, str]] = {
    "mac": ("02:00:00:00:00:00", "ff:ff:ff:ff:ff:00"),
    "ipv4": ("10.1.0.0", "255.255.0.0"),
    "ipv6": ("fd00::", "ffff:ffff::"),
}
_SPECIAL: dict[str, MatchValue] = {"eth_type": 0x86DD, "ct_state": ct_state("+trk+est"),
                                   "ipv6_label": 0x12345, "in_port": 5}


def exact_value(spec: Field) -> MatchValue:
    if spec.name in _SPECIAL:
        return _SPECIAL[spec.name]
    return _EXACT.get(spec.kind, 5)


def masked_value(spec: Field) -> MatchValue:
    if spec.name == "ct_state":
        return ct_state("+trk-inv")
    if spec.kind == "int":
        mask = spec.full & ~0xF
        return (0x12345 & mask, mask)
    return _MASKED[spec.kind]


def prereq_match(spec: Field) -> dict[str, MatchValue]:
    """The match the field's prerequisites need (lowest allowed value each)."""
    return {name: min(allowed) for name, allowed in spec.prereqs}


def match_of(spec: Field, value: MatchValue, **extra: MatchValue) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({**prereq_match(spec), spec.name: value, **extra}.items()))


def field_flows(spec: Field) -> list[Flow]:
    """Flows matching ``spec`` (exact, masked), setting it, moving its bits to reg0."""
    flows = [Flow(table=1, priority=10, match=match_of(spec, exact_value(spec)),
                  actions=(Output(OUT_PORT),))]
    if spec.maskable:
        flows.append(Flow(table=1, priority=11, match=match_of(spec, masked_value(spec)),
                          actions=(Output(OUT_PORT),)))
    base = tuple(sorted(prereq_match(spec).items()))
    if spec.writable:
        value = exact_value(spec)
        flows.append(Flow(table=2, priority=12, match=base, actions=(SetField(spec.name, value),)))
    bits = min(spec.width, 32)
    flows.append(Flow(table=3, priority=13, match=base, actions=(
        MoveField(f"{spec.nxm}[0..{bits - 1}]", f"NXM_NX_REG0[0..{bits - 1}]"),)))
    return flows


def all_field_flows() -> list[Flow]:
    return [f for spec in FIELDS.values() for f in field_flows(spec)]


# ---------------------------------------------------------------- os-ken, the plain way


def _plain_action(action: Any) -> Any:
    """The action as os-ken's own classes spell it, names looked up in os-ken's terms."""
    if isinstance(action, Output):
        return PARSER.OFPActionOutput(action.port, 0)
    if isinstance(action, SetField):
        return PARSER.OFPActionSetField(**{FIELDS[action.field].oskn_name: action.value})
    assert isinstance(action, MoveField)
    src, dst = (openflow.parse_subfield(t) for t in (action.src, action.dst))
    return PARSER.NXActionRegMove(src_field=src.spec.nxm_field, dst_field=dst.spec.nxm_field,
                                  n_bits=src.nbits, src_ofs=src.start, dst_ofs=dst.start)


def plain_flow_mod(f: Flow) -> Any:
    match = PARSER.OFPMatch(**{FIELDS[name].oskn_name: value for name, value in f.match})
    insts = [PARSER.OFPInstructionActions(OFP.OFPIT_APPLY_ACTIONS,
                                          [_plain_action(a) for a in f.actions])]
    return PARSER.OFPFlowMod(
        DP, cookie=f.cookie, cookie_mask=0, table_id=f.table, command=OFP.OFPFC_ADD,
        idle_timeout=0, hard_timeout=0, priority=f.priority, buffer_id=OFP.OFP_NO_BUFFER,
        out_port=OFP.OFPP_ANY, out_group=OFP.OFPG_ANY, flags=0, match=match, instructions=insts)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_raw_packer_matches_os_ken_for_every_field(name: str) -> None:
    encode.cache_clear()
    for f in field_flows(FIELDS[name]):
        flowcheck.check_flow(f)
        assert encode.raw_flow_mod_add(DP, f, 42) == encode.serialize(plain_flow_mod(f), 42), f
        assert encode.serialize(encode.flow_mod_add(DP, f), 43) == encode.serialize(
            plain_flow_mod(f), 43), f


# ---------------------------------------------------------------- Open vSwitch decodes

_PREFIX = re.compile(r"^OFPT_[A-Z_]+ \(OF1\.4\) \(xid=0x[0-9a-f]+\):\s*")


def _ofctl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OFCTL is not None
    return subprocess.run([OFCTL, "-O", "OpenFlow14", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _records(stdout: str) -> list[str]:
    out: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("OFPT_"):
            out.append(_PREFIX.sub("", line, count=1))
        elif line.startswith(" ") and out:
            out[-1] += "\n" + line
    return out


def decode_binary(tmp_path: Path, messages: list[bytes]) -> list[str]:
    path = tmp_path / "msgs.bin"
    path.write_bytes(b"".join(messages))
    proc = _ofctl("ofp-parse", str(path))
    assert proc.returncode == 0, proc.stderr
    return _records(proc.stdout)


@needs_ofctl
def test_ovs_decodes_our_bytes_like_our_text_for_every_field(tmp_path: Path) -> None:
    flows = sorted(all_field_flows(), key=sort_key)
    binary = decode_binary(tmp_path, [encode.raw_flow_mod_add(DP, f, k)
                                      for k, f in enumerate(flows, 1)])
    text_file = tmp_path / "flows.txt"
    text_file.write_text(flows_text(flows))
    proc = _ofctl("parse-flows", str(text_file))
    assert proc.returncode == 0, proc.stderr
    # OVS drops (with a log line) a field whose prerequisites the text does not meet
    assert "normalization changed" not in proc.stderr, proc.stderr
    assert "WARN" not in proc.stderr and "ERR" not in proc.stderr, proc.stderr
    text = _records(proc.stdout)
    assert len(binary) == len(text) == len(flows)
    for f, got, want in zip(flows, binary, text, strict=True):
        assert "decode error" not in got, f"{f!r}: {got}"
        assert got == want, f"{f!r}\n  sent:    {got}\n  printed: {want}"


# ---------------------------------------------------------------- prerequisites agree


# values of the fields prerequisites name (None: not matched), right for some fields and
# wrong for others: every combination is tried, whatever the table says
_PREREQ_VALUES: dict[str, tuple[int | None, ...]] = {
    "eth_type": (None, 0x0800, 0x86DD, 0x0806, 0x8035, 0x88B5),
    "ip_proto": (None, 1, 6, 17, 58, 99), "icmpv6_type": (None, 128, 135, 136),
    "icmpv6_code": (None, 0, 1)}


def _prereq_grid(spec: Field) -> list[Flow]:
    """The field matched with every combination of `_PREREQ_VALUES` around it."""
    names = [n for n in _PREREQ_VALUES if n != spec.name]
    flows = []
    for combo in itertools.product(*(_PREREQ_VALUES[n] for n in names)):
        match = {n: v for n, v in zip(names, combo, strict=True) if v is not None}
        match[spec.name] = exact_value(spec)
        flows.append(Flow(table=1, priority=1, match=tuple(sorted(match.items()))))
    return flows


def _refused(f: Flow) -> bool:
    try:
        flowcheck.check_flow(f)
    except FlowError:
        return True
    return False


@needs_ofctl
def test_prerequisites_are_what_ovs_enforces(tmp_path: Path) -> None:
    """OVS's decoder refuses a flow with OFPBMC_BAD_PREREQ exactly when the check refuses
    it: every field with prerequisites, matched with every combination of values of the
    fields prerequisites name (os-ken packs these flows; our encoder would refuse the bad
    ones, and so does the simulator)."""
    flows = [f for spec in FIELDS.values() if spec.prereqs for f in _prereq_grid(spec)]
    decoded = decode_binary(tmp_path, [encode.serialize(plain_flow_mod(f), k)
                                       for k, f in enumerate(flows, 1)])
    assert len(decoded) == len(flows)
    refused = 0
    for f, got in zip(flows, decoded, strict=True):
        by_ovs = "OFPBMC_BAD_PREREQ" in got
        assert by_ovs or "decode error" not in got, got
        assert _refused(f) == by_ovs, f"{f.match}: check_flow disagrees with OVS ({got})"
        refused += by_ovs
    assert 0 < refused < len(flows)
    for f in flows[::37]:  # the simulator and the encoder run the same check
        with pytest.raises(FlowError) if _refused(f) else _no_error():
            compile_flow(f)
        with pytest.raises(ValueError) if _refused(f) else _no_error():
            encode.raw_flow_mod_add(DP, f, 1)


class _no_error:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_actions_need_the_prerequisites_of_the_fields_they_use() -> None:
    for spec in FIELDS.values():
        if not spec.prereqs:
            continue
        bits = min(spec.width, 32)
        move = MoveField(f"{spec.nxm}[0..{bits - 1}]", f"NXM_NX_REG0[0..{bits - 1}]")
        acts: list[Any] = [move] + ([SetField(spec.name, exact_value(spec))]
                                    if spec.writable else [])
        for action in acts:
            ok = Flow(table=1, priority=1, match=tuple(sorted(prereq_match(spec).items())),
                      actions=(action,))
            flowcheck.check_flow(ok)
            with pytest.raises(FlowError, match="needs a match on"):
                flowcheck.check_flow(Flow(table=1, priority=1, match=(), actions=(action,)))


def test_read_only_and_unmaskable_fields_are_refused() -> None:
    for spec in FIELDS.values():
        base = tuple(sorted(prereq_match(spec).items()))
        if not spec.writable:
            with pytest.raises(FlowError, match="read-only"):
                flowcheck.check_flow(Flow(table=1, priority=1, match=base,
                                         actions=(SetField(spec.name, 1),)))
        if not spec.maskable:
            masked = match_of(spec, (1, 1))
            with pytest.raises(FlowError, match="cannot be masked"):
                flowcheck.check_flow(Flow(table=1, priority=1, match=masked))
            with pytest.raises(FlowError, match="cannot be masked"):
                compile_flow(Flow(table=1, priority=1, match=masked))


# ---------------------------------------------------------------- the table vs os-ken, OVS


def test_table_names_exist_in_os_ken_with_the_ovs_widths() -> None:
    oskn = {f.name: f for f in OFP.oxm_types}
    for spec in FIELDS.values():
        assert spec.oskn_name in oskn, spec
        assert spec.nxm_field in oskn, spec
        wire = encode.field_bits(OFP, spec.nxm_field)
        # NXM_NX_IPV6_LABEL is 32 bits on the wire, 20 of them the label (ovs-fields(7))
        assert wire == spec.width or (spec.name, wire) == ("ipv6_label", 32), spec
        # the headers os-ken writes for nxm_field / oskn_name are the ones OVS names
        # spec.nxm / spec.oxm (where os-ken has the constant; the ovs-ofctl decodings
        # above prove the rest)
        for name, oskn_name in ((spec.nxm, spec.nxm_field), (spec.oxm, spec.oskn_name)):
            header = getattr(nicira_ext, name, None) or getattr(OFP, name, None)
            if name and header is not None:
                num = OFP.oxm_from_user(oskn_name, 0)[0]
                assert (header >> 16, (header >> 9) & 0x7F) == (num >> 7, num & 0x7F), name


def test_nxm_fields_of_the_encoder_are_the_table() -> None:
    assert encode.NXM_FIELDS == {f.nxm: f.nxm_field for f in FIELDS.values()}
    for name, spec in FIELDS.items():
        sub = encode.parse_subfield(f"{spec.nxm}[]", OFP)
        assert (sub.field, sub.ofs, sub.n_bits) == (spec.nxm_field, 0, spec.width), name
        assert openflow.parse_subfield(f"{name}[]") == openflow.parse_subfield(f"{spec.nxm}[]")


# ---------------------------------------------------------------- no field outside the table

CONSUMERS = ["controller/encode.py", "controller/runtime.py", "controller/metrics.py",
             "controller/status.py", "topology/render.py", "topology/simulate.py",
             "topology/pipeline.py", "topology/flows.py", "topology/policy_compile.py",
             "topology/check.py", "topology/model.py", "topology/flowcheck.py"]
_NXM_NAME = re.compile(r"^(?:NXM_OF|NXM_NX|OXM_OF)_[A-Z0-9_]+?(?=\[|$)")
# what a field looks like: any os-ken field name, and the classic ovs-ofctl spellings
_FIELD_LIKE = {f.name for f in OFP.oxm_types} | {
    "dl_src", "dl_dst", "dl_type", "nw_src", "nw_dst", "nw_proto", "tp_src", "tp_dst",
    "icmp_type", "icmp_code", "nd_target", "nd_sll", "nd_tll", "ipv6_label", "tun_id",
    "vlan_tci", "nw_tos", "nw_ttl", "pkt_mark"}
_KNOWN = ({n for f in FIELDS.values() for n in (f.name, f.nxm, f.nxm_field, f.ofctl, f.oxm,
                                                f.oskn_name)} - {""})


def field_names_in(source: str) -> set[str]:
    """String constants of a module that name an OpenFlow field (or an NXM/OXM one)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            m = _NXM_NAME.match(text)
            if m:
                found.add(m.group(0))
            elif text in _FIELD_LIKE:
                found.add(text)
    return found


def unknown_fields(path: Path) -> set[str]:
    return field_names_in(path.read_text()) - _KNOWN


@pytest.mark.parametrize("module", CONSUMERS)
def test_consumers_name_only_fields_of_the_table(module: str) -> None:
    assert unknown_fields(ROOT / module) == set()


def test_a_field_outside_the_table_is_noticed(tmp_path: Path) -> None:
    """The check above can fail: a consumer naming a field the table lacks."""
    src = (ROOT / "controller/encode.py").read_text()
    for extra in ('"NXM_NX_PKT_MARK"', '"vlan_vid"', '"NXM_NX_REG9[0..3]"', '"tp_src"'):
        path = tmp_path / "consumer.py"
        path.write_text(src + f"\nEXTRA = {extra}\n")
        assert unknown_fields(path), extra


def test_simulated_packet_fields_are_table_fields() -> None:
    assert set(PACKET_FIELDS) <= FIELDS.keys()
    assert {f.name for f in FIELDS.values()} - set(PACKET_FIELDS) == {
        *openflow.CT_FIELDS, "conj_id", *openflow.REGISTERS}  # metadata, not headers


def test_pipeline_tables_match_only_table_fields() -> None:
    for pipeline in PIPELINES.values():
        check_declaration(pipeline)
        for table in pipeline.tables:
            assert table.matches <= FIELDS.keys(), table.name
    bad = Pipeline("socket", (Table(0, "t", "", frozenset({"eth_src", "vlan_vid"})),))
    with pytest.raises(PipelineError, match="vlan_vid"):
        check_declaration(bad)


# ---------------------------------------------------------------- the simulator matches


def _packet(spec: Field, value: MatchValue) -> Packet:
    return Packet(**{"in_port": 1, **prereq_match(spec), spec.name: value})


# differs from the exact sample, and from the masked one inside its mask
_OTHER: dict[str, MatchValue] = {"mac": "04:00:00:00:00:06", "ipv4": "10.2.2.4",
                                 "ipv6": "fd01::6", "ipv6_label": 0x22345, "eth_type": 0x0800}


@pytest.mark.parametrize("name", [n for n in sorted(FIELDS) if n in PACKET_FIELDS])
def test_simulator_matches_every_packet_field(name: str) -> None:
    spec = FIELDS[name]
    value = exact_value(spec)
    other = _OTHER.get(name, _OTHER.get(spec.kind, 6))
    sw = Switch([Flow(table=0, priority=10, match=match_of(spec, value),
                      actions=(Output(OUT_PORT),))])
    assert sw.process(_packet(spec, value)).ports == {OUT_PORT}, name
    assert sw.process(_packet(spec, other)).ports == set(), name
    if spec.maskable:
        v, m = masked_value(spec)  # type: ignore[misc]
        masked = Switch([Flow(table=0, priority=10, match=match_of(spec, (v, m)),
                              actions=(Output(OUT_PORT),))])
        inside = v if spec.kind != "int" else v | 1
        assert masked.process(_packet(spec, inside)).ports == {OUT_PORT}, name
        assert masked.process(_packet(spec, other)).ports == set(), name
