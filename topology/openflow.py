"""The OpenFlow vocabulary socknet speaks, declared once. No I/O, no os-ken.

`FIELDS` holds every match field the model may use, one `Field` each: its model name
(the key of `Flow.match` and of `SetField`; os-ken's OXM name), the width and value
kind OVS gives it, whether it can be masked or written, its prerequisites, its NXM and
OXM names, the os-ken names the encoder needs and its ``ovs-ofctl`` spelling. The
encoder (controller/encode.py), the renderer (render.py), the simulator (simulate.py)
and the pipeline declaration (pipeline.py) all read it. Also here, once: EtherTypes
and IP protocol numbers, the limits OVS enforces, the one parser of NXM subfields
("NXM_NX_REG1[0..15]") and the values of each kind. What OVS refuses in a whole flow is
checked in `topology.flowcheck`, from this table.

Adding a field is one `Field` entry below plus, for the simulator, the packet header
that carries it (`topology.simulate.Packet`); tests/test_openflow_table.py then
encodes, renders and decodes a flow matching it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from topology.model import MatchValue

# ---------------------------------------------------------------- protocol numbers

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
ETH_RARP = 0x8035
ETH_IPV6 = 0x86DD
IP_ETH_TYPES = (ETH_IPV4, ETH_IPV6)

IP_PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
IP_PROTO_NAMES = {number: name for name, number in IP_PROTOS.items()}

ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136

# ---------------------------------------------------------------- limits OVS enforces

MAX_TABLE = 254
MAX_PRIORITY = 0xFFFF
MAX_METER = 0xFFFF0000  # OFPM_MAX
MAX_CONJ_CLAUSES = 64
MAX_CONJ_ID = 0xFFFFFFFF
MAX_CT_ZONE = 0xFFFF
CT_LABEL_MASK = 0xFFFFFFFF  # Ct.label: the low 32 bits of the 128-bit ct_label are written
# the reserved ports an Output may name (OVS knows more; these are the ones we model)
RESERVED_PORTS = ("IN_PORT", "ALL", "FLOOD", "CONTROLLER", "LOCAL")


class FlowError(ValueError):
    """A flow OVS would refuse (or, in the simulator, a flow set whose outcome depends
    on install order)."""


# ---------------------------------------------------------------- fields

ValueKind = Literal["int", "mac", "ipv4", "ipv6"]
# each prerequisite: the field's value (0 when it is not matched, as OVS reads it) must
# be one of these
Prereqs = tuple[tuple[str, frozenset[int]], ...]


@dataclass(frozen=True)
class Field:
    """One match field. ``width`` is what OVS gives it: NXM_OF_IN_PORT is 16 bits
    (OXM in_port is 32 on the wire, OVS ports fit 16), ipv6_label 20 (32 on the wire,
    the rest must be zero)."""

    name: str  # model name = os-ken OXM name, except where ``oskn`` says otherwise
    width: int
    nxm: str  # NXM name, as ovs-ofctl prints subfields: "NXM_OF_ETH_SRC"
    nxm_field: str  # os-ken name of the NXM field: subfields keep the NXM width
    ofctl: str  # ovs-ofctl spelling: "dl_src"
    oxm: str = ""  # OXM name ("" for Nicira-only fields such as registers)
    kind: ValueKind = "int"
    maskable: bool = True
    writable: bool = True
    prereqs: Prereqs = ()
    oskn: str = ""  # os-ken name in OFPMatch and OFPActionSetField, when not ``name``

    @property
    def full(self) -> int:
        return (1 << self.width) - 1

    @property
    def oskn_name(self) -> str:
        return self.oskn or self.name


def _is(field: str, *values: int) -> Prereqs:
    return ((field, frozenset(values)),)


ARP = _is("eth_type", ETH_ARP, ETH_RARP)
IPV4 = _is("eth_type", ETH_IPV4)
IPV6 = _is("eth_type", ETH_IPV6)
IP = _is("eth_type", ETH_IPV4, ETH_IPV6)
TCP = (*IP, *_is("ip_proto", IP_PROTOS["tcp"]))
UDP = (*IP, *_is("ip_proto", IP_PROTOS["udp"]))
ICMPV4 = (*IPV4, *_is("ip_proto", IP_PROTOS["icmp"]))
ICMPV6 = (*IPV6, *_is("ip_proto", IP_PROTOS["icmpv6"]))
ND = (*ICMPV6, *_is("icmpv6_type", ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT),
      *_is("icmpv6_code", 0))
ND_SOLICIT = (*ICMPV6, *_is("icmpv6_type", ND_NEIGHBOR_SOLICIT), *_is("icmpv6_code", 0))
ND_ADVERT = (*ICMPV6, *_is("icmpv6_type", ND_NEIGHBOR_ADVERT), *_is("icmpv6_code", 0))

NUM_REGISTERS = 8

_FIELD_LIST = (
    # OVS refuses set_field on OXM in_port (OFPBAC_BAD_SET_ARGUMENT); socknet never writes it
    Field("in_port", 16, "NXM_OF_IN_PORT", "in_port_nxm", "in_port", "OXM_OF_IN_PORT",
          maskable=False, writable=False),
    Field("eth_dst", 48, "NXM_OF_ETH_DST", "eth_dst_nxm", "dl_dst", "OXM_OF_ETH_DST", "mac"),
    Field("eth_src", 48, "NXM_OF_ETH_SRC", "eth_src_nxm", "dl_src", "OXM_OF_ETH_SRC", "mac"),
    Field("eth_type", 16, "NXM_OF_ETH_TYPE", "eth_type_nxm", "dl_type", "OXM_OF_ETH_TYPE",
          maskable=False, writable=False),
    Field("arp_op", 16, "NXM_OF_ARP_OP", "arp_op_nxm", "arp_op", "OXM_OF_ARP_OP",
          maskable=False, prereqs=ARP),
    Field("arp_spa", 32, "NXM_OF_ARP_SPA", "arp_spa_nxm", "arp_spa", "OXM_OF_ARP_SPA", "ipv4",
          prereqs=ARP),
    Field("arp_tpa", 32, "NXM_OF_ARP_TPA", "arp_tpa_nxm", "arp_tpa", "OXM_OF_ARP_TPA", "ipv4",
          prereqs=ARP),
    Field("arp_sha", 48, "NXM_NX_ARP_SHA", "arp_sha_nxm", "arp_sha", "OXM_OF_ARP_SHA", "mac",
          prereqs=ARP),
    Field("arp_tha", 48, "NXM_NX_ARP_THA", "arp_tha_nxm", "arp_tha", "OXM_OF_ARP_THA", "mac",
          prereqs=ARP),
    Field("ipv4_src", 32, "NXM_OF_IP_SRC", "ipv4_src_nxm", "nw_src", "OXM_OF_IPV4_SRC", "ipv4",
          prereqs=IPV4),
    Field("ipv4_dst", 32, "NXM_OF_IP_DST", "ipv4_dst_nxm", "nw_dst", "OXM_OF_IPV4_DST", "ipv4",
          prereqs=IPV4),
    Field("ip_proto", 8, "NXM_OF_IP_PROTO", "ip_proto_nxm", "nw_proto", "OXM_OF_IP_PROTO",
          maskable=False, writable=False, prereqs=IP),
    Field("tcp_src", 16, "NXM_OF_TCP_SRC", "tcp_src_nxm", "tcp_src", "OXM_OF_TCP_SRC",
          prereqs=TCP),
    Field("tcp_dst", 16, "NXM_OF_TCP_DST", "tcp_dst_nxm", "tcp_dst", "OXM_OF_TCP_DST",
          prereqs=TCP),
    Field("udp_src", 16, "NXM_OF_UDP_SRC", "udp_src_nxm", "udp_src", "OXM_OF_UDP_SRC",
          prereqs=UDP),
    Field("udp_dst", 16, "NXM_OF_UDP_DST", "udp_dst_nxm", "udp_dst", "OXM_OF_UDP_DST",
          prereqs=UDP),
    Field("icmpv4_type", 8, "NXM_OF_ICMP_TYPE", "icmpv4_type_nxm", "icmp_type",
          "OXM_OF_ICMPV4_TYPE", maskable=False, prereqs=ICMPV4),
    Field("icmpv4_code", 8, "NXM_OF_ICMP_CODE", "icmpv4_code_nxm", "icmp_code",
          "OXM_OF_ICMPV4_CODE", maskable=False, prereqs=ICMPV4),
    Field("ipv6_src", 128, "NXM_NX_IPV6_SRC", "ipv6_src_nxm", "ipv6_src", "OXM_OF_IPV6_SRC",
          "ipv6", prereqs=IPV6),
    Field("ipv6_dst", 128, "NXM_NX_IPV6_DST", "ipv6_dst_nxm", "ipv6_dst", "OXM_OF_IPV6_DST",
          "ipv6", prereqs=IPV6),
    Field("ipv6_label", 20, "NXM_NX_IPV6_LABEL", "ipv6_label", "ipv6_label",
          "OXM_OF_IPV6_FLABEL", prereqs=IPV6, oskn="ipv6_flabel"),
    Field("icmpv6_type", 8, "NXM_NX_ICMPV6_TYPE", "icmpv6_type_nxm", "icmpv6_type",
          "OXM_OF_ICMPV6_TYPE", maskable=False, prereqs=ICMPV6),
    Field("icmpv6_code", 8, "NXM_NX_ICMPV6_CODE", "icmpv6_code_nxm", "icmpv6_code",
          "OXM_OF_ICMPV6_CODE", maskable=False, prereqs=ICMPV6),
    Field("ipv6_nd_target", 128, "NXM_NX_ND_TARGET", "nd_target", "nd_target",
          "OXM_OF_IPV6_ND_TARGET", "ipv6", prereqs=ND),
    Field("ipv6_nd_sll", 48, "NXM_NX_ND_SLL", "nd_sll", "nd_sll", "OXM_OF_IPV6_ND_SLL", "mac",
          prereqs=ND_SOLICIT),
    Field("ipv6_nd_tll", 48, "NXM_NX_ND_TLL", "nd_tll", "nd_tll", "OXM_OF_IPV6_ND_TLL", "mac",
          prereqs=ND_ADVERT),
    Field("ct_state", 32, "NXM_NX_CT_STATE", "ct_state", "ct_state", writable=False),
    Field("ct_zone", 16, "NXM_NX_CT_ZONE", "ct_zone", "ct_zone", maskable=False,
          writable=False),
    Field("ct_mark", 32, "NXM_NX_CT_MARK", "ct_mark", "ct_mark",
          writable=False),  # only ct(exec(...)) writes it
    Field("ct_label", 128, "NXM_NX_CT_LABEL", "ct_label", "ct_label", writable=False),
    Field("conj_id", 32, "NXM_NX_CONJ_ID", "conj_id", "conj_id", maskable=False,
          writable=False),
    *(Field(f"reg{i}", 32, f"NXM_NX_REG{i}", f"reg{i}", f"reg{i}")
      for i in range(NUM_REGISTERS)),
)
FIELDS: dict[str, Field] = {f.name: f for f in _FIELD_LIST}
BY_NXM: dict[str, Field] = {f.nxm: f for f in _FIELD_LIST}
REGISTERS = tuple(f"reg{i}" for i in range(NUM_REGISTERS))
_REGISTER_FIELDS = {name: FIELDS[name] for name in REGISTERS}
CT_FIELDS = ("ct_state", "ct_zone", "ct_mark", "ct_label")

def field(name: str) -> Field:
    """The field named ``name`` in a match or a set_field (model name: "eth_src")."""
    found = FIELDS.get(name)
    if found is None:
        raise FlowError(f"unknown field {name!r}")
    return found


def register(name: str) -> Field:
    """A register named by SetReg/OutputReg ("reg1")."""
    found = _REGISTER_FIELDS.get(name)
    if found is None:
        raise FlowError(f"{name!r} is not one of reg0..reg{NUM_REGISTERS - 1}")
    return found


# ---------------------------------------------------------------- subfields

_SUBFIELD_RE = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\[(?:(?P<a>\d+)(?:\.\.(?P<b>\d+))?)?\]$")
_IMMEDIATE_RE = re.compile(r"^(?:0[xX][0-9a-fA-F]+|\d+)$")


@dataclass(frozen=True)
class Subfield:
    """Bits ``start .. start+nbits-1`` of a field (by model name)."""

    field: str
    start: int
    nbits: int

    @property
    def mask(self) -> int:
        return ((1 << self.nbits) - 1) << self.start

    @property
    def spec(self) -> Field:
        return FIELDS[self.field]


def parse_subfield(text: str) -> Subfield:
    """ "NXM_NX_REG1[0..15]" / "NXM_NX_REG1[3]" / "NXM_OF_ETH_SRC[]" / "reg1[]" -> Subfield.

    The name is an NXM name or a model name; either way the field's own width applies
    (NXM_OF_IN_PORT[] is 16 bits)."""
    m = _SUBFIELD_RE.match(text.strip())
    if m is None:
        raise FlowError(f"bad subfield {text!r}: expected NAME[], NAME[a..b] or NAME[a]")
    spec = BY_NXM.get(m["name"]) or FIELDS.get(m["name"])
    if spec is None:
        raise FlowError(f"unknown field {m['name']!r} in {text!r}")
    start = int(m["a"]) if m["a"] is not None else 0
    end = int(m["b"]) if m["b"] is not None else (start if m["a"] is not None else spec.width - 1)
    if not 0 <= start <= end < spec.width:
        raise FlowError(f"bad bit range in {text!r}: {spec.name} is {spec.width} bits")
    return Subfield(spec.name, start, end - start + 1)


def is_immediate(text: str) -> bool:
    """A learn source that is a number ("0x800"), not a subfield."""
    return bool(_IMMEDIATE_RE.match(text.strip()))


# ---------------------------------------------------------------- values


def mac_to_int(mac: str) -> int:
    parts = mac.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{1,2}", p) for p in parts):
        raise FlowError(f"{mac!r} is not a MAC address")
    return int("".join(p.zfill(2) for p in parts), 16)


def int_to_mac(value: int) -> str:
    return ":".join(f"{(value >> s) & 0xFF:02x}" for s in range(40, -8, -8))


def _ip_to_int(text: str, version: int) -> int:
    if version == 4:
        parts = text.split(".")
        # dotted quads as ipaddress reads them, without its cost (a policy has 100k)
        if len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 3
                                   and (p[0] != "0" or p == "0") for p in parts):
            a, b, c, d = (int(p) for p in parts)
            if a <= 255 and b <= 255 and c <= 255 and d <= 255:
                return a << 24 | b << 16 | c << 8 | d
    try:
        return int(ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text))
    except ValueError:
        raise FlowError(f"{text!r} is not an IPv{version} address") from None


def to_int(spec: Field, value: int | str) -> int:
    """One value (no mask) of a field as an integer; MAC and IP fields take their text
    form, any field a number ("0x800")."""
    if isinstance(value, bool):
        raise FlowError(f"{spec.name}: {value!r} is not a value")
    if isinstance(value, int):
        number = value
    elif spec.kind == "mac" and ":" in value:
        number = mac_to_int(value)
    elif spec.kind == "ipv4" and "." in value:
        number = _ip_to_int(value, 4)
    elif spec.kind == "ipv6" and ":" in value:
        number = _ip_to_int(value, 6)
    else:
        try:
            number = int(value, 0)
        except ValueError:
            raise FlowError(f"{spec.name}: cannot read {value!r}") from None
    if not 0 <= number <= spec.full:
        raise FlowError(f"{spec.name}: {value!r} does not fit in {spec.width} bits")
    return number


def _mask_of(spec: Field, text: str) -> int:
    if spec.kind in ("ipv4", "ipv6") and text.isdigit() and int(text) <= spec.width:
        return (spec.full << (spec.width - int(text))) & spec.full  # prefix length
    return to_int(spec, text)


def match_value(name: str, value: MatchValue) -> tuple[int, int]:
    """A model match value -> (value, mask) integers, checked as OVS checks them."""
    spec = field(name)
    if isinstance(value, tuple):
        raw, mask = to_int(spec, value[0]), to_int(spec, value[1])
    elif isinstance(value, str) and "/" in value:
        text, mask_text = value.split("/", 1)
        raw, mask = to_int(spec, text), _mask_of(spec, mask_text)
    else:
        raw, mask = to_int(spec, value), spec.full
    if mask != spec.full and not spec.maskable:
        raise FlowError(f"{name} cannot be masked (ovs-fields(7)): {value!r}")
    if raw & ~mask:
        raise FlowError(f"{name}={value!r}: value has bits outside the mask")
    return raw, mask


def format_value(name: str, value: int) -> int | str:
    """An integer field value in the form the model uses (MAC and IP addresses as text)."""
    kind = FIELDS[name].kind
    if kind == "mac":
        return int_to_mac(value)
    if kind == "ipv4":
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    if kind == "ipv6":
        return str(ipaddress.IPv6Address(value))
    return value


def match_entry(name: str, value: int, mask: int) -> MatchValue:
    """(value, mask) integers -> the model's match value (plain when the mask is full)."""
    spec = FIELDS[name]
    if mask == spec.full:
        return format_value(name, value)
    if spec.kind == "int":
        return (value, mask)
    return (str(format_value(name, value)), str(format_value(name, mask)))


# ---------------------------------------------------------------- prerequisites

Values = Mapping[str, tuple[int, int]]


def prereqs_met(spec: Field, values: Values) -> bool:
    """Does a match with these (value, mask) pairs guarantee the headers ``spec`` lives
    in? OVS compares the match's value, which is 0 where nothing is matched
    (mf_are_prereqs_ok): eth_type must be matched, icmpv6_code=0 need not."""
    for name, allowed in spec.prereqs:
        value, mask = values.get(name, (0, 0))
        if (value & mask) not in allowed:
            return False
    return True


def need_prereqs(name: str, values: Values, what: str = "") -> None:
    spec = FIELDS[name]
    if not prereqs_met(spec, values):
        needs = ", ".join(f"{n} in {sorted(hex(v) for v in vs)}" for n, vs in spec.prereqs)
        raise FlowError(f"{what}{spec.name} needs a match on {needs}")
