"""Policy compile time and flow count over a grid of rules x addresses, and a
1000-rule x 10,000-address policy compiled and installed into real OVS."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import time
from typing import Any

from bench.core import Context, Row, Target, alternate, benchmark, median
from bench.oflab import OfApp, OfLab
from labs import netns as nsl
from labs.pkt import _cli_env
from topology.pipeline import METER_RATES

PORTS_PER_RULE = 3
GRID_RULES = (10, 100, 1000)
GRID_ADDRESSES = (10, 100, 1000, 10_000)
INSTALL = (1000, 10_000)  # rules, addresses: the "compiled and installed" case


def address(i: int) -> str:
    """The i-th bench address: odd host numbers, so no two collapse into a wider prefix."""
    odd = 2 * i + 1
    return f"10.{200 + odd // 65536}.{(odd // 256) % 256}.{odd % 256}/32"


def side_size(rules: int, addresses: int) -> int:
    """Addresses on each side of a rule: every address is used at least once (the rules'
    sides together cover the whole set), at least 2 per side (so a rule is a real
    conjunction: 2 x 2 x 3 ports = 12 > 2 + 2 + 3 + 1)."""
    half = max(1, addresses // 2)
    return min(half, max(2, math.ceil(addresses / (2 * rules))))


def grid_policy(rules: int, addresses: int, ports: int = PORTS_PER_RULE) -> str:
    """policy.yaml text: ``rules`` allow rules over ``addresses`` distinct /32 addresses.

    The first half of the addresses are sources, the second half destinations; rule k
    takes the next `side_size` of each (cyclically, so with few addresses rules share
    them) and its own ``ports`` TCP ports (so no rule shadows another)."""
    half = max(1, addresses // 2)
    src_pool = [address(i) for i in range(half)]
    dst_pool = [address(i) for i in range(half, addresses)] or src_pool
    side = side_size(rules, addresses)
    lines = ["tiers:", "  bench: {cidrs: [10.200.0.0/16]}", "policy:", "  default: deny",
             "  rules:"]
    for k in range(rules):
        src = ", ".join(src_pool[(k * side + j) % len(src_pool)] for j in range(side))
        dst = ", ".join(dst_pool[(k * side + j) % len(dst_pool)] for j in range(side))
        tcp = ", ".join(str(1024 + ports * k + j) for j in range(ports))
        lines.append(f"    - {{name: r{k}, from: [{src}], to: [{dst}], tcp: [{tcp}]}}")
    return "\n".join(lines) + "\n"


def cross_product_count(policy: Any, flows: frozenset[Any]) -> int:
    """What a compiler without conjunction emits: every rule's sources x destinations x
    services as separate flows (the other policy flows unchanged)."""
    from topology.policy_compile import _dimensions, rule_flow_count

    naive_rules = sum(math.prod(len(d) for d in _dimensions(r)) for r in policy.rules)
    return len(flows) - rule_flow_count(flows) + naive_rules


def compile_once(text: str) -> tuple[float, float, int, int]:
    """parse+validate, then compile (uncached `_compile`): seconds each, flows, cross."""
    from topology.policy import parse_policy
    from topology.policy_compile import _compile, clear_caches

    clear_caches()  # every round cold: no rule sides or rule flows from the last round
    t0 = time.perf_counter()
    policy = parse_policy(text, "bench.yaml")
    t1 = time.perf_counter()
    flows = _compile(policy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(flows), cross_product_count(policy, flows)


def parse_profile(text: str) -> dict[str, float]:
    """Where parse_policy spends its time: YAML with line numbers, address sets, the
    shadowing check (ms, cumulative)."""
    import cProfile
    import io
    import pstats

    from topology.policy import clear_caches, parse_policy

    clear_caches()
    pr = cProfile.Profile()
    pr.enable()
    parse_policy(text, "bench.yaml")
    pr.disable()
    stats = pstats.Stats(pr, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    names = {"parse_policy": "total", "load_with_lines": "YAML with line numbers",
             "model_validate": "schema (pydantic)", "_side": "address sets (ipaddress)",
             "_check_shadowing": "shadowing check"}
    out = {label: 0.0 for label in names.values()}
    for (file, _line, func), v in stats.items():
        if func in names and ("topology" in file or func == "model_validate"):
            out[names[func]] += v[3] * 1000
    return out


class PolicyApp(OfApp):
    """`bench._policy_app` in the lab's namespace (OfApp's call/wait/kill)."""

    def __init__(self, lab: OfLab, tag: str = "papp") -> None:  # noqa: D107
        self.log_path = lab.dir / f"{tag}.log"
        self.started = time.time()
        argv = [sys.executable, "-m", "bench._policy_app", "--port", str(6653)]
        with self.log_path.open("ab") as fh:
            self.proc = nsl.popen(lab.ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=fh, text=True, env=_cli_env())
        lab.ctx.defer(self.kill)


@benchmark(
    "policy_compile",
    title="Policy compile: time and flow count over rules x addresses; compiled and installed",
    order=40,
    baseline="flow count: the cross product a compiler without conjunction emits; "
             "install: `ovs-ofctl --bundle add-flows` of the same rendered flows, same OVS",
    method=(
        "Grid: R rules (10, 100, 1000) over A distinct /32 addresses (10 ... 10,000; odd "
        "host numbers so nothing collapses into a wider prefix). The first half of the "
        "addresses are sources, the second half destinations; rule k allows TCP to its own "
        f"{PORTS_PER_RULE} ports from the next s addresses of the source half to the next s "
        "of the destination half (cyclically), s = max(2, ceil(A / 2R)) capped at A/2, so "
        "every address is used and with few addresses rules share them. Time = "
        "`topology.policy.parse_policy` (YAML with line numbers, schema, validation "
        "including the shadowing check) + `topology.policy_compile._compile` (uncached) on "
        "the text in memory, every round cold (`topology.policy_compile.clear_caches()`: "
        "no rule sides or rule flows kept from an earlier parse); median of the rounds. "
        "Flow count: every flow of the policy "
        "stage (tables 20-24); baseline column: the same with each rule's sources x "
        "destinations x ports as separate flows. Compiled and installed: the 1000 x 10,000 "
        "policy file into a fresh netdev bridge of a private OVS through socknet's own "
        "runtime (`bench._policy_app`: os-ken + `controller.runtime.Controller`; "
        "`controller.reload.load_checked` reads, parses, validates and tests the file, "
        "`Controller._recompute` builds the socket bridge's desired state (compiles the "
        "policy, checks every flow against the pipeline), `Controller.reconcile` reads "
        "the switch, adds the meters and sends one OpenFlow 1.4 bundle, cold encode "
        "cache, parse and compile caches cleared), timed from before reading the file to "
        "the bundle commit reply. Baseline: "
        "wall time of `ovs-ofctl --bundle add-flows` of the same desired flows "
        "(`topology.render.flows_text`) into another fresh bridge of the same OVS "
        "(meters added beforehand, untimed): it starts from compiled flows. Rounds "
        "alternate (ABBA); the flow count on each bridge is checked after every round."
    ),
)
def policy_compile(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    rounds = ctx.n(3, 1)
    grid_rules = ctx.pick(GRID_RULES, (10, 100))
    grid_addrs = ctx.pick(GRID_ADDRESSES, (10, 100))
    breakdown = []
    for r, a in itertools.product(grid_rules, grid_addrs):
        text = grid_policy(r, a)
        samples = [compile_once(text) for _ in range(rounds)]
        parse = [s[0] for s in samples]
        comp = [s[1] for s in samples]
        flows, cross = samples[0][2], samples[0][3]
        s = side_size(r, a)
        what = f"{r:,} rules x {a:,} addresses ({s}+{s}+{PORTS_PER_RULE} per rule)"
        total = [1000 * (s[0] + s[1]) for s in samples]
        ctx.log(f"{what}: {flows} flows, {median(total):.0f} ms")
        rows.append(Row.of(f"{what}: parse+validate+compile", "ms", total))
        rows.append(Row(f"{what}: flows (baseline: cross product)", "flows", flows, cross))
        breakdown.append(f"{r}x{a}: {1000 * (median(parse) or 0):.0f} + "
                         f"{1000 * (median(comp) or 0):.0f}")
    ctx.note("Parse+validate vs compile, ms (rules x addresses: parse + compile): "
             + "; ".join(breakdown) + ".")
    for r, a in ((max(grid_rules), min(grid_addrs)), (max(grid_rules), max(grid_addrs))):
        parts = parse_profile(grid_policy(r, a))
        ctx.note(f"Inside parse+validate, {r} rules x {a} addresses (cProfile, cumulative, "
                 "profiler overhead included): "
                 + ", ".join(f"{k} {v:.0f} ms" for k, v in parts.items()) + ".")
    rows += _install(ctx, rounds)
    return rows


def _install(ctx: Context, rounds: int) -> list[Row]:
    n_rules, n_addrs = ctx.pick(INSTALL, (100, 1000))
    lab = OfLab(ctx, "c")
    app = PolicyApp(lab)
    path = lab.dir / "policy.yaml"
    path.write_text(grid_policy(n_rules, n_addrs))
    rendered = lab.dir / "desired.flows"
    expected = app.call({"cmd": "render", "path": str(path), "out": str(rendered)})["flows"]
    dpids = itertools.count(0x2000)
    detail: list[dict[str, Any]] = []

    def fresh(prefix: str, controller: bool) -> tuple[str, int]:
        dpid = next(dpids)
        name = f"{prefix}{dpid:x}"
        lab.add_bridge(name, dpid, controller=controller)
        return name, dpid

    def socknet(_i: int) -> float:
        name, dpid = fresh("s", True)
        try:
            app.wait_connected(dpid)
            r = app.call({"cmd": "install", "dpid": dpid, "path": str(path)})
            _check(lab, name, expected)
            detail.append(r)
            return float(r["s"])
        finally:
            lab.del_bridge(name)

    def ofctl(_i: int) -> float:
        name, _ = fresh("o", False)
        try:
            for meter, rate in METER_RATES.items():
                lab.ovs.ofctl("add-meter", lab.ovs.mgmt(name),
                              f"meter={meter},pktps,burst,band=type=drop,rate={rate},"
                              f"burst_size={rate}")
            t = time.perf_counter()
            subprocess.run(["ovs-ofctl", "-O", "OpenFlow14", "--bundle", "add-flows",
                            lab.ovs.mgmt(name), str(rendered)], check=True,
                           capture_output=True, env=lab.ovs.env)
            dt = time.perf_counter() - t
            _check(lab, name, expected)
            return dt
        finally:
            lab.del_bridge(name)

    ctx.log(f"compiled and installed: {n_rules} rules x {n_addrs} addresses, "
            f"{expected} flows, {rounds} rounds")
    s, b = alternate(rounds, socknet, ofctl)
    what = f"{n_rules:,} rules x {n_addrs:,} addresses ({expected:,} flows)"

    def part(key: str) -> list[float]:
        return [float(d[key]) for d in detail]

    ctx.settings["install"] = {"rules": n_rules, "addresses": n_addrs, "flows": expected}
    return [
        Row.of(f"{what}: policy file -> compiled and installed (commit reply)", "s", s, b,
               target=Target.below(2),
               note="baseline: ovs-ofctl starts from the compiled flows (rendered text); "
                    "socknet's figure includes reading, parsing, validating and compiling "
                    "the policy"),
        Row.of(f"{what}: of which load_checked (read, parse, validate)",
               "s", part("load_s"),
               note="cold (no rule sides cached); the policy has no tests, so no simulator"),
        Row.of(f"{what}: of which desired state (compile, pipeline check)", "s",
               part("desired_s"), note="cold: no rule flows cached"),
        Row.of(f"{what}: of which reconcile (read switch, meters, encode, bundle, commit)",
               "s", part("reconcile_s"), b,
               note="the like-for-like part: socknet's sender vs ovs-ofctl, same flows"),
    ]


def _check(lab: OfLab, bridge: str, expected: int) -> None:
    got = lab.flow_count(bridge)
    if got != expected:
        raise RuntimeError(f"{bridge}: {got} flows installed, expected {expected}")

