"""The benchmark harness: registry, result rows, targets, per-benchmark context.

A benchmark is a function ``fn(ctx: Context) -> list[Row]`` registered with
`@benchmark`. It builds whatever it needs through ``ctx`` (labs, OVS instances,
namespaces, processes: each registered for cleanup), measures socknet and its
baseline in the same run (`alternate` runs their rounds ABBA-interleaved) and
returns one `Row` per figure. `bench.run` discovers every module of the
``bench`` package, runs the registered benchmarks in ``order`` and writes
``docs/benchmarks.md`` and ``docs/benchmarks.json``.

    from bench.core import Context, Row, Target, alternate, benchmark

    @benchmark("reload", title="Policy reload", order=60)
    def reload(ctx: Context) -> list[Row]:
        lab = ctx.socknet_lab()
        s, b = alternate(ctx.n(20, 2), lambda i: measure(lab, i), lambda i: base(i))
        return [Row.of("save -> verdict changed, p50", "ms", s, b, target=Target.at_most(300))]

Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import math
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")

# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """What a figure should reach. ``kind``: at_most / at_least on the socknet value,
    ratio_at_least on socknet/baseline, equals on the socknet value."""

    kind: str
    value: float

    @classmethod
    def at_most(cls, value: float) -> Target:
        return cls("at_most", value)

    @classmethod
    def below(cls, value: float) -> Target:
        return cls("below", value)

    @classmethod
    def at_least(cls, value: float) -> Target:
        return cls("at_least", value)

    @classmethod
    def ratio_at_least(cls, value: float) -> Target:
        return cls("ratio_at_least", value)

    @classmethod
    def equals(cls, value: float) -> Target:
        return cls("equals", value)

    def text(self, unit: str) -> str:
        v = _fmt(self.value)
        return {
            "at_most": f"<= {v} {unit}",
            "below": f"< {v} {unit}",
            "at_least": f">= {v} {unit}",
            "ratio_at_least": f">= {v}x baseline",
            "equals": f"{v} {unit}",
        }[self.kind].strip()

    def met(self, socknet: float | None, ratio: float | None) -> bool | None:
        if self.kind == "ratio_at_least":
            return None if ratio is None else ratio >= self.value
        if socknet is None:
            return None
        return {
            "at_most": socknet <= self.value,
            "below": socknet < self.value,
            "at_least": socknet >= self.value,
            "equals": socknet == self.value,
        }[self.kind]


# ---------------------------------------------------------------- rows


def median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


STATS: dict[str, Callable[[list[float]], float | None]] = {
    "median": median,
    "max": lambda v: max(v) if v else None,
    "min": lambda v: min(v) if v else None,
    "sum": lambda v: sum(v) if v else None,
    "p95": lambda v: _percentile(v, 95),
}


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    vals = sorted(values)
    k = (len(vals) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


@dataclass
class Row:
    """One figure of a benchmark: socknet's value, the baseline's, the target.

    ``socknet``/``baseline`` are the summaries (``stat`` of the samples);
    ``None`` means not measured / not applicable (shown as "n/a").
    ``ratio`` is socknet / baseline.
    """

    figure: str
    unit: str
    socknet: float | None
    baseline: float | None = None
    target: Target | None = None
    stat: str = "median"
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def of(cls, figure: str, unit: str, socknet: Sequence[float] | None,
           baseline: Sequence[float] | None = None, *, target: Target | None = None,
           stat: str = "median", note: str = "") -> Row:
        """A row summarised from raw samples (``stat`` of each list)."""
        summary = STATS[stat]
        samples: dict[str, list[float]] = {}
        if socknet is not None:
            samples["socknet"] = [float(v) for v in socknet]
        if baseline is not None:
            samples["baseline"] = [float(v) for v in baseline]
        return cls(
            figure=figure, unit=unit,
            socknet=summary(samples["socknet"]) if socknet is not None else None,
            baseline=summary(samples["baseline"]) if baseline is not None else None,
            target=target, stat=stat, samples=samples, note=note,
        )

    @property
    def ratio(self) -> float | None:
        if self.socknet is None or self.baseline is None or self.baseline == 0:
            return None
        return self.socknet / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.socknet, self.ratio)

    @property
    def n(self) -> int:
        return max((len(v) for v in self.samples.values()), default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "unit": self.unit,
            "stat": self.stat,
            "n": self.n,
            "socknet": self.socknet,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": None if self.target is None else {
                "kind": self.target.kind, "value": self.target.value,
                "text": self.target.text(self.unit)},
            "met": self.met,
            "samples": self.samples,
            "note": self.note,
        }


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    order: int
    fn: Callable[[Context], list[Row]]
    baseline: str  # one line: what the baseline column is
    method: str  # how it is measured (markdown paragraph)


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, title: str, order: int = 100, baseline: str = "",
              method: str = "") -> Callable[[Callable[[Context], list[Row]]],
                                            Callable[[Context], list[Row]]]:
    """Register ``fn(ctx) -> list[Row]`` as benchmark ``name`` (``--only name``)."""

    def register(fn: Callable[[Context], list[Row]]) -> Callable[[Context], list[Row]]:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"benchmark {name!r} registered twice")
        doc = method or (fn.__doc__ or "").strip()
        REGISTRY[name] = Benchmark(name, title, order, fn, baseline, doc)
        return fn

    return register


def alternate(n: int, socknet: Callable[[int], T], baseline: Callable[[int], U],
              ) -> tuple[list[T], list[U]]:
    """Run ``n`` rounds of each, interleaved ABBA (s b b s s b ...) so drift in the
    machine's load hits both sides alike. Round index is passed to each call."""
    s_out: list[T] = []
    b_out: list[U] = []
    for i in range(n):
        if i % 2 == 0:
            s_out.append(socknet(i))
            b_out.append(baseline(i))
        else:
            b_out.append(baseline(i))
            s_out.append(socknet(i))
    return s_out, b_out


