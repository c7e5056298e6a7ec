"""policy.yaml: tiers, externals, first-match rules and their tests. Parsing,
validation (file:line: reason) and the reference semantics.

`Policy.verdict()` is the direct evaluation of the rules; the compiled flows
(topology.policy_compile) must agree with it, which the property tests check
through the flow-table simulator.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import ipaddress
import re
import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from topology.openflow import IP_PROTOS
from topology.shadowing import first_covering
from topology.yamlpos import (
    LineIndex,
    capped,
    load_with_lines,
    read_config,
    validation_problems,
    yaml_problem,
)

Proto = Literal["tcp", "udp", "icmp"]
PROTO_NUMBERS = {name: IP_PROTOS[name] for name in ("icmp", "tcp", "udp")}  # the Proto names
BUILTIN_SETS = ("internet", "any")
MAX_RULES = 5000
MAX_SETS = 20_000  # tiers and externals together
MAX_CIDRS = 150_000  # CIDRs and addresses written in tiers, externals and rules
MAX_PORTS = 20_000  # ports and port ranges written in rules
MAX_TESTS = 1_000
MAX_RULE_FLOWS = 101_000  # flows the rules may compile to (the benchmarked 100k-flow policy)
MAX_NAME = 64
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")  # tiers, externals and rules
ALL = IPv4Network("0.0.0.0/0")


class PolicyError(Exception):
    """Problems in a policy file, each as file:line: reason."""

    def __init__(self, problems: list[str]) -> None:
        problems = capped(problems)
        super().__init__("\n".join(problems))
        self.problems = problems


# ------------------------------------------------------------------ raw schema


class _Strict(BaseModel):
    # strict: a number or a boolean where a string is expected (and the other way
    # round) is an error, not converted
    model_config = ConfigDict(extra="forbid", strict=True)


class RawSet(_Strict):
    cidrs: list[str] = Field(min_length=1)
    internal: bool = False
    description: str = ""


class RawExternal(_Strict):
    cidrs: list[str] = Field(min_length=1)
    description: str = ""


PortSpec = int | str


class RawRule(_Strict):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    from_: str | list[str] = Field(alias="from")
    to: str | list[str]
    tcp: list[PortSpec] | bool | None = None
    udp: list[PortSpec] | bool | None = None
    icmp: bool | None = None
    proto: Literal["any"] | None = None
    action: Literal["allow", "deny"] = "allow"
    log: bool = False
    description: str = ""


class RawPolicyBlock(_Strict):
    default: Literal["allow", "deny"] = "deny"
    log_default: bool = True
    rules: list[RawRule] = Field(default_factory=list)


class RawTest(_Strict):
    from_: str = Field(alias="from")
    to: str
    tcp: int | None = None
    udp: int | None = None
    icmp: bool | None = None
    expect: Literal["allow", "deny"]
    rule: str | None = None  # optionally: the rule expected to decide

    @field_validator("tcp", "udp")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 65535:
            raise ValueError(f"port {v} out of range 1-65535")
        return v


class RawPolicy(_Strict):
    tiers: dict[str, RawSet]
    externals: dict[str, RawExternal] = Field(default_factory=dict)
    policy: RawPolicyBlock = RawPolicyBlock()
    tests: list[RawTest] = Field(default_factory=list)


# ------------------------------------------------------------------ model


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int

    def __contains__(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    def covers(self, other: PortRange) -> bool:
        return self.lo <= other.lo and other.hi <= self.hi

    def blocks(self) -> list[tuple[int, int]]:
        """The range as the fewest aligned blocks (first port, size a power of two):
        what a flow can match with a value and a mask."""
        out = []
        lo, hi = self.lo, self.hi
        while lo <= hi:
            size = lo & -lo if lo else 1 << 16
            while size > hi - lo + 1:
                size >>= 1
            out.append((lo, size))
            lo += size
        return out

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class Service:
    """One protocol and its destination ports (empty = every port / no ports)."""

    proto: Proto
    ports: tuple[PortRange, ...] = ()

    def matches(self, proto: str, port: int | None) -> bool:
        if proto != self.proto:
            return False
        if not self.ports or proto == "icmp":
            return True
        return port is not None and any(port in r for r in self.ports)

    def covers(self, other: Service) -> bool:
        if self.proto != other.proto:
            return False
        if not self.ports:
            return True
        if not other.ports:
            return False
        return all(any(mine.covers(r) for mine in self.ports) for r in other.ports)

    def __str__(self) -> str:
        if not self.ports:
            return self.proto
        return f"{self.proto}/{','.join(str(p) for p in self.ports)}"


@dataclass(frozen=True)
class AddressSet:
    """A set of IPv4 addresses: the union of ``nets`` (collapsed)."""

    names: tuple[str, ...]
    nets: tuple[IPv4Network, ...]

    @property
    def is_any(self) -> bool:
        return self.nets == (ALL,)

    def __contains__(self, addr: IPv4Address) -> bool:
        return any(addr in n for n in self.nets)

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        # hashed often (compile cache keys, rules) and big: hash the nets once
        return hash((self.names, self.nets))

    @functools.cached_property
    def _intervals(self) -> tuple[tuple[int, int], ...]:
        return tuple(_span(n) for n in self.nets)

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [lo for lo, _ in self._intervals]

    def covers(self, other: AddressSet) -> bool:
        # the nets are collapsed, so sorted and disjoint: the one that could hold an
        # interval is the last one starting at or before it
        mine, starts = self._intervals, self._starts
        for a, b in other._intervals:
            k = bisect.bisect_right(starts, a) - 1
            if k < 0 or mine[k][1] < b:
                return False
        return True

    def __str__(self) -> str:
        return ",".join(self.names)


@dataclass(frozen=True)
class Rule:
    index: int  # position in the file, 0-based
    name: str
    src: AddressSet
    dst: AddressSet
    services: tuple[Service, ...]  # empty = any protocol
    action: Literal["allow", "deny"]
    log: bool
    line: int
    implicit: bool = False  # generated (internal tiers), not written in the file

    @property
    def rule_id(self) -> int:
        """Carried in reg2 and ct_label: 1.. for file rules; implicit rules above 60000."""
        return self.index + 1 if not self.implicit else 60000 + self.index

    def matches(self, src: IPv4Address, dst: IPv4Address, proto: str, port: int | None) -> bool:
        if src not in self.src or dst not in self.dst:
            return False
        return not self.services or any(s.matches(proto, port) for s in self.services)

    def covers(self, other: Rule) -> bool:
        if self.services:  # cheapest test first
            if not other.services:
                return False
            if not all(any(m.covers(s) for m in self.services) for s in other.services):
                return False
        return self.dst.covers(other.dst) and self.src.covers(other.src)


@dataclass(frozen=True)
class PolicyTest:
    src: IPv4Address
    dst: IPv4Address
    proto: str  # tcp | udp | icmp
    port: int | None
    expect: Literal["allow", "deny"]
    rule: str | None
    line: int

    def describe(self) -> str:
        what = f"{self.proto}/{self.port}" if self.port is not None else self.proto
        return f"{self.src} -> {self.dst} {what}"


@dataclass(frozen=True)
class Decision:
    verdict: Literal["allow", "deny"]
    rule: str  # rule name, or "default"
    rule_id: int  # 0 for the default


@dataclass(frozen=True)
class Policy:
    tiers: dict[str, AddressSet]
    internal: frozenset[str]
    externals: dict[str, AddressSet]
    rules: tuple[Rule, ...]  # implicit internal-tier rules first, then the file's
    default: Literal["allow", "deny"]
    log_default: bool
    tests: tuple[PolicyTest, ...] = ()
    source: str = field(default="<string>", compare=False)
    source_digest: str = field(default="", compare=False)  # sha256 of the file's text

    def verdict(self, src: IPv4Address | str, dst: IPv4Address | str, proto: str,
                port: int | None = None) -> Decision:
        """The reference semantics: first matching rule, else the default."""
        s, d = IPv4Address(str(src)), IPv4Address(str(dst))
        for rule in self.rules:
            if rule.matches(s, d, proto, port):
                return Decision(rule.action, rule.name, rule.rule_id)
        return Decision(self.default, "default", 0)

    def rule_by_id(self, rule_id: int) -> Rule | None:
        for rule in self.rules:
            if rule.rule_id == rule_id:
                return rule
        return None

    def tier_of(self, addr: IPv4Address | str) -> str | None:
        a = IPv4Address(str(addr))
        for name, s in self.tiers.items():
            if a in s:
                return name
        return None


# ------------------------------------------------------------------ building


def _complement(nets: Iterable[IPv4Network]) -> tuple[IPv4Network, ...]:
    """Every IPv4 address outside ``nets``, as few prefixes as possible: the gaps
    between the collapsed (sorted, disjoint) nets."""
    out: list[IPv4Network] = []
    start = 0  # first address not yet known to be inside or outside
    for net in _collapse(nets):
        first, last = _span(net)
        if first > start:
            out.extend(_prefixes(start, first - 1))
        start = last + 1
    if start <= _span(ALL)[1]:
        out.extend(_prefixes(start, _span(ALL)[1]))
    return tuple(out)


def _port_range(spec: PortSpec) -> PortRange:
    if isinstance(spec, bool):
        raise ValueError(f"{spec!r} is not a port")
    if isinstance(spec, int):
        lo = hi = spec
    else:
        text = spec.strip()
        if "-" in text:
            a, _, b = text.partition("-")
            if not (a.strip().isdigit() and b.strip().isdigit()):
                raise ValueError(f"{spec!r} is not a port or a range like 9000-9010")
            lo, hi = int(a), int(b)
        elif text.isdigit():
            lo = hi = int(text)
        else:
            raise ValueError(f"{spec!r} is not a port or a range like 9000-9010")
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise ValueError(f"port {spec!r} out of range 1-65535")
    if lo > hi:
        raise ValueError(f"port range {spec!r} is reversed")
    return PortRange(lo, hi)


@functools.lru_cache(maxsize=1 << 16)
def _literal_net(text: str) -> IPv4Network:
    """A literal CIDR of a rule (policies repeat them across rules; reloads re-read them)."""
    m = _CIDR_RE.fullmatch(text)
    if m is not None:  # the common spelling, read at twice ipaddress's speed
        a, b, c, d, plen = m.groups()
        addr = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
        bits = 32 if plen is None else int(plen)
        if not addr & ((1 << (32 - bits)) - 1):
            return IPv4Network((addr, bits))
    return IPv4Network(text, strict=True)  # anything else, and its error message


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CIDR_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[12]?[0-9]))?")


def _span(net: IPv4Network) -> tuple[int, int]:
    first = int(net.network_address)
    return first, first + (1 << (net.max_prefixlen - net.prefixlen)) - 1


def _collapse(nets: Iterable[IPv4Network]) -> list[IPv4Network]:
    """ipaddress.collapse_addresses, the same result in a fraction of its time (it tries
    a supernet of every net): merge the nets' ranges, then split each merged range
    into the fewest prefixes."""
    spans = sorted((*_span(n), k, n) for k, n in enumerate(nets))
    out: list[IPv4Network] = []
    lo = hi = -2
    alone: IPv4Network | None = None  # the merged range is exactly this net
    for first, last, _, net in spans:
        if first <= hi + 1:
            if last > hi:
                hi, alone = last, None
            continue
        if hi >= 0:
            out.extend((alone,) if alone is not None else _prefixes(lo, hi))
        lo, hi, alone = first, last, net
    if hi >= 0:
        out.extend((alone,) if alone is not None else _prefixes(lo, hi))
    return out


def _prefixes(first: int, last: int) -> Iterable[IPv4Network]:
    return ipaddress.summarize_address_range(IPv4Address(first), IPv4Address(last))


@functools.lru_cache(maxsize=1 << 14)
def _collapsed(nets: tuple[IPv4Network, ...]) -> tuple[IPv4Network, ...]:
    if len(nets) == 1:
        return nets
    return tuple(_collapse(nets))


class _SideCache:
    """A rule side already built, by what it was built from: its items, with the nets of
    the named sets among them. A reload of a file with mostly the same rules gets back
    the very AddressSet objects of the running policy, so comparing and hashing them
    (compile cache, shadowing check) is cheap. Keeps the sides of the last two parses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[Hashable, AddressSet] = {}
        self._previous: dict[Hashable, AddressSet] = {}

    def get(self, key: Hashable) -> AddressSet | None:
        with self._lock:
            found = self._current.get(key)
            if found is None:
                found = self._previous.get(key)
                if found is not None:
                    self._current[key] = found
            return found

    def put(self, key: Hashable, value: AddressSet) -> AddressSet:
        with self._lock:
            self._current[key] = value
            return value

    def next_parse(self) -> None:
        with self._lock:
            self._previous, self._current = self._current, {}

    def clear(self) -> None:
        with self._lock:
            self._previous, self._current = {}, {}


