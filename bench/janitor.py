"""Leave nothing behind, even when a run is killed.

Every name prefix a run hands out (`Context.prefix`) is written to
``/run/socknet-bench/<pid>.json`` before anything is created with it. Every
process a benchmark starts (OVS daemons, controllers, iperf3, traffic tools)
runs inside a namespace named with such a prefix, so removing those namespaces
(killing what runs inside first) removes everything. The next run sweeps the
records of runs whose process is gone; a run sweeps its own record at exit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from labs import netns as nsl

STATE_DIR = Path(os.environ.get("SOCKNET_BENCH_STATE", "/run/socknet-bench"))


class Janitor:
    def __init__(self, workdir: Path, state_dir: Path = STATE_DIR) -> None:
        self.state_dir = state_dir
        self.record_path = state_dir / f"{os.getpid()}.json"
        self.workdir = workdir
        self.prefixes: list[str] = []
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write()

    def _write(self) -> None:
        data = {"pid": os.getpid(), "workdir": str(self.workdir), "prefixes": self.prefixes}
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.record_path)

    def record_prefix(self, prefix: str) -> None:
        self.prefixes.append(prefix)
        self._write()

    def sweep_own(self, keep_workdir: bool = False) -> list[str]:
        removed = sweep_prefixes(self.prefixes)
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.record_path.unlink(missing_ok=True)
        return removed


def sweep_prefixes(prefixes: list[str]) -> list[str]:
    """Delete every namespace whose name starts with one of ``prefixes`` (processes
    inside are killed first). Returns the namespaces removed."""
    removed = []
    for ns in nsl.list_netns():
        if any(ns.startswith(p) for p in prefixes):
            nsl.delete_netns(ns, kill_procs=True)
            removed.append(ns)
    return removed


def sweep_stale(state_dir: Path = STATE_DIR) -> list[str]:
    """Clean up after earlier runs that died without cleaning up (their pid is gone)."""
    removed: list[str] = []
    if not state_dir.exists():
        return removed
    for record in state_dir.glob("*.json"):
        try:
            data = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            record.unlink(missing_ok=True)
            continue
        pid = int(data.get("pid", 0))
        if pid and nsl.pid_alive(pid):
            continue
        removed += sweep_prefixes(list(data.get("prefixes", [])))
        if data.get("workdir"):
            shutil.rmtree(data["workdir"], ignore_errors=True)
        record.unlink(missing_ok=True)
    return removed
