"""policy.yaml: tiers, externals, first-match rules and their tests. Parsing,
validation (file:line: reason) and the reference semantics.

`Policy.verdict()` is the direct evaluation of the rules; the compiled flows
(topology.policy_compile) must agree with it, which the property tests check
through the flow-table simulator.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from topology.openflow import IP_PROTOS
from topology.yamlpos import line_of, load_with_lines, validation_problems, yaml_problem

Proto = Literal["tcp", "udp", "icmp"]
PROTO_NUMBERS = {name: IP_PROTOS[name] for name in ("icmp", "tcp", "udp")}  # the Proto names
BUILTIN_SETS = ("internet", "any")
MAX_RULES = 5000
ALL = IPv4Network("0.0.0.0/0")


class PolicyError(Exception):
    """Problems in a policy file, each as file:line: reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ------------------------------------------------------------------ raw schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RawSet(_Strict):
    cidrs: list[str] = Field(min_length=1)
    internal: bool = False
    description: str = ""


class RawExternal(_Strict):
    cidrs: list[str] = Field(min_length=1)
    description: str = ""


PortSpec = int | str


class RawRule(_Strict):
    name: str = Field(min_length=1, max_length=64)
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
        return tuple((int(n.network_address), int(n.broadcast_address)) for n in self.nets)

    def covers(self, other: AddressSet) -> bool:
        mine = self._intervals
        return all(any(lo <= a and b <= hi for lo, hi in mine) for a, b in other._intervals)

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
    """Every IPv4 address outside ``nets``, as few prefixes as possible."""
    remaining = [ALL]
    for net in ipaddress.collapse_addresses(nets):
        nxt: list[IPv4Network] = []
        for r in remaining:
            if net.subnet_of(r):
                nxt.extend(r.address_exclude(net))
            elif not r.subnet_of(net):
                nxt.append(r)
        remaining = nxt
    return tuple(ipaddress.collapse_addresses(remaining))


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
    return IPv4Network(text, strict=True)


@functools.lru_cache(maxsize=1 << 14)
def _collapsed(nets: tuple[IPv4Network, ...]) -> tuple[IPv4Network, ...]:
    if len(nets) == 1:
        return nets
    return tuple(ipaddress.collapse_addresses(nets))


def _span(rule: Rule) -> tuple[int, int, int, int, frozenset[str] | None]:
    """Bounding box of a rule: source and destination address ranges and protocols
    (None = any protocol). covers() can only hold if the boxes nest."""
    empty = ((1 << 32, -1),)  # an empty set: inside every box
    src, dst = rule.src._intervals or empty, rule.dst._intervals or empty
    protos = frozenset(s.proto for s in rule.services) if rule.services else None
    return (src[0][0], src[-1][1], dst[0][0], dst[-1][1],
            protos if protos is not None else _ANY_PROTO)


_ANY_PROTO = frozenset(("tcp", "udp", "icmp", "*"))


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


class _Builder:
    def __init__(self, raw: RawPolicy, root: yaml.Node | None, path: str) -> None:
        self.raw, self.root, self.path = raw, root, path
        self.problems: list[str] = []

    def err(self, loc: Sequence[Any], msg: str) -> None:
        self.problems.append(f"{self.path}:{line_of(self.root, loc)}: {msg}")

    def nets(self, loc: Sequence[Any], cidrs: list[str]) -> tuple[IPv4Network, ...]:
        out = []
        for i, c in enumerate(cidrs):
            try:
                out.append(IPv4Network(str(c), strict=True))
            except ValueError as exc:
                self.err((*loc, i), f"bad CIDR {c!r}: {exc}")
        return tuple(ipaddress.collapse_addresses(out))

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
        if len(self.raw.policy.rules) > MAX_RULES:
            count = len(self.raw.policy.rules)
            self.err(("policy", "rules"), f"{count} rules: at most {MAX_RULES}")
        for i, r in enumerate(self.raw.policy.rules):
            loc = ("policy", "rules", i)
            if r.name in seen_names:
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
                              line_of(self.root, loc)))
        self._check_shadowing(rules)
        tests = self._tests(sets)
        if self.problems:
            raise PolicyError(self.problems)
        return Policy(tiers, frozenset(internal), externals, tuple(rules),
                      self.raw.policy.default, self.raw.policy.log_default, tests, self.path)

    def _check_name(self, loc: Sequence[Any], name: str, kind: str, seen: dict[str, str]) -> None:
        if name in BUILTIN_SETS:
            self.err(loc, f"{kind} name {name!r} is reserved (built in)")
        elif name in seen:
            self.err(loc, f"{kind} name {name!r} is already used by a {seen[name]}")
        seen[name] = kind

    def _check_tier_overlaps(self, tiers: dict[str, AddressSet]) -> None:
        items = list(tiers.items())
        for i, (a, sa) in enumerate(items):
            for b, sb in items[i + 1:]:
                if any(x.overlaps(y) for x in sa.nets for y in sb.nets):
                    self.err(("tiers", b), f"tier {b!r} overlaps tier {a!r}: an address "
                             "must belong to one tier")

    def _implicit_rules(self, tiers: dict[str, AddressSet], internal: set[str],
                        internet: AddressSet) -> list[Rule]:
        rules = []
        for k, name in enumerate(sorted(internal)):
            rules.append(Rule(k, f"internal:{name}", tiers[name], internet, (), "deny", True,
                              line_of(self.root, ("tiers", name)), implicit=True))
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

    def _check_shadowing(self, rules: list[Rule]) -> None:
        spans = [_span(r) for r in rules]
        for j, later in enumerate(rules):
            if later.implicit:
                continue
            lj = spans[j]
            for i, earlier in enumerate(rules[:j]):
                ei = spans[i]
                # a cheap necessary condition first: the earlier rule's bounding box
                if not (ei[0] <= lj[0] and lj[1] <= ei[1] and ei[2] <= lj[2]
                        and lj[3] <= ei[3] and lj[4] <= ei[4]):
                    continue
                if earlier.covers(later):
                    why = (f"tier {earlier.name.split(':', 1)[1]!r} is internal and may not "
                           "reach outside addresses"
                           if earlier.implicit else f"rule {earlier.name!r} (line {earlier.line}) "
                           "already decides every packet it covers")
                    self.problems.append(
                        f"{self.path}:{later.line}: rule {later.name!r} can never match: {why}"
                    )
                    break

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
                                  line_of(self.root, loc)))
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
    try:
        raw = RawPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(validation_problems(path, root, exc.errors(),
                                              {"from_": "from"})) from None
    policy = _Builder(raw, root, path).build()
    return dataclasses.replace(policy, source_digest=hashlib.sha256(text.encode()).hexdigest())


def load_policy(path: str | Path) -> Policy:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_policy(text, str(path))
