"""Hostile and oversized config files: what `socknet check` / `socknet validate` make of
them, how long it takes and how much memory (issue 11, part 5).

The generators are shared with the tests (tests/test_hostile_files.py), which assert the
outcome (exit 2, one `file:line: reason`, no traceback, the running policy kept); this
benchmark measures the time and peak memory of each, as separate processes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bench.core import Context, Row, Target, benchmark

HOST_HEAD = "bridges: {mesh: {}, socket: {}}\n"
POLICY_TAIL = ("policy:\n  default: deny\n  rules:\n"
               "    - {name: r, from: t0, to: t1, tcp: [80]}\n")


def bracket_bomb(depth: int = 25_000) -> bytes:
    """Flow sequences nested ``depth`` deep: libyaml's composer recursed once per level in
    C and crashed the process (SIGSEGV) at about 20,000."""
    return b"[" * depth + b"]" * depth + b"\n"


def block_bomb(depth: int = 25_000) -> bytes:
    """The same depth as block sequences: `- - - - ... x`."""
    return b"- " * depth + b"x\n"


def merge_chain(length: int = 2_000) -> bytes:
    """Each mapping merges the one before (`<<: *mK`): a chain as deep as it is long
    for the constructor, though no collection is nested in the text."""
    lines = ["m0: &m0 {k0: 1}"]
    lines += [f"m{k}: &m{k} {{<<: *m{k - 1}, k{k}: 1}}" for k in range(1, length)]
    return ("\n".join(lines) + "\n").encode()


def alias_bomb(levels: int = 9, fanout: int = 10) -> bytes:
    """Billion laughs: each level is ``fanout`` aliases of the one before."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fanout) + "]"]
    lines += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * fanout) + "]"
              for k in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


def non_utf8_policy() -> bytes:
    return b"tiers:\n  t0: {cidrs: [10.0.0.0/24]}\n  t1: {cidrs: [10.0.1.0/24]}  # caf\xe9\n"


def nul_host() -> bytes:
    """A NUL in `policy:` (a path: the system calls end it there)."""
    return (HOST_HEAD + 'policy: "a\\0b"\n').encode()


def nul_policy() -> bytes:
    return (b'tiers:\n  t0: {cidrs: [10.0.0.0/24]}\n  t1: {cidrs: [10.0.1.0/24]}\n'
            b'  "t\\0": {cidrs: [10.0.2.0/24]}\n' + POLICY_TAIL.encode())


def timestamp_host() -> bytes:
    """`host: 2020-13-45` was a YAML timestamp, and an invalid one a traceback."""
    return ("host: 2020-13-45\n" + HOST_HEAD).encode()


def timestamp_policy() -> bytes:
    return (b"tiers:\n  t0: {cidrs: [10.0.0.0/24]}\n  t1: {cidrs: [10.0.1.0/24]}\n"
            b"policy:\n  rules:\n    - {name: 2020-13-45, from: t0, to: t1, tcp: [80]}\n"
            b"    - {name: r, from: t0, to: t1, tcp: [2020-12-05]}\n")


def many_tiers(count: int, *, internal: bool = False, stride: int = 1) -> bytes:
    """``count`` tiers of one /24 each (every ``stride``-th /24 of 10/8 and on), and one
    rule between the first two."""
    lines = ["tiers:"]
    extra = ", internal: true" if internal else ""
    for k in range(count):
        n = k * stride
        lines.append(f"  t{k}: {{cidrs: [{10 + n // 65536}.{n // 256 % 256}.{n % 256}.0/24]"
                     f"{extra}}}")
    return ("\n".join(lines) + "\n" + POLICY_TAIL).encode()


def same_sides_rules(count: int = 5_000) -> bytes:
    """``count`` rules between the same two tiers, one port each: every rule's sources
    and destinations cover the next rule's (the shadowing check compared all pairs)."""
    lines = ["tiers:", "  a: {cidrs: [10.1.0.0/16]}", "  b: {cidrs: [10.2.0.0/16]}",
             "policy:", "  rules:"]
    lines += [f"    - {{name: r{k}, from: a, to: b, tcp: [{1 + k}]}}" for k in range(count)]
    return ("\n".join(lines) + "\n").encode()


