"""Tier policies of a given size, for benchmarks that need N installed policy flows.

`sized_policy(target)` returns policy.yaml text whose compiled policy stage has
about ``target`` flows: about 100 rules (the parser's shadowing check is
quadratic in rules), rule k allowing TCP port 8000+k from S single addresses to
S others (odd addresses: nothing collapses into a wider prefix; disjoint between
rules: no rule shadows another). The compiler turns a rule into S + S + 1 + 1
conjunctive flows. The optional first rule lets two lab containers exchange UDP
and ICMP, so traffic runs through the policy stage.
"""

from __future__ import annotations

RULES = 100
MAX_SIDE = 511


def _addr(block: int, i: int) -> str:
    odd = 2 * i + 1  # < 1024: spans 4 /24s of the block's /22
    return f"10.{100 + block // 64}.{(block % 64) * 4 + odd // 256}.{odd % 256}/32"


def sized_policy(target: int, *, pair: tuple[str, str] | None = None) -> str:
    side = max(1, min(MAX_SIDE, round((target / RULES - 2) / 2)))
    rules = max(1, round(target / (2 * side + 2)))
    if 2 * rules > 64 * 150:
        raise ValueError(f"{target} flows is beyond this generator")
    lines = ["tiers:", "  bench: {cidrs: [10.10.0.0/16]}", "policy:", "  default: deny",
             "  rules:"]
    if pair is not None:
        both = f"[{pair[0]}/32, {pair[1]}/32]"
        lines.append(f"    - {{name: bench-pair, from: {both}, to: {both}, udp: true, "
                     "icmp: true}")
    for k in range(rules):
        src = ", ".join(_addr(2 * k, i) for i in range(side))
        dst = ", ".join(_addr(2 * k + 1, i) for i in range(side))
        lines.append(f"    - {{name: r{k}, from: [{src}], to: [{dst}], "
                     f"tcp: [{8000 + k % 1000}]}}")
    return "\n".join(lines) + "\n"
