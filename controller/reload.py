"""Policy hot reload: parse, validate, run the policy's tests, then swap.

A file that fails any step is refused and logged; the running policy stays
in force. Triggered by edits to the file (watchdog) and by SIGHUP.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from controller.logs import get_logger
from controller.runtime import Controller
from topology.check import failing_tests
from topology.policy import Policy, PolicyError, load_policy

log = get_logger("socknet.reload")
DEBOUNCE_S = 0.05


def load_checked(path: Path) -> tuple[Policy | None, list[str]]:
    """The policy at ``path`` if it is valid and its tests pass, else the problems."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return None, exc.problems
    failures = failing_tests(policy)
    if failures:
        return None, [f"test failed: {f}" for f in failures]
    return policy, []


class PolicyReloader:
    def __init__(self, path: Path, controller: Controller) -> None:
        self.path = path.resolve()
        self.controller = controller
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._observer: Any = None

    def reload(self, reason: str) -> bool:
        with self._lock:
            started = time.monotonic()
            policy, problems = load_checked(self.path)
            ms = round((time.monotonic() - started) * 1000, 2)
            stats = self.controller.stats
            if policy is None:
                stats.reloads_refused += 1
                log.error("policy_refused", path=str(self.path), reason=reason,
                          problems=problems, kept_generation=stats.policy_generation)
                return False
            if policy.source_digest == getattr(self.controller.policy, "source_digest", None):
                log.info("policy_unchanged", path=str(self.path), reason=reason)
                return True
            self.controller.set_policy(policy)
            stats.reloads_ok += 1
            stats.last_reload_ms = ms
            log.info("policy_reloaded", path=str(self.path), reason=reason,
                     generation=stats.policy_generation, rules=len(policy.rules), check_ms=ms)
            return True

    def _soon(self, reason: str) -> None:
        """Editors write in several steps: act once the burst is over."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(DEBOUNCE_S, self.reload, args=(reason,))
        self._timer.daemon = True
        self._timer.start()

    def watch(self) -> None:
        target = self.path

        class Handler(FileSystemEventHandler):
            def on_any_event(inner_self, event: FileSystemEvent) -> None:  # noqa: N805
                paths = {getattr(event, "src_path", ""), getattr(event, "dest_path", "")}
                if any(p and Path(str(p)).resolve() == target for p in paths):
                    if event.event_type in ("modified", "created", "moved", "closed"):
                        self._soon(f"file {event.event_type}")

        self._observer = Observer()
        self._observer.schedule(Handler(), str(target.parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
