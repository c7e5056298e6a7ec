"""Flows as plain, hashable values.

A `Flow` is everything the controller will ever install: table, priority, match,
actions, optional goto, timeouts and the owner. Its cookie is derived from its
content, so two flows are the same flow exactly when their cookies are equal and
reconciliation becomes a set difference of cookies (see controller/reconcile.py).

Match field names follow os-ken's OXM names (``in_port``, ``eth_dst``,
``ipv4_src``, ``reg0``, ``ct_state`` ...); `topology.render` turns them into
``ovs-ofctl`` syntax and `controller.encode` into os-ken messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

COOKIE_MAGIC = 0x5C  # top byte of every socknet cookie: "this flow is ours"
COOKIE_MAGIC_SHIFT = 56
COOKIE_OWNER_SHIFT = 48
COOKIE_HASH_MASK = (1 << COOKIE_OWNER_SHIFT) - 1
COOKIE_OWNER_MASK = 0xFF << COOKIE_OWNER_SHIFT
COOKIE_MAGIC_MASK = 0xFF << COOKIE_MAGIC_SHIFT
ALL_ONES64 = (1 << 64) - 1


class Owner(IntEnum):
    """Who computed a flow. Encoded in bits 48..55 of the cookie."""

    PIPELINE = 1  # static skeleton: table defaults, kill switch
    PORTS = 2  # per-port flows derived from discovered ports
    POLICY = 3  # tier policy (reserved stage)
    LEARNED = 4  # written by OVS `learn` actions, never reconciled away
    DISCOVERED = 5  # from what the controller learned at run time (remote hosts, addresses)


def owner_cookie_prefix(owner: Owner) -> int:
    return (COOKIE_MAGIC << COOKIE_MAGIC_SHIFT) | (int(owner) << COOKIE_OWNER_SHIFT)


_OWNER_PREFIX = {o: owner_cookie_prefix(o) for o in Owner}
LEARNED_COOKIE = owner_cookie_prefix(Owner.LEARNED)
OWNED_COOKIE_MASK = COOKIE_MAGIC_MASK | COOKIE_OWNER_MASK


def cookie_owner(cookie: int) -> Owner | None:
    """The owner encoded in a cookie, or None for a flow socknet did not write."""
    if (cookie >> COOKIE_MAGIC_SHIFT) != COOKIE_MAGIC:
        return None
    try:
        return Owner((cookie >> COOKIE_OWNER_SHIFT) & 0xFF)
    except ValueError:
        return None


# ---------------------------------------------------------------- match values

MatchValue = int | str | tuple[int, int] | tuple[str, str]

CT_STATE_BITS = {
    "new": 0x01,
    "est": 0x02,
    "rel": 0x04,
    "rpl": 0x08,
    "inv": 0x10,
    "trk": 0x20,
}


def ct_state(spec: str) -> tuple[int, int]:
    """``"+trk+est-rpl"`` -> (value, mask) as OVS encodes ct_state."""
    value = mask = 0
    for token in spec.replace("+", " +").replace("-", " -").split():
        sign, name = token[0], token[1:]
        if sign not in "+-" or name not in CT_STATE_BITS:
            raise ValueError(f"bad ct_state flag {token!r} in {spec!r}")
        bit = CT_STATE_BITS[name]
        mask |= bit
        if sign == "+":
            value |= bit
    return value, mask


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Output:
    """Send to an OpenFlow port number (or a reserved port name: IN_PORT, LOCAL)."""

    port: int | str


@dataclass(frozen=True)
class OutputReg:
    """Send to the port number held in ``reg`` bits [0..15] (set by a learned flow)."""

    reg: str  # "reg1"


@dataclass(frozen=True)
class SetReg:
    """Load an immediate value into a whole 32-bit register."""

    reg: str
    value: int


@dataclass(frozen=True)
class SetField:
    """set_field on a packet header (eth_src, arp_op, ...)."""

    field: str
    value: int | str


@dataclass(frozen=True)
class MoveField:
    """Copy bits between fields, NXM names with ranges: "NXM_OF_ETH_SRC[]" -> "NXM_OF_ETH_DST[]"."""

    src: str
    dst: str


@dataclass(frozen=True)
class Resubmit:
    table: int


@dataclass(frozen=True)
class Ct:
    """Send through conntrack. ``table`` recirculates; ``commit`` records the connection.

    With ``commit``, ``mark`` (value, mask) and ``label`` (low 32 bits) are written into
    the connection (ct(commit, exec(set_field:...->ct_mark, ...->ct_label))).
    """

    zone: int
    commit: bool = False
    table: int | None = None
    mark: tuple[int, int] | None = None
    label: int | None = None


@dataclass(frozen=True)
class Conjunction:
    """One clause of a conjunctive match: conjunction(id, clause/n_clauses)."""

    id: int
    clause: int  # 1-based
    n_clauses: int


@dataclass(frozen=True)
class ToController:
    """Send (the first ``max_len`` bytes of) the packet to the controller.

    With ``meter``, only this copy is rate-limited by that meter (OVS
    controller(meter_id=N)); the rest of the actions run for every packet.
    """

    max_len: int = 128
    meter: int | None = None


@dataclass(frozen=True)
class LearnSpec:
    """One part of a `learn` action, in NXM terms (as ovs-ofctl writes them).

    kind "match":  the learned flow matches ``dst`` == this packet's ``src``
                   (``src`` may be an immediate value such as "0x800")
    kind "load":   the learned flow loads this packet's ``src`` into ``dst``
    kind "output": the learned flow outputs to the port in this packet's ``src``
    Fields are NXM names with an optional bit range: "NXM_OF_IN_PORT[]",
    "NXM_NX_REG1[0..15]".
    """

    kind: str
    src: str
    dst: str = ""


@dataclass(frozen=True)
class Learn:
    """OVS `learn`: write a flow into ``table`` from fields of the current packet.

    Learned flows carry the LEARNED owner's cookie; reconciliation leaves them
    alone and port removal deletes the ones that point at the removed port.
    """

    table: int
    priority: int
    idle_timeout: int
    specs: tuple[LearnSpec, ...]


def learn_mac_to_port(table: int, priority: int, idle_timeout: int,
                      into_reg: str | None = None) -> Learn:
    """Remember eth_dst=<this eth_src> -> this in_port (as output, or loaded into a register)."""
    last = (
        LearnSpec("output", "NXM_OF_IN_PORT[]")
        if into_reg is None
        else LearnSpec("load", "NXM_OF_IN_PORT[]", f"NXM_NX_{into_reg.upper()}[0..15]")
    )
    return Learn(table, priority, idle_timeout,
                 (LearnSpec("match", "NXM_OF_ETH_SRC[]", "NXM_OF_ETH_DST[]"), last))


Action = (
    Output | OutputReg | SetReg | SetField | MoveField | Resubmit | Ct | Learn | Conjunction
    | ToController
)


# ---------------------------------------------------------------- flows

_T = TypeVar("_T")


class computed_once(Generic[_T]):  # noqa: N801 (used like functools.cached_property)
    """`functools.cached_property` without its lock: before Python 3.12 that takes a
    class-wide RLock on every first access, which cost more than a cookie's hash itself
    when 100k flows are new. The value lands in the instance's ``__dict__`` under the
    same name, so later reads never get here. Flows are immutable: two threads racing
    compute the same value."""

    def __init__(self, fn: Callable[[Any], _T]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> _T:
        if obj is None:
            return self  # type: ignore[return-value]
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True)
class Flow:
    """One OpenFlow flow entry. ``actions == ()`` and ``goto is None`` means drop."""

    table: int
    priority: int
    match: tuple[tuple[str, MatchValue], ...]
    actions: tuple[Action, ...] = ()
    goto: int | None = None
    owner: Owner = Owner.PIPELINE
    idle_timeout: int = 0
    hard_timeout: int = 0
    meter: int | None = None  # OpenFlow meter instruction (rate limit), e.g. for logging
    note: str = field(default="", compare=False)  # human hint for `socknet flows`, not sent

    @computed_once
    def cookie(self) -> int:
        """Owner and content hash; computed once per Flow (reconciles ask often)."""
        return _OWNER_PREFIX[self.owner] | content_hash(self)

    def __hash__(self) -> int:
        return self._hash

    @computed_once
    def _hash(self) -> int:
        """The dataclass hash (the compared fields), computed once: flows live in sets and
        cache keys by the ten thousand, and a large policy's flows outlive many reloads."""
        return hash((self.table, self.priority, self.match, self.actions, self.goto,
                     self.owner, self.idle_timeout, self.hard_timeout, self.meter))

    @property
    def match_dict(self) -> dict[str, MatchValue]:
        return dict(self.match)

    @property
    def is_drop(self) -> bool:
        return not self.actions and self.goto is None


def content_hash(flow: Flow) -> int:
    """48 stable bits over everything that defines the flow on the switch."""
    key = repr(
        (
            flow.table,
            flow.priority,
            flow.match,
            flow.actions,
            flow.goto,
            flow.idle_timeout,
            flow.hard_timeout,
            flow.meter,
        )
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & COOKIE_HASH_MASK


def flow(
    table: int,
    priority: int,
    *,
    actions: tuple[Action, ...] | list[Action] = (),
    goto: int | None = None,
    owner: Owner = Owner.PIPELINE,
    meter: int | None = None,
    note: str = "",
    **match: MatchValue,
) -> Flow:
    """Build a Flow with its match given as keyword arguments (sorted, so hashing is stable)."""
    return Flow(
        table=table,
        priority=priority,
        match=tuple(sorted(match.items())),
        actions=tuple(actions),
        goto=goto,
        owner=owner,
        meter=meter,
        note=note,
    )