_SIDES = _SideCache()


def clear_caches() -> None:
    """Forget the rule sides of earlier parses (benchmarks time cold parses)."""
    _SIDES.clear()


def _flow_bound(rule: Rule) -> int:
    """At most this many flows for a rule: one per source, destination and port match
    and one for the conjunction (a product is only used when it is smaller)."""
    src = 0 if rule.src.is_any else len(rule.src.nets)
    dst = 0 if rule.dst.is_any else len(rule.dst.nets)
    services = sum(1 if not s.ports or s.proto == "icmp" else
                   sum(len(r.blocks()) for r in s.ports) for s in rule.services)
    return src + dst + services + 1


def _count_problems(data: dict[Any, Any], lines: LineIndex, path: str) -> list[str]:
    """The limits that bound the work of validating, building and checking, on the
    file's plain data before any of that: a list of 100k empty rules is 300k schema
    errors, each with its own memory."""

    def size(value: object) -> int:
        return len(value) if isinstance(value, (list, dict)) else 0

    def items(value: object) -> list[dict[Any, Any]]:
        """The mappings among a list's items or a mapping's values."""
        if isinstance(value, dict):
            value = list(value.values())
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    problems = []

    def err(loc: Sequence[Any], msg: str) -> None:
        problems.append(f"{path}:{lines.line(loc)}: {msg}")

    tiers, externals = items(data.get("tiers")), items(data.get("externals"))
    block = data.get("policy")
    rules = items(block.get("rules")) if isinstance(block, dict) else []
    tests = size(data.get("tests"))
    if size(data.get("tiers")) + size(data.get("externals")) > MAX_SETS:
        err(("tiers",), f"{size(data.get('tiers')) + size(data.get('externals'))} tiers and "
            f"externals: at most {MAX_SETS}")
    # each rule has its own priority, MAX_RULES of them; an internal tier is a rule
    count = size(block.get("rules")) if isinstance(block, dict) else 0
    internal = sum(1 for t in tiers if t.get("internal") is True)
    if count + internal > MAX_RULES:
        also = f" and {internal} internal tiers (a rule each)" if internal else ""
        err(("policy", "rules"), f"{count} rules{also}: at most {MAX_RULES}")
    if tests > MAX_TESTS:
        err(("tests",), f"{tests} tests: at most {MAX_TESTS}")
    cidrs = sum(size(s.get("cidrs")) for s in (*tiers, *externals))
    ports = 0
    for r in rules:
        cidrs += sum(1 if isinstance(r.get(k), str) else size(r.get(k)) for k in ("from", "to"))
        ports += size(r.get("tcp")) + size(r.get("udp"))
    if cidrs > MAX_CIDRS:
        err((), f"{cidrs} addresses, CIDRs and set names in tiers, externals and rules: at "
            f"most {MAX_CIDRS}")
    if ports > MAX_PORTS:
        err(("policy", "rules"), f"{ports} ports and port ranges in rules: at most {MAX_PORTS}")
    return problems