def oversized(size: int = 50 * 1024 * 1024) -> bytes:
    """A policy of ``size`` bytes: tiers, then comment lines to fill."""
    head = many_tiers(100)
    line = b"#" * 79 + b"\n"
    return head + line * ((size - len(head)) // len(line))


def near_limit_cidrs(size: int = 4 * 1024 * 1024 - 4096) -> bytes:
    """As many /32s in one tier as fit just under the size limit (over the CIDR limit)."""
    out = ["tiers:", "  t0:", "    cidrs:"]
    used, k = 30, 0
    while used < size - 200:
        item = f"    - 10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256}/32"
        out.append(item)
        used += len(item) + 1
        k += 1
    out.append("  t1: {cidrs: [11.0.0.0/24]}")
    return ("\n".join(out) + "\n" + POLICY_TAIL).encode()


def largest_policy(flows: int = 100_000, tests: int = 1_000) -> bytes:
    """About the most a policy may be: ``flows`` rule flows (the limit is 101,000) and
    ``tests`` tests (the limit), so `check` builds the simulator and runs them all."""
    from bench.policygen import sized_policy

    lines = ["tests:"]
    for k in range(tests):
        port = 8000 + k % 100
        lines.append(f"  - {{from: 10.100.0.1, to: 10.100.4.{2 * (k % 100) + 1}, "
                     f"tcp: {port}, expect: {'allow' if port == 8000 else 'deny'}}}")
    return (sized_policy(flows) + "\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "policy" (socknet check FILE) or "host" (socknet validate -c FILE)
    make: Callable[[], bytes]
    refused: bool  # the expected outcome: exit 2 (True) or a verdict (exit 0/1)


CASES = (
    Case("25,000 nested brackets (policy)", "policy", bracket_bomb, True),
    Case("25,000 nested brackets (host.yaml)", "host", bracket_bomb, True),
    Case("25,000 nested block sequences", "policy", block_bomb, True),
    Case("2,000 chained merge keys", "policy", merge_chain, True),
    Case("alias bomb (10^9 nodes)", "policy", alias_bomb, True),
    Case("non-UTF-8 byte", "policy", non_utf8_policy, True),
    Case("NUL in host.yaml policy:", "host", nul_host, True),
    Case("NUL in a tier name", "policy", nul_policy, True),
    Case("host: 2020-13-45", "host", timestamp_host, False),
    Case("timestamps as a rule name and a port", "policy", timestamp_policy, True),
    Case("3,000 tiers", "policy", lambda: many_tiers(3_000), False),
    Case("12,000 tiers (413 KB)", "policy", lambda: many_tiers(12_000), False),
    Case("1,000 scattered internal tiers (1M flows)", "policy",
         lambda: many_tiers(1_000, internal=True, stride=2), True),
    Case("5,000 rules between the same tiers", "policy", same_sides_rules, False),
    Case("4 MB of /32s in one tier", "policy", near_limit_cidrs, True),
    Case("largest accepted policy: 100k flows, 1,000 tests", "policy", largest_policy, False),
    Case("50 MB policy", "policy", oversized, True),
)


# A small process starts the CLI and reports its peak memory: a child forked from this
# (big) process would count the pages it shared with it before exec in its peak.
_LAUNCH = """
import resource, subprocess, sys, time
started = time.monotonic()
p = subprocess.run([sys.executable, "-m", "controller.cli", *sys.argv[1:]],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.buffer.write(p.stderr)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(p.returncode, time.monotonic() - started, usage.ru_maxrss,
      usage.ru_utime + usage.ru_stime)
"""


@dataclass(frozen=True)
class Measured:
    code: int  # exit status; negative: killed by that signal
    stderr: str
    wall_s: float
    cpu_s: float
    peak_kib: int


def run_measured(args: list[str], timeout: float = 120) -> Measured:
    """``python -m controller.cli ARGS``, timed and its peak memory read."""
    done = subprocess.run([sys.executable, "-c", _LAUNCH, *args], capture_output=True,
                          timeout=timeout, check=True)
    code, wall, kib, cpu = done.stdout.split()
    return Measured(int(code), done.stderr.decode(errors="replace"), float(wall),
                    float(cpu), int(kib))


@benchmark(
    "hostile_files",
    title="Hostile and oversized config files: exit status, time and memory",
    order=45,
    method=(
        "Each file of `bench.hostile.CASES` written to disk and given to a fresh "
        "`python -m controller.cli` process: `socknet check FILE` for a policy, `socknet "
        "validate -c FILE` for a host.yaml (the process includes Python's start and "
        "imports, about 0.4 s). Time: wall time of the process; memory: its peak "
        "resident set (wait4's ru_maxrss of that child). Expected: exit 2 with one "
        "`file:line: reason` line for the files socknet refuses, a verdict (0/1) for the "
        "others; never a traceback or a signal. Alone: `topology.policy.load_policy` of "
        "the 12,000-tier file (read, parse, validate: the 'validate in under 2 s' figure) "
        "and of the 5,000-rule file, timed inside a fresh process each round (cold), "
        "median of the rounds."
    ),
)
def hostile_files(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    rounds = ctx.n(3, 1)
    cases = CASES if not ctx.quick else CASES[:6]
    folder = ctx.dir("hostile")
    for case in cases:
        path = folder / ("policy.yaml" if case.kind == "policy" else "host.yaml")
        path.write_bytes(case.make())
        args = ["check", str(path)] if case.kind == "policy" else ["validate", "-c", str(path)]
        runs = [run_measured(args) for _ in range(rounds)]
        code, err = runs[0].code, runs[0].stderr
        first = err.strip().splitlines()[0] if err.strip() else "(nothing on stderr)"
        first = first.replace(str(path), path.name)
        ok = (code == 2) if case.refused else code in (0, 1)
        ok = ok and "Traceback" not in err
        ctx.log(f"{case.name}: exit {code}: {first}")
        if not ok:
            ctx.note(f"UNEXPECTED: {case.name}: exit {code}: {err.strip()[-400:]}")
        size = path.stat().st_size
        rows.append(Row.of(f"{case.name} ({size:,} bytes): time", "s", [r.wall_s for r in runs],
                           target=Target.below(10),
                           note=f"exit {code}{'' if ok else ' (UNEXPECTED)'}: {first[:160]}"))
        rows.append(Row.of(f"{case.name}: CPU time", "s", [r.cpu_s for r in runs]))
        rows.append(Row.of(f"{case.name}: peak memory", "MiB", [r.peak_kib / 1024 for r in runs],
                           target=Target.below(1024)))
        path.unlink()
    rows += _in_process(ctx, rounds)
    return rows


_LOAD = """
import sys, time
from topology.policy import load_policy
started, cpu = time.perf_counter(), time.process_time()
load_policy(sys.argv[1])
print(time.perf_counter() - started, time.process_time() - cpu)
"""


def _in_process(ctx: Context, rounds: int) -> list[Row]:
    """load_policy alone, in a fresh process each round (cold caches, a small heap)."""
    rows = []
    folder = ctx.dir("hostile-inproc")
    tiers, rules = ctx.pick((12_000, 5_000), (100, 100))
    for what, data, target in (
            (f"{tiers:,} tiers", many_tiers(tiers), 2.0),
            (f"{rules:,} rules between the same tiers", same_sides_rules(rules), None)):
        path = folder / "policy.yaml"
        path.write_bytes(data)
        runs = [subprocess.run([sys.executable, "-c", _LOAD, str(path)], check=True,
                               capture_output=True, text=True).stdout.split()
                for _ in range(rounds)]
        rows.append(Row.of(f"{what}: load_policy (read, parse, validate) alone", "s",
                           [float(r[0]) for r in runs],
                           target=Target.below(target) if target else None))
        rows.append(Row.of(f"{what}: load_policy alone, CPU time", "s",
                           [float(r[1]) for r in runs]))
    return rows
