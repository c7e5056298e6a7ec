"""Rules that can never match: for each rule, the first earlier rule that covers it
(`topology.policy.Rule.covers`), found without comparing every pair of rules.

Each dimension of a rule is indexed separately, as bit masks over the rules' positions:
the rules whose source covers a given address set, whose destination covers it, whose
services cover given services. A rule is covered by exactly the rules in the AND of its
three masks, so the first earlier one is the lowest bit below its own position.

- Addresses: a rule's side covers a set of CIDRs when each CIDR lies inside one of the
  side's CIDRs, i.e. one of its supernets (at most one per prefix length) is a net of
  the side. So per side: for each of its CIDRs, OR the masks of its supernets, then AND.
- Ports: rules whose range of a protocol contains a range, for every range of the file
  at once, by a sweep over the ranges' low ends with a Fenwick tree of masks over their
  high ends.

The cost is about the number of CIDRs and port ranges times the prefix lengths in use
and log(65536), not rules squared: 5,000 rules between the same two tiers took 40 s of
CPU with a pairwise check (each pair passed its bounding-box test), under one now.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from topology.policy import AddressSet, Rule, Service

PORT_SPAN = 1 << 16  # port numbers 0..65535


class _SideIndex:
    """One side (sources or destinations) of the rules, by the CIDRs it names."""

    def __init__(self) -> None:
        self._rules: dict[tuple[int, int, int], int] = defaultdict(int)
        self._plens: dict[int, set[int]] = defaultdict(set)
        self._sorted: dict[int, list[int]] = {}
        self._covering: dict[AddressSet, int] = {}

    def add(self, bit: int, side: AddressSet) -> None:
        for net in side.nets:
            self._rules[(net.version, int(net.network_address), net.prefixlen)] |= bit
            self._plens[net.version].add(net.prefixlen)

    def covering(self, side: AddressSet, everyone: int) -> int:
        """The rules whose side has, for each CIDR of ``side``, one containing it."""
        found = self._covering.get(side)
        if found is not None:
            return found
        result = everyone
        for net in side.nets:
            version, plen, width = net.version, net.prefixlen, net.max_prefixlen
            addr = int(net.network_address)
            plens = self._sorted.get(version)
            if plens is None:
                plens = self._sorted[version] = sorted(self._plens[version])
            union = 0
            for k in plens:
                if k > plen:
                    break
                union |= self._rules.get((version, addr >> (width - k) << (width - k), k), 0)
            result &= union
            if not result:
                break
        self._covering[side] = result
        return result


def _containing(ranges: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """For every range, the OR of the masks of the ranges that contain it."""
    tree = [0] * (PORT_SPAN + 1)  # Fenwick tree over PORT_SPAN - hi: prefix = hi' >= hi

    def add(i: int, mask: int) -> None:
        while i <= PORT_SPAN:
            tree[i] |= mask
            i += i & -i

    def query(i: int) -> int:
        out = 0
        while i > 0:
            out |= tree[i]
            i -= i & -i
        return out

    by_lo: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (lo, hi), mask in ranges.items():
        by_lo[lo].append((hi, mask))
    result = {}
    for lo in sorted(by_lo):  # every range starting at or before lo is in the tree
        group = by_lo[lo]
        for hi, mask in group:
            add(PORT_SPAN - hi, mask)
        for hi, _ in group:
            result[(lo, hi)] = query(PORT_SPAN - hi)
    return result


class _ServiceIndex:
    def __init__(self) -> None:
        self.any_proto = 0  # rules for every protocol
        self.whole: dict[str, int] = defaultdict(int)  # every port of a protocol (or icmp)
        self._ranges: dict[str, dict[tuple[int, int], int]] = defaultdict(lambda: defaultdict(int))
        self._containing: dict[str, dict[tuple[int, int], int]] = {}

    def add(self, bit: int, services: Sequence[Service]) -> None:
        if not services:
            self.any_proto |= bit
        for s in services:
            if not s.ports:
                self.whole[s.proto] |= bit
            for r in s.ports:
                self._ranges[s.proto][(r.lo, r.hi)] |= bit

    def covering(self, services: Sequence[Service], everyone: int) -> int:
        """The rules whose services cover all of ``services``."""
        if not services:
            return self.any_proto
        result = everyone
        for s in services:
            mask = self.whole.get(s.proto, 0)
            if s.ports:
                containing = self._containing.get(s.proto)
                if containing is None:
                    containing = self._containing[s.proto] = _containing(self._ranges[s.proto])
                ports = everyone
                for r in s.ports:
                    ports &= containing[(r.lo, r.hi)]
                mask |= ports
            result &= mask
        return result | self.any_proto


def first_covering(rules: Sequence[Rule]) -> list[Rule | None]:
    """For each rule, the first rule before it in ``rules`` that covers it (None if
    none does). Implicit rules are not checked (None); they come before the written
    ones, so a written rule covered by one of each is reported against the implicit."""
    written = [r for r in rules if not r.implicit]
    implicit = [r for r in rules if r.implicit]
    # bit k: written rule k; bit base + k: implicit rule k (so the masks of the
    # written rules' CIDRs stay as short as the written rules are few)
    base = len(written)
    by_bit = [*written, *implicit]
    bit_of = {id(r): k for k, r in enumerate(by_bit)}
    everyone = (1 << len(by_bit)) - 1
    every_implicit = everyone >> base << base
    src, dst, services = _SideIndex(), _SideIndex(), _ServiceIndex()
    for r in by_bit:
        bit = 1 << bit_of[id(r)]
        src.add(bit, r.src)
        dst.add(bit, r.dst)
        services.add(bit, r.services)
    out: list[Rule | None] = []
    for later in rules:
        found = None
        if not later.implicit:
            mask = (src.covering(later.src, everyone) & dst.covering(later.dst, everyone)
                    & services.covering(later.services, everyone))
            earlier_written = (1 << bit_of[id(later)]) - 1
            for part in (mask & every_implicit, mask & earlier_written):
                while part and found is None:
                    low = part & -part
                    candidate = by_bit[low.bit_length() - 1]
                    if candidate.covers(later):  # the masks are exact: a safeguard
                        found = candidate
                    part ^= low
        out.append(found)
    return out
