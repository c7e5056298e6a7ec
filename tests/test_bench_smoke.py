"""`make bench` works: every benchmark runs in its tiny --quick mode on real OVS and
writes its table. Benchmarks are not tests: nothing here looks at a figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import discover

pytestmark = pytest.mark.ovs

REPO = Path(__file__).resolve().parent.parent


def test_every_benchmark_runs_in_quick_mode(tmp_path: Path):
    names = list(discover())
    assert names, "no benchmark registered"
    # One process per benchmark, side by side: every run names its namespaces and OVS
    # instances uniquely, so they cannot collide (and the suite stays well under 30 s).
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bench.run", "--quick", "--only", name,
             "--out", str(tmp_path / name)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in names
    }
    outputs = {name: p.communicate(timeout=180)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
        data = json.loads((tmp_path / name / "benchmarks.json").read_text())
        assert data["quick"] is True
        assert data["machine"]["ovs_version"] and data["machine"]["cores"]
        (entry,) = data["benchmarks"]
        assert entry["name"] == name and entry["error"] is None
        assert entry["rows"], f"{name} returned no figures"
        for row in entry["rows"]:
            assert row["figure"] and "socknet" in row and "baseline" in row
        text = (tmp_path / name / "benchmarks.md").read_text()
        assert text.startswith("# socknet benchmarks") and entry["title"] in text


def test_a_failing_benchmark_is_reported_and_cleaned_up(tmp_path: Path, monkeypatch):
    """A benchmark that raises gets its error in the report; its cleanups still run."""
    from bench import core, run

    cleaned = []

    @core.benchmark("zz_failing", title="always fails", order=10_000)
    def failing(ctx: core.Context) -> list[core.Row]:
        ctx.defer(cleaned.append, "done")
        raise RuntimeError("boom")

    try:
        janitor = run.Janitor(tmp_path / "work", state_dir=tmp_path / "state")
        entry = run.run_one(core.REGISTRY["zz_failing"], tmp_path / "work", quick=True,
                            janitor=janitor)
        janitor.sweep_own()
    finally:
        core.REGISTRY.pop("zz_failing", None)
    assert cleaned == ["done"]
    assert "RuntimeError: boom" in str(entry["error"]) and entry["rows"] == []
    assert not (tmp_path / "work" / "zz_failing").exists()
