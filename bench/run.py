"""`make bench`: run the benchmarks, write docs/benchmarks.md and docs/benchmarks.json.

    python -m bench.run [--quick] [--only NAME ...] [--out DIR] [--list]

Needs root (network namespaces, private OVS instances). Every benchmark builds
its own labs with unique names and tears them down when it ends, whether it
succeeded or not; a run that was killed is cleaned up by the next one
(`bench.janitor`). ``--quick`` runs each benchmark in a tiny mode (proves the
harness, figures meaningless) and writes to a scratch directory unless
``--out`` is given. ``--only`` merges its results into the existing files.
Exit status: 0 all benchmarks ran (targets missed or not), 1 one of them
failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import FrameType

import bench
from bench import report
from bench.core import REGISTRY, Benchmark, Context, Row
from bench.janitor import Janitor, sweep_stale

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

DOCS = report.REPO / "docs"


def discover() -> dict[str, Benchmark]:
    """Import every module of the bench package (not ``_private`` ones): each registers
    its benchmarks with ``@benchmark``."""
    for mod in pkgutil.iter_modules(bench.__path__):
        if not mod.name.startswith("_") and mod.name != "run":
            importlib.import_module(f"bench.{mod.name}")
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


class Interrupted(BaseException):
    pass


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # pyroute2 forks helpers (to open netlink sockets inside a namespace) and stops them
    # with SIGTERM; they inherit this handler. Only the main process may unwind (and run
    # the cleanups): a fork just dies, as it would by default.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise Interrupted(signal.Signals(signum).name)


def run_one(b: Benchmark, workdir: Path, *, quick: bool, janitor: Janitor, keep: bool = False
            ) -> dict[str, object]:
    ctx = Context(b.name, workdir / b.name, quick=quick, janitor=janitor, keep=keep)
    started = time.monotonic()
    rows: list[Row] = []
    error = None
    ctx.log("start")
    try:
        rows = list(b.fn(ctx))
    except Exception:
        error = traceback.format_exc()
        ctx.log(f"FAILED:\n{error}")
    finally:
        ctx.close()
    seconds = time.monotonic() - started
    ctx.log(f"done in {seconds:.0f} s")
    return report.result_entry(b, rows, seconds=seconds, error=error, notes=ctx.notes,
                               settings=ctx.settings, measured_at=report.now_iso())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny rounds: prove the harness")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only NAME "
                        "(repeatable); results are merged into the existing files")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default docs/, or a scratch dir with --quick)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (controller and OVS logs); labs are "
                             "still torn down")
    args = parser.parse_args(argv)

    benches = discover()
    if args.list:
        for b in benches.values():
            print(f"{b.name:<22} {b.title}")
        return 0
    unknown = [n for n in args.only or [] if n not in benches]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(benches)}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, Open vSwitch)", file=sys.stderr)
        return 2
    selected = [b for b in benches.values() if not args.only or b.name in args.only]
    out = args.out or (DOCS if not args.quick else
                       Path(tempfile.gettempdir()) / "socknet-bench-quick")

    stale = sweep_stale()
    if stale:
        print(f"bench: removed leftovers of an earlier run: {', '.join(stale)}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="socknet-bench-"))
    janitor = Janitor(workdir)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _interrupt)
    started = time.monotonic()
    machine = report.machine_facts()
    results = []
    try:
        for b in selected:
            results.append(run_one(b, workdir, quick=args.quick, janitor=janitor,
                                   keep=args.keep))
    except Interrupted as exc:
        print(f"bench: interrupted ({exc}); cleaned up, nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        janitor.sweep_own(keep_workdir=args.keep)
        if args.keep:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
    machine["loadavg_end"] = report._loadavg()
    data = {
        "generated": report.now_iso(),
        "quick": args.quick,
        "seconds": time.monotonic() - started,
        "machine": machine,
        "benchmarks": results,
    }
    mpath, jpath = report.write(out, data, merge=bool(args.only))
    print(_summary(results))
    print(f"\nwrote {mpath} and {jpath}")
    return 1 if any(r["error"] for r in results) else 0


def _summary(results: list[dict[str, object]]) -> str:
    lines = []
    for b in results:
        lines.append(f"\n== {b['title']} ({b['seconds']:.0f} s)")
        if b["error"]:
            lines.append("   FAILED: " + str(b["error"]).strip().splitlines()[-1])
        for r in b["rows"]:  # type: ignore[union-attr]
            cells = report.row_cells(r)
            lines.append(f"   {cells[0]:<58} {cells[1]:>14} {cells[2]:>14} {cells[3]:>7} "
                         f"{cells[4]:<18} {cells[5]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
