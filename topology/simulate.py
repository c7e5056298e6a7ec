"""An OpenFlow flow-table simulator with Open vSwitch semantics. No I/O.

`Switch(flows)` holds one bridge: its flow tables, the flows its `learn`
actions add while packets run, and a connection tracker. `Switch.process`
runs one packet through the pipeline and returns a `Result`: the copies that
left and by which port (each as modified at output time), the flows that
matched (`TraceStep`) and the verdict. `deliveries(switch, packet)` is just
the set of ports. Unit tests use it for fast verdicts on the flows of
`topology.flows.desired_state`; `socknet trace` can print `Result.describe()`.

Semantics, as documented in ovs-actions(7) and ovs-fields(7) and implemented
in lib/classifier.c and ofproto/ofproto-dpif-xlate.c:

* Lookup: the highest-priority matching flow wins. OpenFlow leaves undefined
  which of several matching flows of the same priority wins; the simulator
  picks deterministically (lowest content cookie) and lists the others in
  `TraceStep.tied`, so a test can assert that a flow set never relies on it.
* A flow runs its actions in order (apply-actions), then its goto_table. A
  table miss ends that table: in the main pipeline processing of the packet
  stops (a drop if nothing was output), under `resubmit` the resubmitting
  action list continues.
* `resubmit(,T)` runs table T inline, including any goto_table of the flow it
  finds, then the current action list continues. As in OVS, at most 64
  resubmits to the same or an earlier table may nest and a pass may run at
  most 4096 resubmits and gotos; beyond that the pass stops, keeping outputs.
* Registers reg0..reg7 are 0 when a packet enters the bridge.
* `output` to the packet's current in_port does nothing; only
  `Output("IN_PORT")` sends a packet back where it came from. `OutputReg`
  outputs to the port number in bits 0..15 of the register. Output to a port
  that does not exist (port 0, or not in ``ports`` when given) does nothing.
* `ct` forks the pipeline. With ``table=T`` a copy of the packet, with
  ct_state and ct_zone set, is re-injected into table T (after the current
  pass, like a recirculation). With or without a table, the original packet
  continues the current action list with its conntrack fields cleared
  (untracked again). So actions after ``ct(table=T)`` do run.
* Conntrack: connections are keyed by zone and 5-tuple (ICMP: type/code,
  echo request <-> reply) and exist only once a `ct(commit)` stored them.
  ct_state after a `ct`: +trk+new for a connection that is not committed, and
  also for further original-direction packets of a committed connection until
  a reply has been seen (what the Linux and userspace datapaths report,
  ovs-fields(7) simplifies this to "est: committed"); +trk+est in the original
  direction after a reply; +trk+est+rpl in the reply direction of a committed
  connection; +trk+inv for ICMP that cannot start a connection (replies
  without a request, errors: "rel" needs the embedded header, not modelled).
  ``Ct(commit, mark=(value, mask), label=n)`` (ct exec) writes ct_mark and the
  low 32 bits of ct_label into the connection, new or already committed (any
  direction); a re-injected packet of a committed connection carries its
  ct_mark and ct_label, as stored after that ct action. Not modelled: rel, NAT,
  TCP flag and window checks, timeouts. OVS rejects a `ct` action in a flow
  that does not match eth_type IPv4/IPv6, or with mark/label but no commit,
  and so does the simulator; a non-IP packet that reaches ct anyway is left
  untracked (ct_state 0).
* `ToController` (and ``Output("CONTROLLER")``) is a packet-in: recorded in
  `Result.packet_ins`, not an output. A flow's meter (rate limit) is noted in
  the log and not applied.
* `learn` adds a flow to its table, or replaces the flow with the same
  table, priority and match (like ``ovs-ofctl --strict mod-flows``; even a
  flow socknet installed). Learned flows carry `LEARNED_COOKIE`, are visible
  to later lookups (of this packet too) and stay in the switch. Learned loads
  are `Load` actions, a simulator-only action. Timeouts are ignored.
* Conjunctive matches, exactly as classifier_lookup(): let H be the highest
  priority of the matching ordinary flows. Conjunction flows (whose only
  actions are ``conjunction(id, k/n)``) that match at a priority above H are
  taken by priority, highest first; at one priority, a conjunction id whose
  clauses 1..n all have a matching flow is satisfied, and the table is looked
  up again with conj_id=id among ordinary flows only. If that lookup finds a
  flow it is the result, otherwise the search goes on (lower priorities, then
  H's flow). Several satisfied ids at one priority ("unpredictable" in OVS)
  are tried in increasing id order. Conjunction actions are recognised by
  duck typing: any action whose class is named ``Conjunction`` and has
  ``id``, ``clause`` (1-based) and ``n_clauses`` (`topology.model.Conjunction`
  is one), so this module does not depend on how the model spells it.

`Switch.replace_flows` swaps the installed flows as reconciliation does,
keeping learned flows and connections (e.g. to see a policy change cut a live
connection).

Flows are checked when a `Switch` is built, and `FlowError` names what OVS
would refuse or what makes the outcome depend on installation order: unknown
fields, masks on fields that cannot be masked, value bits outside the mask,
missing match prerequisites (ipv4_src needs eth_type=0x800, tcp_dst needs
ip_proto=6 ...) for matches and for the fields actions use, goto_table to a
table that is not later, `ct` without an IPv4/IPv6 match, conjunction flows
with other actions or fewer than 2 clauses, learn specs whose widths or
prerequisites do not fit, and two different flows with the same table,
priority and match (OVS keeps only the one installed last).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from topology.model import (
    CT_STATE_BITS,
    LEARNED_COOKIE,
    Action,
    Ct,
    Flow,
    Learn,
    LearnSpec,
    MatchValue,
    MoveField,
    Output,
    OutputReg,
    Owner,
    Resubmit,
    SetField,
    SetReg,
    ToController,
)
from topology.render import action_text, match_text

# ---------------------------------------------------------------- constants

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
ETH_RARP = 0x8035
ETH_IPV6 = 0x86DD
IP_PROTOS = {"icmp": 1, "tcp": 6, "udp": 17}
BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"

# OpenFlow 1.1+ number of the LOCAL port (the bridge's own interface).
OFPP_LOCAL = 0xFFFFFFFE
RESERVED_PORTS = {"LOCAL": OFPP_LOCAL}
MAX_PORT = 0xFEFF  # OVS assigns ports 1..0xfeff (ovs-fields(7), in_port)

MAX_TABLE = 254
MAX_BACKWARD_DEPTH = 64  # nested resubmits to the same or an earlier table
MAX_RESUBMITS = 4096  # resubmits + gotos in one pass
MAX_RECIRC_DEPTH = 6  # ct(table=...) re-injections in a row (dpif-netdev's limit)
MAX_CONJ_CLAUSES = 64

TRK = CT_STATE_BITS["trk"]
NEW = CT_STATE_BITS["new"]
EST = CT_STATE_BITS["est"]
RPL = CT_STATE_BITS["rpl"]
INV = CT_STATE_BITS["inv"]

_ICMP_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
_ICMP_REQUESTS = frozenset({8, 13, 15, 17})


class FlowError(ValueError):
    """A flow OVS would refuse, or a flow set whose outcome depends on install order."""


class _Abort(Exception):
    """Ends the current pass (recursion too deep, too many resubmits)."""


# ---------------------------------------------------------------- fields


@dataclass(frozen=True)
class FieldSpec:
    """One match field as OVS knows it (os-ken OXM name, width, how values are written)."""

    name: str
    width: int
    kind: Literal["int", "mac", "ipv4"] = "int"
    maskable: bool = True
    writable: bool = True
    prereqs: tuple[tuple[str, frozenset[int]], ...] = ()

    @property
    def full(self) -> int:
        return (1 << self.width) - 1


_IS_ARP = (("eth_type", frozenset({ETH_ARP, ETH_RARP})),)
_IS_IPV4 = (("eth_type", frozenset({ETH_IPV4})),)
_IS_IP = (("eth_type", frozenset({ETH_IPV4, ETH_IPV6})),)


def _l4(proto: int) -> tuple[tuple[str, frozenset[int]], ...]:
    return (*_IS_IP, ("ip_proto", frozenset({proto})))


_FIELD_LIST = (
    FieldSpec("in_port", 16, maskable=False),  # NXM_OF_IN_PORT is 16 bits; OVS ports fit
    FieldSpec("eth_dst", 48, "mac"),
    FieldSpec("eth_src", 48, "mac"),
    FieldSpec("eth_type", 16, maskable=False, writable=False),
    FieldSpec("arp_op", 16, maskable=False, prereqs=_IS_ARP),
    FieldSpec("arp_spa", 32, "ipv4", prereqs=_IS_ARP),
    FieldSpec("arp_tpa", 32, "ipv4", prereqs=_IS_ARP),
    FieldSpec("arp_sha", 48, "mac", prereqs=_IS_ARP),
    FieldSpec("arp_tha", 48, "mac", prereqs=_IS_ARP),
    FieldSpec("ipv4_src", 32, "ipv4", prereqs=_IS_IPV4),
    FieldSpec("ipv4_dst", 32, "ipv4", prereqs=_IS_IPV4),
    FieldSpec("ip_proto", 8, maskable=False, writable=False, prereqs=_IS_IP),
    FieldSpec("tcp_src", 16, prereqs=_l4(6)),
    FieldSpec("tcp_dst", 16, prereqs=_l4(6)),
    FieldSpec("udp_src", 16, prereqs=_l4(17)),
    FieldSpec("udp_dst", 16, prereqs=_l4(17)),
    FieldSpec("icmpv4_type", 8, maskable=False, prereqs=(*_IS_IPV4, ("ip_proto", frozenset({1})))),
    FieldSpec("icmpv4_code", 8, maskable=False, prereqs=(*_IS_IPV4, ("ip_proto", frozenset({1})))),
    FieldSpec("ct_state", 32, writable=False),
    FieldSpec("ct_zone", 16, maskable=False, writable=False),
    FieldSpec("ct_mark", 32, writable=False),  # only ct(exec(...)) writes it
    FieldSpec("ct_label", 128, writable=False),
    FieldSpec("conj_id", 32, maskable=False, writable=False),
    *(FieldSpec(f"reg{i}", 32) for i in range(8)),
)
FIELDS: dict[str, FieldSpec] = {f.name: f for f in _FIELD_LIST}
REGISTERS = tuple(f"reg{i}" for i in range(8))
_CT_FIELDS = ("ct_state", "ct_zone", "ct_mark", "ct_label")

_NXM_NAMES = {
    "NXM_OF_IN_PORT": "in_port",
    "NXM_OF_ETH_DST": "eth_dst",
    "NXM_OF_ETH_SRC": "eth_src",
    "NXM_OF_ETH_TYPE": "eth_type",
    "NXM_OF_IP_PROTO": "ip_proto",
    "NXM_OF_IP_SRC": "ipv4_src",
    "NXM_OF_IP_DST": "ipv4_dst",
    "NXM_OF_TCP_SRC": "tcp_src",
    "NXM_OF_TCP_DST": "tcp_dst",
    "NXM_OF_UDP_SRC": "udp_src",
    "NXM_OF_UDP_DST": "udp_dst",
    "NXM_OF_ICMP_TYPE": "icmpv4_type",
    "NXM_OF_ICMP_CODE": "icmpv4_code",
    "NXM_OF_ARP_OP": "arp_op",
    "NXM_OF_ARP_SPA": "arp_spa",
    "NXM_OF_ARP_TPA": "arp_tpa",
    "NXM_NX_ARP_SHA": "arp_sha",
    "NXM_NX_ARP_THA": "arp_tha",
    "NXM_NX_CT_STATE": "ct_state",
    "NXM_NX_CT_ZONE": "ct_zone",
    "NXM_NX_CT_MARK": "ct_mark",
    "NXM_NX_CT_LABEL": "ct_label",
    "NXM_NX_CONJ_ID": "conj_id",
    **{f"NXM_NX_REG{i}": f"reg{i}" for i in range(8)},
    **{f"OXM_OF_{name.upper()}": name for name in FIELDS},
}
_SUBFIELD_RE = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?:(?P<a>\d+)(?:\.\.(?P<b>\d+))?)?\])?$"
)


def field_spec(name: str) -> FieldSpec:
    """The field for an os-ken name ("eth_src"), NXM name ("NXM_OF_ETH_SRC") or OXM name."""
    spec = FIELDS.get(_NXM_NAMES.get(name, name))
    if spec is None:
        raise FlowError(f"unknown field {name!r}")
    return spec


@dataclass(frozen=True)
class Subfield:
    """Bits ``start .. start+nbits-1`` of a field: "NXM_NX_REG1[0..15]", "NXM_OF_ETH_SRC[]"."""

    field: str
    start: int
    nbits: int

    @property
    def mask(self) -> int:
        return ((1 << self.nbits) - 1) << self.start


def parse_subfield(text: str) -> Subfield:
    """ "NXM_NX_REG1[0..15]" / "NXM_NX_REG1[3]" / "NXM_OF_ETH_SRC[]" / "reg1" -> Subfield."""
    m = _SUBFIELD_RE.match(text.strip())
    if m is None:
        raise FlowError(f"bad field {text!r}: expected NAME, NAME[], NAME[a..b] or NAME[a]")
    spec = field_spec(m["name"])
    start = int(m["a"]) if m["a"] is not None else 0
    end = int(m["b"]) if m["b"] is not None else (start if m["a"] is not None else spec.width - 1)
    if not 0 <= start <= end < spec.width:
        raise FlowError(f"bad bit range in {text!r}: {spec.name} is {spec.width} bits")
    return Subfield(spec.name, start, end - start + 1)


def _is_field_ref(text: str) -> bool:
    m = _SUBFIELD_RE.match(text.strip())
    return m is not None and _NXM_NAMES.get(m["name"], m["name"]) in FIELDS


# ---------------------------------------------------------------- values


def mac_to_int(mac: str) -> int:
    parts = mac.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{1,2}", p) for p in parts):
        raise FlowError(f"{mac!r} is not a MAC address")
    return int("".join(p.zfill(2) for p in parts), 16)


def int_to_mac(value: int) -> str:
    return ":".join(f"{(value >> s) & 0xFF:02x}" for s in range(40, -8, -8))


def _ipv4_to_int(text: str) -> int:
    parts = text.split(".")
    # dotted quads as ipaddress reads them, without its cost (a policy has 100k of them)
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 3
                               and (p[0] != "0" or p == "0") for p in parts):
        a, b, c, d = (int(p) for p in parts)
        if a <= 255 and b <= 255 and c <= 255 and d <= 255:
            return a << 24 | b << 16 | c << 8 | d
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise FlowError(f"{text!r} is not an IPv4 address") from None


def _scalar(spec: FieldSpec, value: int | str) -> int:
    """One value (no mask) of a field as an integer; MAC and IPv4 fields take their text form."""
    if isinstance(value, bool):
        raise FlowError(f"{spec.name}: {value!r} is not a value")
    if isinstance(value, int):
        number = value
    elif spec.kind == "mac" and ":" in value:
        number = mac_to_int(value)
    elif spec.kind == "ipv4" and "." in value:
        number = _ipv4_to_int(value)
    else:
        try:
            number = int(value, 0)
        except ValueError:
            raise FlowError(f"{spec.name}: cannot read {value!r}") from None
    if not 0 <= number <= spec.full:
        raise FlowError(f"{spec.name}: {value!r} does not fit in {spec.width} bits")
    return number


def _mask_of(spec: FieldSpec, text: str) -> int:
    if spec.kind == "ipv4" and text.isdigit() and int(text) <= 32:
        return (spec.full << (32 - int(text))) & spec.full  # prefix length
    return _scalar(spec, text)


def match_value(name: str, value: MatchValue) -> tuple[int, int]:
    """A model match value -> (value, mask) integers, checked as OVS checks them."""
    spec = field_spec(name)
    if isinstance(value, tuple):
        raw, mask = _scalar(spec, value[0]), _scalar(spec, value[1])
    elif isinstance(value, str) and "/" in value:
        text, mask_text = value.split("/", 1)
        raw, mask = _scalar(spec, text), _mask_of(spec, mask_text)
    else:
        raw, mask = _scalar(spec, value), spec.full
    if mask != spec.full and not spec.maskable:
        raise FlowError(f"{name} cannot be masked (ovs-fields(7)): {value!r}")
    if raw & ~mask:
        raise FlowError(f"{name}={value!r}: value has bits outside the mask")
    return raw, mask


def format_value(name: str, value: int) -> int | str:
    """An integer field value in the form the model and `Packet` use (MAC/IPv4 as text)."""
    kind = field_spec(name).kind
    if kind == "mac":
        return int_to_mac(value)
    if kind == "ipv4":
        return str(ipaddress.IPv4Address(value))
    return value


def _match_entry(name: str, value: int, mask: int) -> MatchValue:
    spec = field_spec(name)
    if mask == spec.full:
        return format_value(name, value)
    if spec.kind == "int":
        return (value, mask)
    return (cast(str, format_value(name, value)), cast(str, format_value(name, mask)))


# ---------------------------------------------------------------- packets


@dataclass(frozen=True)
class Packet:
    """Header fields of one packet, by os-ken name. None: the packet has no such header.

    MAC and IPv4 addresses are text ("02:00:00:00:01:00", "10.0.0.1"); MACs are
    kept lower case.
    """

    in_port: int
    eth_src: str = ZERO_MAC
    eth_dst: str = ZERO_MAC
    eth_type: int = ETH_IPV6  # a payload the simulator does not read
    arp_op: int | None = None
    arp_spa: str | None = None
    arp_tpa: str | None = None
    arp_sha: str | None = None
    arp_tha: str | None = None
    ipv4_src: str | None = None
    ipv4_dst: str | None = None
    ip_proto: int | None = None
    tcp_src: int | None = None
    tcp_dst: int | None = None
    udp_src: int | None = None
    udp_dst: int | None = None
    icmpv4_type: int | None = None
    icmpv4_code: int | None = None

    def __post_init__(self) -> None:
        for name in PACKET_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            canonical = format_value(name, _scalar(FIELDS[name], value))
            if canonical != value:
                object.__setattr__(self, name, canonical)

    def headers(self) -> dict[str, int]:
        """The fields the packet carries, as integers."""
        return {
            name: _scalar(FIELDS[name], value)
            for name in PACKET_FIELDS
            if (value := getattr(self, name)) is not None
        }

    def reply(self, in_port: int, *, src_mac: str | None = None) -> Packet:
        """The answer to this packet, entering at ``in_port``: addresses and ports swapped.

        ``src_mac`` replaces the swapped Ethernet source (e.g. a router's MAC);
        ICMP echo requests become echo replies.
        """
        changes: dict[str, Any] = {"in_port": in_port, "eth_dst": self.eth_src,
                                   "eth_src": src_mac or self.eth_dst}
        for a, b in (("ipv4_src", "ipv4_dst"), ("tcp_src", "tcp_dst"), ("udp_src", "udp_dst")):
            changes[a], changes[b] = getattr(self, b), getattr(self, a)
        if self.icmpv4_type is not None:
            changes["icmpv4_type"] = _ICMP_PAIRS.get(self.icmpv4_type, self.icmpv4_type)
        return dataclasses.replace(self, **changes)


PACKET_FIELDS = tuple(f.name for f in dataclasses.fields(Packet))


def ethernet(in_port: int, src_mac: str, dst_mac: str = BROADCAST,
             eth_type: int = ETH_IPV6) -> Packet:
    """A frame with no header the simulator reads beyond Ethernet (IPv6 by default)."""
    return Packet(in_port=in_port, eth_src=src_mac, eth_dst=dst_mac, eth_type=eth_type)


def arp_request(in_port: int, src_mac: str, src_ip: str, target_ip: str) -> Packet:
    """Broadcast "who has target_ip? tell src_ip"."""
    return Packet(in_port=in_port, eth_src=src_mac, eth_dst=BROADCAST, eth_type=ETH_ARP,
                  arp_op=1, arp_spa=src_ip, arp_tpa=target_ip, arp_sha=src_mac,
                  arp_tha=ZERO_MAC)


def ipv4(in_port: int, src_mac: str, dst_mac: str, src_ip: str, dst_ip: str,
         proto: Literal["tcp", "udp", "icmp"] = "tcp", sport: int = 49152, dport: int = 80,
         *, icmp_type: int = 8, icmp_code: int = 0) -> Packet:
    """An IPv4 packet; TCP/UDP use ``sport``/``dport``, ICMP ``icmp_type``/``icmp_code``."""
    l4: dict[str, int] = {}
    if proto == "icmp":
        l4 = {"icmpv4_type": icmp_type, "icmpv4_code": icmp_code}
    elif proto in ("tcp", "udp"):
        l4 = {f"{proto}_src": sport, f"{proto}_dst": dport}
    else:
        raise ValueError(f"unknown protocol {proto!r}")
    return Packet(in_port=in_port, eth_src=src_mac, eth_dst=dst_mac, eth_type=ETH_IPV4,
                  ipv4_src=src_ip, ipv4_dst=dst_ip, ip_proto=IP_PROTOS[proto], **l4)


# ---------------------------------------------------------------- simulator-only action


@dataclass(frozen=True)
class Load:
    """``load:value->dst`` (dst an NXM subfield): the load actions of learned flows."""

    value: int
    dst: str


def action_str(action: object) -> str:
    """ovs-ofctl text of an action, including `Load` and duck-typed conjunctions."""
    if isinstance(action, Load):
        return f"load:{action.value:#x}->{action.dst}"
    try:
        conj = _conjunction(action)
        if conj is not None:
            return f"conjunction({conj.id},{conj.clause}/{conj.n_clauses})"
        return action_text(cast(Action, action))
    except (FlowError, TypeError, KeyError, ValueError):
        return repr(action)


def _match_str(name: str, value: MatchValue) -> str:
    try:
        return match_text(name, value)
    except (KeyError, TypeError, ValueError, AssertionError):
        return f"{name}={value!r}"


def flow_str(flow: Flow) -> str:
    """Match and actions of a flow in ovs-ofctl syntax (without cookie and table)."""
    match = ",".join(_match_str(name, value) for name, value in flow.match)
    acts = [f"meter:{flow.meter}"] if flow.meter is not None else []
    acts += [action_str(a) for a in flow.actions]
    if flow.goto is not None:
        acts.append(f"goto_table:{flow.goto}")
    return f"priority={flow.priority}{',' if match else ''}{match} actions=" + (
        ",".join(acts) or "drop")


# ---------------------------------------------------------------- conjunctions


@dataclass(frozen=True)
class ConjClause:
    """conjunction(id, clause/n_clauses), read from any action class named Conjunction."""

    id: int
    clause: int
    n_clauses: int


def _conjunction(action: object) -> ConjClause | None:
    if type(action).__name__ != "Conjunction":
        return None
    conj = cast(Any, action)
    try:
        return ConjClause(int(conj.id), int(conj.clause), int(conj.n_clauses))
    except (AttributeError, TypeError, ValueError):
        raise FlowError(f"{action!r}: a Conjunction needs integer id, clause, n_clauses") from None


# ---------------------------------------------------------------- flow checks

NormMatch = tuple[tuple[str, int, int], ...]


def normalize_match(flow: Flow) -> NormMatch:
    """(field, value, mask) per matched field, by os-ken name, sorted."""
    out: dict[str, tuple[int, int]] = {}
    for name, value in flow.match:
        spec = field_spec(name)
        if spec.name in out:
            raise FlowError(f"{spec.name} matched twice in {flow_str(flow)}")
        out[spec.name] = match_value(name, value)
    return tuple(sorted((name, v, m) for name, (v, m) in out.items()))


def prereqs_met(spec: FieldSpec, match: Mapping[str, tuple[int, int]]) -> bool:
    """Does ``match`` guarantee the headers ``spec`` lives in (ovs-fields(7) prerequisites)?"""
    for name, allowed in spec.prereqs:
        value, mask = match.get(name, (0, 0))
        if mask != FIELDS[name].full or value not in allowed:
            return False
    return True


def _need_prereqs(name: str, match: Mapping[str, tuple[int, int]], what: str) -> None:
    spec = field_spec(name)
    if not prereqs_met(spec, match):
        needs = ", ".join(f"{n} in {sorted(hex(v) for v in vs)}" for n, vs in spec.prereqs)
        raise FlowError(f"{what}: {spec.name} needs a match on {needs}")


def _need_writable(name: str, what: str) -> None:
    if not field_spec(name).writable:
        raise FlowError(f"{what}: {field_spec(name).name} is read-only")


def _check_table(table: int, what: str) -> None:
    if not 0 <= table <= MAX_TABLE:
        raise FlowError(f"{what}: table {table} is not 0..{MAX_TABLE}")


def _check_output(port: int | str, what: str) -> None:
    if isinstance(port, str):
        if port not in ("IN_PORT", "ALL", "FLOOD", "CONTROLLER", *RESERVED_PORTS):
            raise FlowError(f"{what}: unsupported port {port!r}")
    elif not 0 <= port <= 0xFFFFFFFF:
        raise FlowError(f"{what}: bad port {port}")


def _check_register(reg: str, what: str) -> None:
    if reg not in REGISTERS:
        raise FlowError(f"{what}: {reg!r} is not one of reg0..reg7")


def _check_move(src: str, dst: str, match: Mapping[str, tuple[int, int]], what: str) -> None:
    s, d = parse_subfield(src), parse_subfield(dst)
    if s.nbits != d.nbits:
        raise FlowError(f"{what}: {src} is {s.nbits} bits, {dst} is {d.nbits}")
    _need_writable(d.field, what)
    _need_prereqs(s.field, match, what)
    _need_prereqs(d.field, match, what)


def _check_ct(ct: Ct, match: Mapping[str, tuple[int, int]], what: str) -> None:
    if not 0 <= ct.zone <= 0xFFFF:
        raise FlowError(f"{what}: ct zone {ct.zone} is not 16 bits")
    if ct.table is not None:
        _check_table(ct.table, what)
    eth_type = match.get("eth_type", (0, 0))
    if eth_type[1] != 0xFFFF or eth_type[0] not in (ETH_IPV4, ETH_IPV6):
        raise FlowError(f"{what}: ct needs eth_type=0x800 or 0x86dd in the match "
                        "(OVS: OFPBAC_MATCH_INCONSISTENT)")
    state, mask = match.get("ct_state", (0, 0))
    if ct.commit and state & mask & INV:
        raise FlowError(f"{what}: ct(commit) on +inv packets")
    if not ct.commit and (ct.mark is not None or ct.label is not None):
        raise FlowError(f"{what}: ct exec (mark, label) needs commit")
    if ct.mark is not None and (ct.mark[0] & ~ct.mark[1] or ct.mark[1] >> 32):
        raise FlowError(f"{what}: bad ct_mark value/mask {ct.mark}")
    if ct.label is not None and not 0 <= ct.label <= 0xFFFFFFFF:
        raise FlowError(f"{what}: ct label {ct.label} is not 32 bits")


def _check_action(action: object, match: Mapping[str, tuple[int, int]], what: str) -> None:
    match action:
        case Output(port=port):
            _check_output(port, what)
        case OutputReg(reg=reg):
            _check_register(reg, what)
        case SetReg(reg=reg, value=value):
            _check_register(reg, what)
            _scalar(FIELDS[reg], value)
        case SetField(field=name, value=value):
            _need_writable(name, what)
            _need_prereqs(name, match, what)
            _scalar(field_spec(name), value)
        case MoveField(src=src, dst=dst):
            _check_move(src, dst, match, what)
        case Load(value=value, dst=dst):
            sub = parse_subfield(dst)
            _need_writable(sub.field, what)
            _need_prereqs(sub.field, match, what)
            if value >> sub.nbits:
                raise FlowError(f"{what}: {value:#x} does not fit {dst}")
        case Resubmit(table=table):
            _check_table(table, what)
        case Ct():
            _check_ct(action, match, what)
        case Learn():
            check_learn(action, match, what)
        case ToController():
            pass
        case _:
            raise FlowError(f"{what}: the simulator does not know action {action!r}")


def _learn_src_bits(spec: LearnSpec, dst_bits: int, dst_field: str, what: str) -> None:
    if _is_field_ref(spec.src):
        src = parse_subfield(spec.src)
        if src.nbits != dst_bits:
            raise FlowError(f"{what}: learn {spec.src} is {src.nbits} bits, "
                            f"{spec.dst} is {dst_bits}")
        return
    if _scalar(field_spec(dst_field), spec.src) >> dst_bits:
        raise FlowError(f"{what}: learn immediate {spec.src} does not fit {spec.dst}")


def check_learn(learn: Learn, match: Mapping[str, tuple[int, int]], what: str) -> None:
    """learn_check() of OVS: sources valid in this flow, destinations in the learned one.

    Match specs build the learned match in order, so a prerequisite (e.g.
    "0x800" -> NXM_OF_ETH_TYPE[]) must come before the field that needs it.
    """
    _check_table(learn.table, what)
    learned: dict[str, tuple[int, int]] = {}
    for spec in learn.specs:
        if spec.kind == "output":
            _need_prereqs(parse_subfield(spec.src).field, match, what)
            continue
        if spec.kind not in ("match", "load"):
            raise FlowError(f"{what}: unknown learn spec kind {spec.kind!r}")
        dst = parse_subfield(spec.dst)
        _learn_src_bits(spec, dst.nbits, dst.field, what)
        if _is_field_ref(spec.src):
            _need_prereqs(parse_subfield(spec.src).field, match, what)
        _need_prereqs(dst.field, learned, f"{what} (learned flow)")
        if spec.kind == "load":
            _need_writable(dst.field, what)
        elif not _is_field_ref(spec.src):  # OVS records immediates only (learn_check)
            value = _scalar(field_spec(dst.field), spec.src) << dst.start
            old_v, old_m = learned.get(dst.field, (0, 0))
            learned[dst.field] = ((old_v & ~dst.mask) | value, old_m | dst.mask)


def _conj_clauses(flow: Flow, what: str) -> tuple[ConjClause, ...]:
    clauses = tuple(c for a in flow.actions if (c := _conjunction(a)) is not None)
    if not clauses:
        return ()
    if len(clauses) != len(flow.actions) or flow.goto is not None:
        raise FlowError(f"{what}: a flow with conjunction actions may have no other action "
                        "or goto_table")
    for c in clauses:
        if not 2 <= c.n_clauses <= MAX_CONJ_CLAUSES or not 1 <= c.clause <= c.n_clauses:
            raise FlowError(f"{what}: conjunction({c.id},{c.clause}/{c.n_clauses}) needs "
                            f"1 <= k <= n and 2 <= n <= {MAX_CONJ_CLAUSES}")
    return clauses


@dataclass(frozen=True)
class _Rule:
    """A checked flow as the switch holds it."""

    flow: Flow
    cookie: int
    match: NormMatch
    conjunctions: tuple[ConjClause, ...]

    @property
    def priority(self) -> int:
        return self.flow.priority

    @property
    def soft(self) -> bool:
        return bool(self.conjunctions)

    @property
    def key(self) -> tuple[int, int, NormMatch]:
        return (self.flow.table, self.flow.priority, self.match)

    @property
    def order(self) -> tuple[int, int]:
        return (-self.flow.priority, self.flow.cookie)

    def matches(self, fields: Mapping[str, int]) -> bool:
        return all(fields.get(name, 0) & mask == value for name, value, mask in self.match)


# Stands for "table T: <the flow in ovs-ofctl syntax>" in FlowError messages while a flow
# is checked: writing that text for every flow cost a fifth of checking a large policy.
_WHAT = "\x00flow\x00"
_COMPILED_MAX = 1 << 18
_compiled: dict[Flow, _Rule] = {}


def compile_flow(flow: Flow, cookie: int | None = None) -> _Rule:
    """Check one flow as OVS would on flow-mod and prepare it for lookups. Flows are
    immutable: the result for a flow with its own cookie is kept (a policy reload that
    builds a simulator again mostly finds the same flows)."""
    if cookie is None:
        rule = _compiled.get(flow)
        if rule is not None and rule.flow is flow:
            return rule
    try:
        rule = _compile_flow(flow, flow.cookie if cookie is None else cookie)
    except FlowError as exc:
        what = f"table {flow.table}: {flow_str(flow)}"
        raise FlowError(str(exc).replace(_WHAT, what)) from None
    if cookie is None:
        if len(_compiled) >= _COMPILED_MAX:
            _compiled.clear()
        _compiled[flow] = rule
    return rule


def clear_compiled() -> None:
    """Forget the checked flows kept by `compile_flow` (benchmarks time cold checks)."""
    _compiled.clear()


def _compile_flow(flow: Flow, cookie: int) -> _Rule:
    what = _WHAT
    _check_table(flow.table, what)
    if not 0 <= flow.priority <= 0xFFFF:
        raise FlowError(f"{what}: priority is not 0..65535")
    norm = normalize_match(flow)
    as_dict = {name: (v, m) for name, v, m in norm}
    for name, _, _ in norm:
        _need_prereqs(name, as_dict, what)
    if flow.goto is not None and not flow.table < flow.goto <= MAX_TABLE:
        raise FlowError(f"{what}: goto_table must go to a later table (OFPBIC_BAD_TABLE_ID)")
    conjunctions = _conj_clauses(flow, what)
    if not conjunctions:
        for action in flow.actions:
            _check_action(action, as_dict, what)
    return _Rule(flow, cookie, norm, conjunctions)


def _check_conjunction_sizes(rules: Iterable[_Rule]) -> None:
    sizes: dict[tuple[int, int, int], set[int]] = {}
    for rule in rules:
        for c in rule.conjunctions:
            sizes.setdefault((rule.flow.table, rule.priority, c.id), set()).add(c.n_clauses)
    for (table, priority, conj_id), ns in sizes.items():
        if len(ns) > 1:
            raise FlowError(f"table {table} priority {priority}: conjunction {conj_id} has "
                            f"flows with different numbers of clauses {sorted(ns)}")


# ---------------------------------------------------------------- conntrack

CtKey = tuple[int, int, int, int, int]  # ip_proto, src, dst, sport (ICMP type), dport (code)


@dataclass(frozen=True)
class Connection:
    """A committed connection: zone, original-direction 5-tuple, what ct stored with it."""

    zone: int
    ip_proto: int
    src: str
    dst: str
    sport: int
    dport: int
    seen_reply: bool
    mark: int
    label: int


@dataclass(frozen=True)
class CtLookup:
    """What a ct action tells the packet: ct_state, and ct_mark/ct_label of its connection."""

    state: int
    mark: int = 0
    label: int = 0


@dataclass
class _Conn:
    seen_reply: bool = False
    mark: int = 0
    label: int = 0

    def execute(self, mark: tuple[int, int] | None, label: int | None) -> None:
        """ct(commit, exec(set_field:...->ct_mark, ...->ct_label))."""
        if mark is not None:
            self.mark = (self.mark & ~mark[1]) | (mark[0] & mark[1])
        if label is not None:
            self.label = (self.label & ~0xFFFFFFFF) | label


def _ct_key(fields: Mapping[str, int]) -> CtKey:
    proto = fields.get("ip_proto", 0)
    if proto == 1:
        ports = (fields.get("icmpv4_type", 0), fields.get("icmpv4_code", 0))
    elif proto in (6, 17):
        name = "tcp" if proto == 6 else "udp"
        ports = (fields.get(f"{name}_src", 0), fields.get(f"{name}_dst", 0))
    else:
        ports = (0, 0)
    return (proto, fields.get("ipv4_src", 0), fields.get("ipv4_dst", 0), *ports)


def _ct_reverse(key: CtKey) -> CtKey:
    proto, src, dst, sport, dport = key
    if proto == 1:
        return (proto, dst, src, _ICMP_PAIRS.get(sport, -1), dport)
    return (proto, dst, src, dport, sport)


class Conntrack:
    """Connections per zone, as far as `ct` needs them (see the module docstring)."""

    def __init__(self) -> None:
        self._conns: dict[tuple[int, CtKey], _Conn] = {}

    def track(self, zone: int, fields: Mapping[str, int], commit: bool = False,
              mark: tuple[int, int] | None = None, label: int | None = None) -> CtLookup:
        """A packet going through ct(zone=zone[, commit[, exec(mark, label)]])."""
        if fields.get("eth_type") != ETH_IPV4:
            return CtLookup(0)  # untracked, like a non-IP packet in OVS
        key = _ct_key(fields)
        state, conn = self._find(zone, key)
        if conn is None and state & NEW and commit:
            conn = self._conns[zone, key] = _Conn()
        if conn is None:
            return CtLookup(state)
        if commit:
            conn.execute(mark, label)
        return CtLookup(state, conn.mark, conn.label)

    def _find(self, zone: int, key: CtKey) -> tuple[int, _Conn | None]:
        conn = self._conns.get((zone, key))
        if conn is not None:
            return TRK | (EST if conn.seen_reply else NEW), conn
        conn = self._conns.get((zone, _ct_reverse(key)))
        if conn is not None:
            conn.seen_reply = True
            return TRK | EST | RPL, conn
        if key[0] == 1 and key[3] not in _ICMP_REQUESTS:
            return TRK | INV, None
        return TRK | NEW, None

    def connections(self) -> list[Connection]:
        return [
            Connection(zone, key[0], str(ipaddress.IPv4Address(key[1])),
                       str(ipaddress.IPv4Address(key[2])), key[3], key[4], conn.seen_reply,
                       conn.mark, conn.label)
            for (zone, key), conn in sorted(self._conns.items(), key=lambda kv: kv[0])
        ]


def ct_state_text(state: int) -> str:
    """0x2a -> "+trk+est+rpl"; 0 -> "-trk"."""
    if not state:
        return "-trk"
    names = sorted(CT_STATE_BITS.items(), key=lambda kv: kv[1] != TRK)
    return "".join(f"+{name}" for name, bit in names if state & bit)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class TraceStep:
    """One table lookup: the flow found (None on a miss) and where in the pipeline.

    ``depth`` counts nested resubmits, ``recirc`` the ct(table=...) re-injection
    (0: the packet as received), ``ct_state`` is the packet's at the lookup,
    ``conj_id`` is set when the flow was found by a conjunctive match, ``tied``
    lists other flows of the same priority that matched too (OpenFlow: which
    one wins is undefined).
    """

    table: int
    priority: int | None
    flow: Flow | None
    cookie: int | None
    depth: int = 0
    recirc: int = 0
    ct_state: int = 0
    conj_id: int | None = None
    tied: tuple[Flow, ...] = ()


@dataclass
class Result:
    """What became of one packet."""

    outputs: list[tuple[int, Packet]] = field(default_factory=list)
    trace: list[TraceStep] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    packet_ins: list[Packet] = field(default_factory=list)  # ToController

    @property
    def verdict(self) -> Literal["output", "drop"]:
        return "output" if self.outputs else "drop"

    @property
    def ports(self) -> set[int]:
        return {port for port, _ in self.outputs}

    def on(self, port: int) -> list[Packet]:
        """The packets output to ``port``."""
        return [pkt for p, pkt in self.outputs if p == port]

    def describe(self) -> str:
        return "\n".join([*self.log, f"verdict: {self.verdict} {sorted(self.ports)}"])


@dataclass
class _State:
    """The packet being processed: header fields present, registers and metadata."""

    fields: dict[str, int]
    present: frozenset[str]

    @classmethod
    def of(cls, packet: Packet) -> _State:
        headers = packet.headers()
        return cls(headers, frozenset(headers))

    def copy(self) -> _State:
        return _State(dict(self.fields), self.present)

    def get(self, name: str) -> int:
        return self.fields.get(name, 0)

    def read(self, sub: Subfield) -> int:
        return (self.get(sub.field) & sub.mask) >> sub.start

    def write(self, sub: Subfield, value: int) -> None:
        """Set bits of a field; a header the packet lacks is left alone (OVS: a no-op)."""
        if sub.field in PACKET_FIELDS and sub.field not in self.present:
            return
        self.fields[sub.field] = (self.get(sub.field) & ~sub.mask) | ((value << sub.start)
                                                                       & sub.mask)

    def clear_ct(self) -> None:
        for name in _CT_FIELDS:
            self.fields.pop(name, None)

    def packet(self) -> Packet:
        return Packet(**{name: format_value(name, self.fields[name])
                         for name in PACKET_FIELDS if name in self.present})


@dataclass
class _Run:
    """Bookkeeping for one `Switch.process` call."""

    result: Result = field(default_factory=Result)
    pending: list[tuple[_State, int, int]] = field(default_factory=list)
    recirc: int = 0  # number of the current pass (0: the packet as received)
    level: int = 0  # re-injections that led to the current pass
    resubmits: int = 0

    def note(self, text: str, depth: int = 0) -> None:
        self.result.log.append("  " * (depth + 1) + text)

    def emit(self, port: int, state: _State, depth: int) -> None:
        self.result.outputs.append((port, state.packet()))
        self.note(f"output:{port}", depth)

    def count_resubmit(self) -> None:
        self.resubmits += 1
        if self.resubmits > MAX_RESUBMITS:
            raise _Abort(f"more than {MAX_RESUBMITS} resubmits")


@dataclass(frozen=True)
class _Hit:
    rule: _Rule | None
    tied: tuple[_Rule, ...] = ()
    conj_id: int | None = None


def _best(rules: Iterable[_Rule]) -> _Hit:
    """Highest-priority rule of ``rules`` (already in lookup order) and its same-priority ties."""
    found = list(rules)
    if not found:
        return _Hit(None)
    top = found[0]
    return _Hit(top, tuple(r for r in found[1:] if r.priority == top.priority))


def _satisfied(soft: Iterable[_Rule]) -> list[int]:
    """Conjunction ids whose every clause 1..n has a matching flow in ``soft``."""
    clauses: dict[int, set[int]] = {}
    sizes: dict[int, int] = {}
    for rule in soft:
        for c in rule.conjunctions:
            clauses.setdefault(c.id, set()).add(c.clause)
            sizes[c.id] = c.n_clauses
    return sorted(i for i, ks in clauses.items() if len(ks) == sizes[i])


class _Table:
    """One flow table: its rules in lookup order, and a tuple space over them (as OVS's
    classifier): rules grouped by the fields and masks they match, each group a dict
    from the masked values. A lookup costs a dict lookup per group, not a test per
    rule, which matters for a policy's tests on 100k flows."""

    def __init__(self, rules: list[_Rule]) -> None:
        self.rules = sorted(rules, key=lambda r: r.order)
        self._spaces: dict[tuple[tuple[str, int], ...], dict[tuple[int, ...], list[int]]] = {}
        for k, rule in enumerate(self.rules):
            shape = tuple((name, mask) for name, _, mask in rule.match)
            values = tuple(value for _, value, _ in rule.match)
            self._spaces.setdefault(shape, {}).setdefault(values, []).append(k)

    def matching(self, fields: Mapping[str, int]) -> list[_Rule]:
        """The rules that match ``fields``, in lookup order."""
        found: list[int] = []
        for shape, space in self._spaces.items():
            hit = space.get(tuple(fields.get(name, 0) & mask for name, mask in shape))
            if hit:
                found.extend(hit)
        found.sort()
        return [self.rules[k] for k in found]


# ---------------------------------------------------------------- the switch


class Switch:
    """One bridge: flow tables, learned flows and conntrack. `process` mutates it.

    ``ports``: the bridge's OpenFlow port numbers, if known; output to any
    other port is then a no-op (as in OVS) and ALL/FLOOD can be used.
    """

    def __init__(self, flows: Iterable[Flow], *, ports: Iterable[int] | None = None) -> None:
        self.ports = frozenset(ports) if ports is not None else None
        self.conntrack = Conntrack()
        self._tables: dict[int, _Table] = {}
        self.replace_flows(flows)

    def replace_flows(self, flows: Iterable[Flow]) -> None:
        """Install ``flows`` in place of the current ones, as reconciliation does.

        Learned flows and conntrack connections stay (a new flow with the same
        table, priority and match replaces a learned one, as in OVS).
        """
        rules: dict[tuple[int, int, NormMatch], _Rule] = {}
        for flow in set(flows):
            rule = compile_flow(flow)
            other = rules.get(rule.key)
            if other is not None:
                raise FlowError(f"table {flow.table}: two flows with the same priority and "
                                f"match (OVS keeps only one): {flow_str(other.flow)} | "
                                f"{flow_str(flow)}")
            rules[rule.key] = rule
        _check_conjunction_sizes(rules.values())
        learned = [r for t in self._tables.values() for r in t.rules
                   if r.cookie == LEARNED_COOKIE]
        by_table: dict[int, list[_Rule]] = {}
        for rule in [r for r in learned if r.key not in rules] + list(rules.values()):
            by_table.setdefault(rule.flow.table, []).append(rule)
        self._tables = {t: _Table(rs) for t, rs in by_table.items()}

    # -------------------------------------------------------- inspection

    def flows(self, table: int | None = None) -> list[Flow]:
        """Installed and learned flows (of one table), in lookup order."""
        tables = [table] if table is not None else sorted(self._tables)
        return [r.flow for t in tables for r in self._rules(t)]

    def learned(self) -> list[Flow]:
        return [r.flow for t in sorted(self._tables) for r in self._tables[t].rules
                if r.cookie == LEARNED_COOKIE]

    def _rules(self, table: int) -> list[_Rule]:
        found = self._tables.get(table)
        return found.rules if found is not None else []

    # -------------------------------------------------------- processing

    def process(self, packet: Packet) -> Result:
        """Run ``packet`` through the pipeline from table 0 (learning and tracking as it goes)."""
        run = _Run()
        run.result.log.append(f"packet: {_packet_text(packet)}")
        self._pass(run, _State.of(packet), 0, 0)
        while run.pending:
            state, table, level = run.pending.pop(0)
            run.recirc += 1
            run.result.log.append(f"recirculation {run.recirc}: "
                                  f"ct_state={ct_state_text(state.get('ct_state'))} "
                                  f"ct_zone={state.get('ct_zone')} -> table {table}")
            self._pass(run, state, table, level)
        return run.result

    def _pass(self, run: _Run, state: _State, table: int, level: int) -> None:
        run.resubmits = 0
        run.level = level
        try:
            self._visit(run, state, table, 0, 0)
        except _Abort as exc:
            run.note(f"processing stopped: {exc}")
        except RecursionError:
            run.note("processing stopped: recursion too deep")

    def _visit(self, run: _Run, state: _State, table: int, depth: int, back: int) -> None:
        hit = self._lookup(table, state.fields)
        self._record(run, table, hit, depth, state.get("ct_state"))
        if hit.rule is None:
            return
        for action in hit.rule.flow.actions:
            self._act(run, state, action, table, depth, back)
        if hit.rule.flow.goto is not None:
            run.count_resubmit()
            self._visit(run, state, hit.rule.flow.goto, depth, back)

    def _record(self, run: _Run, table: int, hit: _Hit, depth: int, ct: int) -> None:
        rule = hit.rule
        step = TraceStep(table, rule.priority if rule else None, rule.flow if rule else None,
                         rule.cookie if rule else None, depth, run.recirc, ct, hit.conj_id,
                         tuple(r.flow for r in hit.tied))
        run.result.trace.append(step)
        if rule is None:
            run.note(f"table {table}: miss", depth)
            return
        extra = f" (conj_id={hit.conj_id})" if hit.conj_id is not None else ""
        extra += f" (TIED with {len(hit.tied)} other flow(s))" if hit.tied else ""
        note = f"  # {rule.flow.note}" if rule.flow.note else ""
        run.note(f"table {table}: {flow_str(rule.flow)}{extra}{note}", depth)
        if rule.flow.meter is not None:
            run.note(f"meter:{rule.flow.meter}: rate limit not simulated", depth)

    # -------------------------------------------------------- lookup

    def _lookup(self, table: int, fields: Mapping[str, int]) -> _Hit:
        """classifier_lookup(): best ordinary flow, unless a conjunctive match beats it."""
        index = self._tables.get(table)
        if index is None:
            return _Hit(None)
        matching = index.matching(fields)
        hard = _best(r for r in matching if not r.soft)
        floor = hard.rule.priority if hard.rule is not None else -1
        soft = [r for r in matching if r.soft and r.priority > floor]
        for priority in sorted({r.priority for r in soft}, reverse=True):
            for conj_id in _satisfied(r for r in soft if r.priority == priority):
                with_id = {**fields, "conj_id": conj_id}
                found = _best(r for r in index.matching(with_id) if not r.soft)
                if found.rule is not None:
                    return _Hit(found.rule, found.tied, conj_id)
        return hard

    # -------------------------------------------------------- actions

    def _act(self, run: _Run, state: _State, action: object, table: int, depth: int,
             back: int) -> None:
        match action:
            case Output(port=port):
                self._output(run, state, port, depth)
            case OutputReg(reg=reg):
                self._output(run, state, state.get(reg) & 0xFFFF, depth)
            case SetReg(reg=reg, value=value):
                state.fields[reg] = value
            case SetField(field=name, value=value):
                spec = field_spec(name)
                state.write(Subfield(spec.name, 0, spec.width), _scalar(spec, value))
            case MoveField(src=src, dst=dst):
                state.write(parse_subfield(dst), state.read(parse_subfield(src)))
            case Load(value=value, dst=dst):
                state.write(parse_subfield(dst), value)
            case Resubmit(table=target):
                run.count_resubmit()
                deeper = back + 1 if target <= table else back
                if deeper > MAX_BACKWARD_DEPTH:
                    raise _Abort(f"more than {MAX_BACKWARD_DEPTH} nested resubmits")
                self._visit(run, state, target, depth + 1, deeper)
            case Ct():
                self._ct(run, state, action, depth)
            case Learn():
                self._learn(run, state, action, depth)
            case ToController():
                self._packet_in(run, state, depth)
            case _:
                raise FlowError(f"cannot execute {action!r}")

    def _output(self, run: _Run, state: _State, port: int | str, depth: int) -> None:
        in_port = state.get("in_port")
        if port == "IN_PORT":
            run.emit(in_port, state, depth)
        elif port == "CONTROLLER":
            self._packet_in(run, state, depth)
        elif port in ("ALL", "FLOOD"):
            if self.ports is None:
                run.note(f"output:{port} skipped: the switch was built without ports", depth)
            for number in sorted(self.ports or ()):
                if number != in_port:
                    run.emit(number, state, depth)
        else:
            number = RESERVED_PORTS[port] if isinstance(port, str) else port
            if number == in_port:
                run.note(f"output:{number} skipped: it is the packet's in_port", depth)
            elif not self._port_exists(number):
                run.note(f"output:{number} skipped: no such port", depth)
            else:
                run.emit(number, state, depth)

    def _packet_in(self, run: _Run, state: _State, depth: int) -> None:
        run.result.packet_ins.append(state.packet())
        run.note("packet-in to the controller", depth)

    def _port_exists(self, number: int) -> bool:
        if number in RESERVED_PORTS.values():
            return True
        return 0 < number <= MAX_PORT and (self.ports is None or number in self.ports)

    def _ct(self, run: _Run, state: _State, ct: Ct, depth: int) -> None:
        found = self.conntrack.track(ct.zone, state.fields, ct.commit, ct.mark, ct.label)
        marks = f" ct_mark={found.mark:#x} ct_label={found.label:#x}" if found.state else ""
        run.note(f"{action_str(ct)}: {ct_state_text(found.state)}{marks}", depth)
        if ct.table is not None:
            level = run.level + 1
            if level > MAX_RECIRC_DEPTH:
                run.note(f"ct(table={ct.table}) dropped: more than {MAX_RECIRC_DEPTH} "
                         "recirculations", depth)
            else:
                fork = state.copy()
                fork.fields.update(ct_state=found.state, ct_zone=ct.zone, ct_mark=found.mark,
                                   ct_label=found.label)
                run.pending.append((fork, ct.table, level))
        state.clear_ct()

    def _learn(self, run: _Run, state: _State, learn: Learn, depth: int) -> None:
        rule = compile_flow(_learned_flow(learn, state), LEARNED_COOKIE)
        others = [r for r in self._rules(rule.flow.table) if r.key != rule.key]
        self._tables[rule.flow.table] = _Table([*others, rule])
        run.note(f"learn: table {rule.flow.table}: {flow_str(rule.flow)}", depth)


# ---------------------------------------------------------------- learn


def _learn_value(src: str, dst: Subfield, state: _State) -> int:
    if _is_field_ref(src):
        return state.read(parse_subfield(src))
    return _scalar(FIELDS[dst.field], src)


def _learned_flow(learn: Learn, state: _State) -> Flow:
    """The flow ``learn`` writes for this packet (match, loads, outputs; LEARNED owner)."""
    match: dict[str, tuple[int, int]] = {}
    actions: list[object] = []
    for spec in learn.specs:
        if spec.kind == "output":
            actions.append(Output(state.read(parse_subfield(spec.src))))
            continue
        dst = parse_subfield(spec.dst)
        value = _learn_value(spec.src, dst, state)
        if spec.kind == "load":
            actions.append(Load(value, spec.dst))
            continue
        old_v, old_m = match.get(dst.field, (0, 0))
        match[dst.field] = ((old_v & ~dst.mask) | (value << dst.start), old_m | dst.mask)
    return Flow(
        table=learn.table,
        priority=learn.priority,
        match=tuple(sorted((n, _match_entry(n, v, m)) for n, (v, m) in match.items())),
        actions=cast(tuple[Action, ...], tuple(actions)),
        owner=Owner.LEARNED,
        idle_timeout=learn.idle_timeout,
    )


# ---------------------------------------------------------------- helpers


def _packet_text(packet: Packet) -> str:
    return " ".join(f"{name}={getattr(packet, name)}" for name in PACKET_FIELDS
                    if getattr(packet, name) is not None)


def deliveries(switch: Switch, packet: Packet) -> set[int]:
    """The ports ``packet`` leaves ``switch`` by (the switch learns and tracks as usual)."""
    return switch.process(packet).ports


def ties(result: Result) -> list[TraceStep]:
    """Steps where flows of equal priority both matched (undefined in OpenFlow)."""
    return [step for step in result.trace if step.tied]
