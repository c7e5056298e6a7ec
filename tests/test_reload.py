"""controller.reload without OVS: which file events reload (and how soon), refusals keep
the running policy, the collector is paused only while loading. No wall-clock
assertions: waits are bounded only so a broken watcher fails instead of hanging."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from controller import reload as reload_mod
from controller.reload import PolicyReloader, gc_paused
from controller.runtime import Controller, Stats
from labs.waiting import eventually
from topology.policy import Policy

GOOD = """\
tiers:
  a: {cidrs: [10.0.1.0/24]}
  b: {cidrs: [10.0.2.0/24]}
policy:
  default: deny
  rules:
    - {name: ab, from: a, to: b, tcp: [80]}
"""
OTHER = GOOD.replace("[80]", "[81]")
FAILING_TEST = GOOD + "tests:\n  - {from: 10.0.1.5, to: 10.0.2.5, tcp: 81, expect: allow}\n"


class FakeController:
    """What PolicyReloader uses of a Controller."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.policy: Policy | None = None
        self.applied: list[Policy] = []
        self.changed = threading.Event()

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.stats.policy_generation += 1
        self.applied.append(policy)
        self.changed.set()



@pytest.fixture
def reloader(tmp_path: Path) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    fake = FakeController()
    r = PolicyReloader(path, cast(Controller, fake))
    assert r.reload("start")
    yield r, fake, path
    r.stop()


def _save_like_an_editor(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_rename_into_place_reloads_without_debounce(reloader: Any,
                                                    monkeypatch: pytest.MonkeyPatch):
    r, fake, path = reloader
    delays: list[tuple[str, float]] = []
    real_soon = r._soon

    def soon(reason: str, delay: float = reload_mod.DEBOUNCE_S) -> None:
        delays.append((reason, delay))
        real_soon(reason, delay)

    monkeypatch.setattr(r, "_soon", soon)
    r.watch()
    fake.changed.clear()
    _save_like_an_editor(path, OTHER)
    assert eventually(lambda: len(fake.applied) == 2)
    assert ("file moved", 0.0) in delays
    assert "81" in str(fake.applied[-1].rules[-1].services)


def test_in_place_write_reloads_once_complete(reloader: Any):
    r, fake, path = reloader
    r.watch()
    path.write_text(OTHER)  # open, truncate, write, close: modified ... closed
    assert eventually(lambda: len(fake.applied) == 2)
    assert fake.stats.reloads_ok == 2 and fake.stats.reloads_refused == 0


def test_refused_files_keep_the_running_policy(reloader: Any):
    r, fake, path = reloader
    running = fake.policy
    path.write_text("tiers: {a: {cidrs: [10.0.0.0/33]}}\n")
    assert not r.reload("test")
    path.write_text(FAILING_TEST)
    assert not r.reload("test")
    assert fake.policy is running and fake.stats.reloads_refused == 2
    path.write_text(GOOD)
    assert r.reload("test") and len(fake.applied) == 1  # unchanged: not applied again


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_restores_the_collector_state(enabled: bool):
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), gc_paused():
            raise RuntimeError("boom")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
