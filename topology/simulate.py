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
  and so does the simulator; a non-IPv4 packet that reaches ct is left
  untracked (ct_state 0): IPv6 connection tracking is not modelled yet.
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
would refuse or what makes the outcome depend on installation order: every
value of the match (`topology.openflow.match_value`: masks on fields that
cannot be masked, value bits outside the mask), then the one whole-flow check
the encoder also runs (`topology.flowcheck.check_flow`: unknown fields, missing
prerequisites, goto_table backwards, `ct` without an IPv4/IPv6 match,
conjunctions with other actions, learn specs that do not fit ...), and across
flows: conjunctions whose flows disagree on the number of clauses, and two
different flows with the same table, priority and match (OVS keeps only the
one installed last). Fields, their widths and prerequisites come from
`topology.openflow.FIELDS`; a `Packet` carries one attribute per header field
the simulator models (IPv4, ARP, TCP/UDP/ICMP, IPv6, ICMPv6 and neighbour
discovery).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from topology.flowcheck import ConjClause, check_flow, conjunction
from topology.model import (
    CT_STATE_BITS,
    LEARNED_COOKIE,
    Action,
    Ct,
    Flow,
    Learn,
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
from topology.openflow import (
    CT_FIELDS,
    CT_LABEL_MASK,
    ETH_ARP,
    ETH_IPV4,
    ETH_IPV6,
    FIELDS,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IP_PROTOS,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    FlowError,
    Subfield,
    Values,
    format_value,
    is_immediate,
    match_entry,
    match_value,
    need_prereqs,
    parse_subfield,
    to_int,
)
from topology.render import action_text, match_text

# ---------------------------------------------------------------- constants

BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"

# OpenFlow 1.1+ number of the LOCAL port (the bridge's own interface).
OFPP_LOCAL = 0xFFFFFFFE
RESERVED_PORTS = {"LOCAL": OFPP_LOCAL}
MAX_PORT = 0xFEFF  # OVS assigns ports 1..0xfeff (ovs-fields(7), in_port)

MAX_BACKWARD_DEPTH = 64  # nested resubmits to the same or an earlier table
MAX_RESUBMITS = 4096  # resubmits + gotos in one pass
MAX_RECIRC_DEPTH = 6  # ct(table=...) re-injections in a row (dpif-netdev's limit)

TRK = CT_STATE_BITS["trk"]
NEW = CT_STATE_BITS["new"]
EST = CT_STATE_BITS["est"]
RPL = CT_STATE_BITS["rpl"]
INV = CT_STATE_BITS["inv"]

_ICMP_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
_ICMP_REQUESTS = frozenset({8, 13, 15, 17})
_ICMPV6_PAIRS = {ICMPV6_ECHO_REQUEST: ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REPLY: ICMPV6_ECHO_REQUEST}


class _Abort(Exception):
    """Ends the current pass (recursion too deep, too many resubmits)."""


# ---------------------------------------------------------------- packets


@dataclass(frozen=True)
class Packet:
    """Header fields of one packet, by model name (`topology.openflow.FIELDS`). None: the
    packet has no such header.

    MAC and IP addresses are text ("02:00:00:00:01:00", "10.0.0.1", "fd00::1"), kept
    in canonical form (lower case, IPv6 compressed). An IPv6 frame without ipv6_src
    is one whose headers the simulator does not read (ethernet()'s default).
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
    ipv6_src: str | None = None
    ipv6_dst: str | None = None
    ipv6_label: int | None = None
    icmpv6_type: int | None = None
    icmpv6_code: int | None = None
    ipv6_nd_target: str | None = None
    ipv6_nd_sll: str | None = None
    ipv6_nd_tll: str | None = None

    def __post_init__(self) -> None:
        for name in PACKET_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            canonical = format_value(name, to_int(FIELDS[name], value))
            if canonical != value:
                object.__setattr__(self, name, canonical)

    def headers(self) -> dict[str, int]:
        """The fields the packet carries, as integers."""
        return {
            name: to_int(FIELDS[name], value)
            for name in PACKET_FIELDS
            if (value := getattr(self, name)) is not None
        }

    def reply(self, in_port: int, *, src_mac: str | None = None) -> Packet:
        """The answer to this packet, entering at ``in_port``: addresses and ports swapped.

        ``src_mac`` replaces the swapped Ethernet source (e.g. a router's MAC);
        ICMP and ICMPv6 echo requests become echo replies.
        """
        changes: dict[str, Any] = {"in_port": in_port, "eth_dst": self.eth_src,
                                   "eth_src": src_mac or self.eth_dst}
        for a, b in (("ipv4_src", "ipv4_dst"), ("ipv6_src", "ipv6_dst"), ("tcp_src", "tcp_dst"),
                     ("udp_src", "udp_dst")):
            changes[a], changes[b] = getattr(self, b), getattr(self, a)
        if self.icmpv4_type is not None:
            changes["icmpv4_type"] = _ICMP_PAIRS.get(self.icmpv4_type, self.icmpv4_type)
        if self.icmpv6_type is not None:
            changes["icmpv6_type"] = _ICMPV6_PAIRS.get(self.icmpv6_type, self.icmpv6_type)
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


def ipv6(in_port: int, src_mac: str, dst_mac: str, src_ip: str, dst_ip: str,
         proto: Literal["tcp", "udp", "icmpv6"] = "tcp", sport: int = 49152, dport: int = 80,
         *, icmp_type: int = ICMPV6_ECHO_REQUEST, icmp_code: int = 0, label: int = 0) -> Packet:
    """An IPv6 packet; TCP/UDP use ``sport``/``dport``, ICMPv6 ``icmp_type``/``icmp_code``."""
    l4: dict[str, int] = {}
    if proto == "icmpv6":
        l4 = {"icmpv6_type": icmp_type, "icmpv6_code": icmp_code}
    elif proto in ("tcp", "udp"):
        l4 = {f"{proto}_src": sport, f"{proto}_dst": dport}
    else:
        raise ValueError(f"unknown protocol {proto!r}")
    return Packet(in_port=in_port, eth_src=src_mac, eth_dst=dst_mac, eth_type=ETH_IPV6,
                  ipv6_src=src_ip, ipv6_dst=dst_ip, ipv6_label=label, ip_proto=IP_PROTOS[proto],
                  **l4)


def neighbor_solicit(in_port: int, src_mac: str, src_ip: str, target_ip: str,
                     *, sll: str | None = None) -> Packet:
    """ICMPv6 NS for ``target_ip`` to its solicited-node multicast group, with a source
    link-layer address option (``sll``, default the sender's MAC; "" for none, as in
    duplicate address detection from ::)."""
    target = ipaddress.IPv6Address(target_ip)
    group = ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0"))
                                  | (int(target) & 0xFFFFFF))
    group_mac = "33:33:" + ":".join(f"{b:02x}" for b in group.packed[-4:])
    return Packet(in_port=in_port, eth_src=src_mac, eth_dst=group_mac, eth_type=ETH_IPV6,
                  ipv6_src=src_ip, ipv6_dst=str(group), ipv6_label=0,
                  ip_proto=IP_PROTOS["icmpv6"], icmpv6_type=ND_NEIGHBOR_SOLICIT, icmpv6_code=0,
                  ipv6_nd_target=target_ip, ipv6_nd_sll=(src_mac if sll is None else sll) or None)


def neighbor_advert(in_port: int, src_mac: str, src_ip: str, dst_mac: str, dst_ip: str,
                    *, target_ip: str | None = None, tll: str | None = None) -> Packet:
    """ICMPv6 NA: ``target_ip`` (default ``src_ip``) is at ``tll`` (default the sender's
    MAC; "" for no target link-layer address option)."""
    return Packet(in_port=in_port, eth_src=src_mac, eth_dst=dst_mac, eth_type=ETH_IPV6,
                  ipv6_src=src_ip, ipv6_dst=dst_ip, ipv6_label=0, ip_proto=IP_PROTOS["icmpv6"],
                  icmpv6_type=ND_NEIGHBOR_ADVERT, icmpv6_code=0,
                  ipv6_nd_target=target_ip or src_ip,
                  ipv6_nd_tll=(src_mac if tll is None else tll) or None)


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
        conj = conjunction(action)
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


# ---------------------------------------------------------------- flow checks

NormMatch = tuple[tuple[str, int, int], ...]


def normalize_match(flow: Flow) -> NormMatch:
    """(field, value, mask) per matched field, by model name, sorted; every value checked
    (`topology.openflow.match_value`)."""
    out: dict[str, tuple[int, int]] = {}
    for name, value in flow.match:
        if name in out:
            raise FlowError(f"{name} matched twice in {flow_str(flow)}")
        out[name] = match_value(name, value)
    return tuple(sorted((name, v, m) for name, (v, m) in out.items()))


def _check_load(action: object, values: Values) -> None:
    """The learned flows' `Load` (the model has no partial load): what OVS checks of
    ``load:value->dst``; anything else is an action the simulator does not know."""
    if not isinstance(action, Load):
        raise FlowError(f"the simulator does not know action {action!r}")
    sub = parse_subfield(action.dst)
    if not sub.spec.writable:
        raise FlowError(f"{sub.field} is read-only")
    need_prereqs(sub.field, values)
    if action.value >> sub.nbits:
        raise FlowError(f"{action.value:#x} does not fit {action.dst}")


@dataclass(frozen=True)
class _Rule:
    """A checked flow as the switch holds it."""

    flow: Flow
    given_cookie: int | None  # None: the flow's own (computed when first asked)
    match: NormMatch
    conjunctions: tuple[ConjClause, ...]

    @property
    def cookie(self) -> int:
        return self.flow.cookie if self.given_cookie is None else self.given_cookie

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


_COMPILED_MAX = 1 << 18
_compiled: dict[Flow, _Rule] = {}


def compile_flow(flow: Flow, cookie: int | None = None) -> _Rule:
    """Check one flow as OVS would on flow-mod (`topology.flowcheck.check_flow`, on every
    value of its match) and prepare it for lookups. Flows are immutable: the result for
    a flow with its own cookie is kept (a policy reload that builds a simulator again
    mostly finds the same flows)."""
    if cookie is None:
        rule = _compiled.get(flow)
        if rule is not None and rule.flow is flow:
            return rule
    try:
        norm = normalize_match(flow)
        conjunctions = check_flow(flow, {name: (v, m) for name, v, m in norm}, _check_load)
    except FlowError as exc:  # the flow's text only now: writing it for every flow is slow
        raise FlowError(f"table {flow.table}: {flow_str(flow)}: {exc}") from None
    rule = _Rule(flow, cookie, norm, conjunctions)
    if cookie is None:
        if len(_compiled) >= _COMPILED_MAX:
            _compiled.clear()
        _compiled[flow] = rule
    return rule


def clear_compiled() -> None:
    """Forget the checked flows kept by `compile_flow` (benchmarks time cold checks)."""
    _compiled.clear()


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
            self.label = (self.label & ~CT_LABEL_MASK) | (label & CT_LABEL_MASK)


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
        for name in CT_FIELDS:
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
    """One flow table, as a tuple space (as OVS's classifier): rules grouped by the
    fields and masks they match, each group a dict from the masked values. A lookup
    costs a dict lookup per group, not a test per rule (a policy's tests run on 100k
    flows), and a learned flow goes into its group without rebuilding the table. Lookup
    order: priority, then cookie, then the order the rules came in."""

    def __init__(self, rules: Iterable[_Rule]) -> None:
        self._spaces: dict[tuple[tuple[str, int], ...],
                           dict[tuple[int, ...], list[tuple[int, _Rule]]]] = {}
        self._by_key: dict[tuple[int, int, NormMatch], tuple[int, _Rule]] = {}
        self._count = 0
        for rule in rules:
            self.add(rule)

    def _group(self, rule: _Rule) -> list[tuple[int, _Rule]]:
        shape = tuple((name, mask) for name, _, mask in rule.match)
        values = tuple(value for _, value, _ in rule.match)
        return self._spaces.setdefault(shape, {}).setdefault(values, [])

    def add(self, rule: _Rule) -> None:
        """Add ``rule``; one with the same priority and match is replaced (as in OVS)."""
        old = self._by_key.pop(rule.key, None)
        if old is not None:
            self._group(old[1]).remove(old)
        entry = (self._count, rule)
        self._count += 1
        self._by_key[rule.key] = entry
        self._group(rule).append(entry)

    @property
    def rules(self) -> list[_Rule]:
        """Every rule, in lookup order."""
        return [r for _, r in sorted(self._by_key.values(), key=_lookup_order)]

    def matching(self, fields: Mapping[str, int]) -> list[_Rule]:
        """The rules that match ``fields``, in lookup order."""
        found: list[tuple[int, _Rule]] = []
        for shape, space in self._spaces.items():
            hit = space.get(tuple(fields.get(name, 0) & mask for name, mask in shape))
            if hit:
                found.extend(hit)
        found.sort(key=_lookup_order)
        return [r for _, r in found]


def _lookup_order(entry: tuple[int, _Rule]) -> tuple[int, int, int]:
    priority, cookie = entry[1].order
    return priority, cookie, entry[0]


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
                spec = FIELDS[name]
                state.write(Subfield(spec.name, 0, spec.width), to_int(spec, value))
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
        self._tables.setdefault(rule.flow.table, _Table(())).add(rule)
        run.note(f"learn: table {rule.flow.table}: {flow_str(rule.flow)}", depth)


# ---------------------------------------------------------------- learn


def _learn_value(src: str, state: _State) -> int:
    if is_immediate(src):
        return int(src, 0)
    return state.read(parse_subfield(src))


def _learned_flow(learn: Learn, state: _State) -> Flow:
    """The flow ``learn`` writes for this packet (match, loads, outputs; LEARNED owner)."""
    match: dict[str, tuple[int, int]] = {}
    actions: list[object] = []
    for spec in learn.specs:
        if spec.kind == "output":
            actions.append(Output(state.read(parse_subfield(spec.src))))
            continue
        dst = parse_subfield(spec.dst)
        value = _learn_value(spec.src, state)
        if spec.kind == "load":
            actions.append(Load(value, spec.dst))
            continue
        old_v, old_m = match.get(dst.field, (0, 0))
        match[dst.field] = ((old_v & ~dst.mask) | (value << dst.start), old_m | dst.mask)
    return Flow(
        table=learn.table,
        priority=learn.priority,
        match=tuple(sorted((n, match_entry(n, v, m)) for n, (v, m) in match.items())),
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