def _bad_name(name: str, kind: str) -> str:
    return (f"{kind} name {name[:MAX_NAME]!r}{'...' if len(name) > MAX_NAME else ''} is not "
            f"a name: 1-{MAX_NAME} letters, digits and _ . : - (not first: . : -)")


class _Builder:
    def __init__(self, raw: RawPolicy, root: yaml.Node | None, path: str) -> None:
        self.raw, self.root, self.path = raw, root, path
        self.lines = LineIndex(root)
        self.problems: list[str] = []

    def err(self, loc: Sequence[Any], msg: str) -> None:
        self.problems.append(f"{self.path}:{self.lines.line(loc)}: {msg}")

    def nets(self, loc: Sequence[Any], cidrs: list[str]) -> tuple[IPv4Network, ...]:
        out = []
        for i, c in enumerate(cidrs):
            try:
                out.append(_literal_net(c))
            except ValueError as exc:
                self.err((*loc, i), f"bad CIDR {c!r}: {exc}")
        return _collapsed(tuple(out))

    def build(self) -> Policy:
        _SIDES.next_parse()
        tiers: dict[str, AddressSet] = {}
        internal = set()
        names_seen: dict[str, str] = {}
        for name, t in self.raw.tiers.items():
            self._check_name(("tiers", name), name, "tier", names_seen)
            tiers[name] = AddressSet((name,), self.nets(("tiers", name, "cidrs"), t.cidrs))
            if t.internal:
                internal.add(name)
        externals: dict[str, AddressSet] = {}
        for name, e in self.raw.externals.items():
            self._check_name(("externals", name), name, "external", names_seen)
            externals[name] = AddressSet((name,), self.nets(("externals", name, "cidrs"), e.cidrs))
        self._check_tier_overlaps(tiers)
        all_tier_nets = [n for s in tiers.values() for n in s.nets]
        sets = {
            **tiers,
            **externals,
            "internet": AddressSet(("internet",), _complement(all_tier_nets)),
            "any": AddressSet(("any",), (ALL,)),
        }
        rules = self._implicit_rules(tiers, internal, sets["internet"])
        seen_names: set[str] = set()
        for i, r in enumerate(self.raw.policy.rules):
            loc = ("policy", "rules", i)
            if not NAME_RE.match(r.name):
                self.err((*loc, "name"), _bad_name(r.name, "rule"))
            elif r.name in seen_names:
                self.err((*loc, "name"), f"duplicate rule name {r.name!r}")
            elif r.name == "default" or r.name.startswith("internal:"):
                self.err((*loc, "name"), f"rule name {r.name!r} is reserved (the default and "
                         "the implicit internal-tier rules are named so)")
            seen_names.add(r.name)
            src = self._side((*loc, "from"), r.from_, sets)
            dst = self._side((*loc, "to"), r.to, sets)
            services = self._services(loc, r)
            if src is None or dst is None or services is None:
                continue
            rules.append(Rule(i, r.name, src, dst, services, r.action, r.log,
                              self.lines.line(loc)))
        self._check_flow_count(rules)
        self._check_shadowing(rules)
        tests = self._tests(sets)
        if self.problems:
            raise PolicyError(self.problems)
        return Policy(tiers, frozenset(internal), externals, tuple(rules),
                      self.raw.policy.default, self.raw.policy.log_default, tests, self.path)

    def _check_name(self, loc: Sequence[Any], name: str, kind: str, seen: dict[str, str]) -> None:
        if len(name) > MAX_NAME or not NAME_RE.match(name):
            self.err(loc, _bad_name(name, kind))
        elif name in BUILTIN_SETS:
            self.err(loc, f"{kind} name {name!r} is reserved (built in)")
        elif name in seen:
            self.err(loc, f"{kind} name {name!r} is already used by a {seen[name]}")
        seen[name] = kind

    def _check_tier_overlaps(self, tiers: dict[str, AddressSet]) -> None:
        # Two CIDRs are nested or disjoint. In order of first address (the wider first),
        # the nets still open at a net's first address are the ones holding it: a chain
        # of at most 33, so this is linear in the tiers' nets.
        names = list(tiers)
        spans = sorted((lo, -hi, k) for k, name in enumerate(names)
                       for lo, hi in tiers[name]._intervals)
        open_nets: list[tuple[int, int]] = []  # (last address, tier) holding the next one
        pairs: set[tuple[int, int]] = set()
        for lo, neg_hi, k in spans:
            while open_nets and open_nets[-1][0] < lo:
                open_nets.pop()
            pairs.update((min(j, k), max(j, k)) for _, j in open_nets if j != k)
            open_nets.append((-neg_hi, k))
        for a, b in sorted(pairs):
            self.err(("tiers", names[b]), f"tier {names[b]!r} overlaps tier {names[a]!r}: an "
                     "address must belong to one tier")

    def _implicit_rules(self, tiers: dict[str, AddressSet], internal: set[str],
                        internet: AddressSet) -> list[Rule]:
        rules = []
        for k, name in enumerate(sorted(internal)):
            rules.append(Rule(k, f"internal:{name}", tiers[name], internet, (), "deny", True,
                              self.lines.line(("tiers", name)), implicit=True))
        return rules

    def _side(self, loc: Sequence[Any], value: str | list[str],
              sets: dict[str, AddressSet]) -> AddressSet | None:
        items = [value] if isinstance(value, str) else value
        if not items:
            self.err(loc, "empty address list")
            return None
        key = tuple((item, sets[item].nets) if item in sets else (item, None) for item in items)
        cached = _SIDES.get(key)
        if cached is not None:
            return cached
        names, nets, ok = [], [], True
        for i, item in enumerate(items):
            item_loc = loc if isinstance(value, str) else (*loc, i)
            if item in sets:
                names.append(item)
                nets.extend(sets[item].nets)
                continue
            try:
                net = _literal_net(item)
            except ValueError:
                ok = False
                if any(ch.isdigit() for ch in item) and ("." in item or "/" in item):
                    self.err(item_loc, f"bad CIDR {item!r}")
                else:
                    self.err(item_loc, f"unknown tier or external {item!r}")
                continue
            names.append(str(net))
            nets.append(net)
        if not ok:
            return None
        return _SIDES.put(key, AddressSet(tuple(names), _collapsed(tuple(nets))))

    def _services(self, loc: Sequence[Any], r: RawRule) -> tuple[Service, ...] | None:
        out: list[Service] = []
        ok = True
        for proto in ("tcp", "udp"):
            spec = getattr(r, proto)
            if spec is None or spec is False:
                continue
            if spec is True:
                out.append(Service(proto))  # type: ignore[arg-type]
                continue
            if not spec:
                self.err((*loc, proto), f"empty {proto} port list (use {proto}: true for all)")
                ok = False
                continue
            ranges = []
            for i, p in enumerate(spec):
                try:
                    ranges.append(_port_range(p))
                except ValueError as exc:
                    self.err((*loc, proto, i), str(exc))
                    ok = False
            out.append(Service(proto, tuple(sorted(set(ranges), key=lambda x: (x.lo, x.hi)))))  # type: ignore[arg-type]
        if r.icmp:
            out.append(Service("icmp"))
        if r.proto == "any" and out:
            self.err((*loc, "proto"), "proto: any together with tcp/udp/icmp")
            ok = False
        return tuple(out) if ok else None

    def _check_flow_count(self, rules: list[Rule]) -> None:
        """A small file can compile to millions of flows (every internal tier's rule
        has a flow per CIDR of `internet`, which scattered tiers fragment): refused
        before compiling, by an upper bound of what the compiler makes of each rule."""
        counts = [_flow_bound(r) for r in rules]
        total = sum(counts)
        if total <= MAX_RULE_FLOWS:
            return
        implicit = sum(c for c, r in zip(counts, rules, strict=True) if r.implicit)
        where: tuple[str, ...] = ("tiers",) if 2 * implicit > total else ("policy", "rules")
        also = (f" ({implicit} of them for the internal tiers: one flow per CIDR of "
                "'internet' each)" if implicit else "")
        self.err(where, f"the rules compile to up to {total} flows{also}: at most "
                 f"{MAX_RULE_FLOWS}")

    def _check_shadowing(self, rules: list[Rule]) -> None:
        for later, earlier in zip(rules, first_covering(rules), strict=True):
            if earlier is None:
                continue
            why = (f"tier {earlier.name.split(':', 1)[1]!r} is internal and may not "
                   "reach outside addresses"
                   if earlier.implicit else f"rule {earlier.name!r} (line {earlier.line}) "
                   "already decides every packet it covers")
            self.problems.append(
                f"{self.path}:{later.line}: rule {later.name!r} can never match: {why}"
            )

    def _tests(self, sets: dict[str, AddressSet]) -> tuple[PolicyTest, ...]:
        out = []
        for i, t in enumerate(self.raw.tests):
            loc = ("tests", i)
            addrs = []
            for key, value in (("from", t.from_), ("to", t.to)):
                try:
                    addrs.append(IPv4Address(value))
                except ValueError:
                    self.err((*loc, key), f"test address {value!r} is not an IPv4 address")
            protos = [p for p in ("tcp", "udp") if getattr(t, p) is not None]
            if t.icmp:
                protos.append("icmp")
            if len(protos) != 1:
                self.err(loc, "a test names exactly one of tcp: PORT, udp: PORT, icmp: true")
                continue
            if len(addrs) != 2:
                continue
            proto = protos[0]
            port = None if proto == "icmp" else getattr(t, proto)
            out.append(PolicyTest(addrs[0], addrs[1], proto, port, t.expect, t.rule,
                                  self.lines.line(loc)))
        rule_names = {r.name for r in self.raw.policy.rules} | {"default"}
        rule_names |= {f"internal:{n}" for n, t in self.raw.tiers.items() if t.internal}
        for t in out:
            if t.rule is not None and t.rule not in rule_names:
                self.problems.append(f"{self.path}:{t.line}: test names unknown rule {t.rule!r}")
        return tuple(out)


def parse_policy(text: str, path: str = "<string>") -> Policy:
    try:
        root, data = load_with_lines(text)
    except yaml.YAMLError as exc:
        raise PolicyError([yaml_problem(path, exc)]) from None
    if not isinstance(data, dict):
        raise PolicyError([f"{path}:1: expected a mapping with tiers, policy and tests"])
    if "bridges" in data and "tiers" not in data:
        raise PolicyError([f"{path}:1: this looks like a host.yaml: use socknet validate "
                           f"-c {path}"])
    too_many = _count_problems(data, LineIndex(root), path)
    if too_many:
        raise PolicyError(too_many)
    try:
        raw = RawPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(validation_problems(path, root, exc,
                                              {"from_": "from"})) from None
    policy = _Builder(raw, root, path).build()
    return dataclasses.replace(policy, source_digest=hashlib.sha256(text.encode()).hexdigest())


def load_policy(path: str | Path) -> Policy:
    try:
        text = read_config(path)
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([yaml_problem(str(path), exc)]) from None
    return parse_policy(text, str(path))