# ---------------------------------------------------------------- context


class Context:
    """What a benchmark gets: mode, a scratch dir, cleanup, unique names, notes."""

    def __init__(self, name: str, workdir: Path, *, quick: bool, janitor: Any = None,
                 keep: bool = False) -> None:
        self.name = name
        self.quick = quick
        self.keep = keep
        self.workdir = workdir
        self.janitor = janitor
        self.notes: list[str] = []
        self.settings: dict[str, Any] = {}
        self._stack = ExitStack()
        workdir.mkdir(parents=True, exist_ok=True)

    # mode
    def n(self, full: int, quick: int = 1) -> int:
        """Rounds to run: ``full`` normally, ``quick`` with --quick."""
        return quick if self.quick else full

    def pick(self, full: T, quick: T) -> T:
        return quick if self.quick else full

    # names
    def prefix(self, tag: str = "") -> str:
        """A fresh name prefix ("b" + 4 hex + tag, at most 8 chars): namespaces and
        interface names built from it are unique to this run and known to the janitor."""
        p = f"b{secrets.token_hex(2)}{tag}"[:8]
        if self.janitor is not None:
            self.janitor.record_prefix(p)
        return p

    def dir(self, tag: str) -> Path:
        d = self.workdir / tag
        d.mkdir(parents=True, exist_ok=True)
        return d

    # cleanup
    def defer(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``fn(*args, **kw)`` when the benchmark ends (last registered runs first),
        whether it succeeded or not; errors in cleanup are reported, not raised."""

        def safe() -> None:
            try:
                fn(*args, **kw)
            except Exception as exc:  # cleanup must go on
                self.log(f"cleanup {getattr(fn, '__name__', fn)} failed: {exc}")

        self._stack.callback(safe)

    def close(self) -> None:
        self._stack.close()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # labs (see bench.labkit)
    def socknet_lab(self, tag: str = "s") -> Any:
        from bench import labkit

        return labkit.socknet_lab(self, tag)

    def normal_lab(self, tag: str = "n") -> Any:
        from bench import labkit

        return labkit.normal_lab(self, tag)

    # output
    def note(self, text: str) -> None:
        """A sentence for the report under this benchmark's table."""
        self.notes.append(text)

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.name}: {text}", file=sys.stderr, flush=True)


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:g}"
