"""Policy hot reload: parse, validate, run the policy's tests, then swap.

A file that fails any step is refused and logged; the running policy stays
in force. Triggered by edits to the file (watchdog) and by SIGHUP.

A file renamed into place (how editors and config tools save) or closed after
writing is complete: it is reloaded at once. Other writes (``modified``,
``created``) may come in a burst of partial writes and wait for DEBOUNCE_S of
quiet first.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator
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
# the file is complete when these arrive: renamed into place, or closed after writing
COMPLETE_EVENTS = frozenset({"moved", "closed"})
PARTIAL_EVENTS = frozenset({"modified", "created"})


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: parsing a large policy file builds a YAML
    node tree of ~100k short-lived, acyclic objects that the collector would otherwise
    promote until they trigger a full collection of the whole heap (some 100 ms in a
    controller holding a 10k-flow policy) in the middle of the reload. Refcounting
    frees them as usual; anything cyclic waits for the next collection after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_checked(path: Path) -> tuple[Policy | None, list[str]]:
    """The policy at ``path`` if it is valid and its tests pass, else the problems.

    Never raises: whatever the file holds, the running controller refuses it and keeps
    its policy. A file the checks should have refused but that breaks something later
    (a bug) is refused too, with the error and the traceback in the log."""
    try:
        policy = load_policy(path)
        failures = failing_tests(policy)
    except PolicyError as exc:
        return None, exc.problems
    except Exception as exc:  # noqa: BLE001 - the controller must outlive any file
        log.exception("policy_check_crashed", path=str(path))
        return None, [f"{path}: the check failed ({type(exc).__name__}: {exc}): please "
                      "report this file"]
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

    def reload(self, reason: str, since: float | None = None) -> bool:
        """Load, check and apply the file. ``since``: monotonic time of the file event
        that asked for it (logged as ``waited_ms``)."""
        with self._lock:
            started = time.monotonic()
            with gc_paused():
                policy, problems = load_checked(self.path)
            checked = time.monotonic()
            ms = round((checked - started) * 1000, 2)
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
            waited = {} if since is None else {"waited_ms": round((started - since) * 1000, 2)}
            log.info("policy_reloaded", path=str(self.path), reason=reason,
                     generation=stats.policy_generation, rules=len(policy.rules), check_ms=ms,
                     apply_ms=round((time.monotonic() - checked) * 1000, 2), **waited)
            return True

    def _soon(self, reason: str, delay: float = DEBOUNCE_S) -> None:
        """Reload after ``delay`` s unless another event comes first (editors that write
        in place write in several steps: act once the burst is over)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(delay, self.reload, args=(reason, time.monotonic()))
        self._timer.daemon = True
        self._timer.start()

    def watch(self) -> None:
        target = self.path

        class Handler(FileSystemEventHandler):
            def on_any_event(inner_self, event: FileSystemEvent) -> None:  # noqa: N805
                paths = {getattr(event, "src_path", ""), getattr(event, "dest_path", "")}
                if any(p and Path(str(p)).resolve() == target for p in paths):
                    kind = event.event_type
                    if kind in COMPLETE_EVENTS:
                        self._soon(f"file {kind}", delay=0.0)
                    elif kind in PARTIAL_EVENTS:
                        self._soon(f"file {kind}")

        self._observer = Observer()
        self._observer.schedule(Handler(), str(target.parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
