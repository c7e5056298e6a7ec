"""Shared fixtures: unique ids, network namespaces, private OVS instances, processes.

Tests marked ``@pytest.mark.ovs`` need root, ``ip`` and Open vSwitch; they are
skipped (with the reason) when those are missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Import this checkout's packages even when the venv's editable install predates them.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from labs import netns as nsl  # noqa: E402
from labs.ovs_instance import OvsInstance  # noqa: E402

OVS_BINARIES = ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ovs-ofctl")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _ovs_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, Open vSwitch)"
    missing = [b for b in (*OVS_BINARIES, "ip") if shutil.which(b, path=_SBIN_PATH) is None]
    if missing:
        return f"Open vSwitch / iproute2 tools not installed: {', '.join(missing)}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _ovs_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "ovs" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def uid() -> str:
    """Six hex chars, unique per test: keeps names like f"sn{uid}h1" within 15 chars."""
    return secrets.token_hex(3)


@pytest.fixture
def netns_factory(uid: str) -> Iterator[Callable[..., str]]:
    """``make(tag="") -> name``: create a namespace ``sn<uid><tag>``; all deleted at teardown.

    Teardown kills processes left inside the namespaces, then deletes them.
    """
    created: list[str] = []

    def make(tag: str = "") -> str:
        name = f"sn{uid}{tag or len(created)}"
        nsl.create_netns(name)
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            nsl.delete_netns(name, kill_procs=True)


@pytest.fixture
def ovs_factory(
    tmp_path_factory: pytest.TempPathFactory, uid: str, netns_factory: Callable[..., str]
) -> Iterator[Callable[..., OvsInstance]]:
    """``make(netns=None, name=None, start=True) -> OvsInstance``; all stopped at teardown.

    Depends on ``netns_factory`` so that OVS stops before its namespaces are deleted.
    """
    instances: list[OvsInstance] = []
    base = tmp_path_factory.mktemp(f"ovs{uid}")

    def make(netns: str | None = None, name: str | None = None, start: bool = True) -> OvsInstance:
        label = name or netns or f"ovs{len(instances)}"
        inst = OvsInstance(label, Path(base) / f"{label}-{len(instances)}", netns=netns)
        instances.append(inst)
        if start:
            inst.start()
        return inst

    try:
        yield make
    finally:
        for inst in reversed(instances):
            inst.stop()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Append every Popen a test starts; still-running ones are terminated at teardown."""
    started: list[subprocess.Popen[Any]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2)
