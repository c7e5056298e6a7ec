"""labs/mininet_socket.py end to end, as CI runs it: real Mininet, real OVS, real pings.

The topology runs in a subprocess (``python -m labs.mininet_socket --check --json``),
exactly as ``make mininet`` does. Whatever happens (failure, timeout, a killed run),
``--clean`` runs afterwards and the test checks that the machine is as it found it:
the system OVS bridges, its daemons, the network devices, the processes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labs import mininet_socket as mns
from topology.config import parse_host_config
from topology.roles import Role, classify_port

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 120


def _mininet_skip_reason() -> str | None:
    """None if mininet imports (installing the Debian package once if it is missing)."""
    probe = [sys.executable, "-c", "from labs.mininet_socket import import_mininet; "
             "import_mininet()"]

    def importable() -> subprocess.CompletedProcess[str]:
        return subprocess.run(probe, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)

    res = importable()
    if res.returncode == 0:
        return None
    if shutil.which("apt-get") is None:
        return f"mininet is not installed and there is no apt-get: {res.stderr.strip()[-300:]}"
    inst = subprocess.run(["apt-get", "install", "-y", "-qq", "mininet"], capture_output=True,
                          text=True, timeout=600,
                          env={"DEBIAN_FRONTEND": "noninteractive", "PATH": mns.SBIN_PATH})
    res = importable()
    if res.returncode == 0:
        return None
    return ("mininet cannot be installed (apt-get install mininet: "
            f"{(inst.stderr or inst.stdout).strip()[-300:]})")


@pytest.fixture(scope="module")
def mininet_ready() -> None:
    reason = _mininet_skip_reason()
    if reason is not None:
        pytest.skip(reason)


def _processes(workdir: Path) -> list[str]:
    """Processes of a run in ``workdir``: Mininet shells, its socknet, OVS daemons on its db."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmd or any(f"mininet:{n}" in cmd for n in (
                "c100", "c102", "c200", "c201", "mpeer", "warp", "inet", "mesh", "vmbr0",
                "socknet")):
            found.append(f"{proc.name}: {cmd.strip()}")
    return found


def _machine() -> dict[str, Any]:
    """What a run may change: system OVS daemons and bridges, the root namespace's devices."""
    names = (*mns.ROOT_LINKS, *mns.BRIDGES, "ovs-netdev")
    bridges = None
    if mns.ovsdb_answers():
        bridges = sorted(mns._vsctl("--no-wait", "list-br", check=False).split())
    return {
        "daemons": {d: mns.daemon_pid(d) for d in mns.OVS_DAEMONS},
        "ovs_rundir": mns.OVS_RUNDIR.exists(),
        "bridges": bridges,
        "devices": sorted(n for n in names if mns._link_exists(n)),
    }


def _clean(workdir: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "labs.mininet_socket", "--clean",
                          "--workdir", str(workdir)], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    return res.stdout + res.stderr


def _assert_as_before(before: dict[str, Any], workdir: Path) -> None:
    after = _machine()
    assert after == before, f"the run left changes behind:\nbefore {before}\nafter  {after}"
    assert _processes(workdir) == []
    assert not (workdir / "state.json").exists()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "mininet"


# --------------------------------------------------------------------------- no root needed


def test_generated_host_yaml_gives_every_mininet_port_its_role():
    cfg = parse_host_config(mns.host_config_text(6653, 9464), "<mininet host.yaml>")
    assert cfg.datapath_type == "netdev"
    assert cfg.ovsdb == "unix:/var/run/openvswitch/db.sock"
    assert cfg.controller.ovs_target == "tcp:127.0.0.1:6653"
    expect = {
        (mns.MESH, mns.UPLINK): Role.MESH_UPLINK,
        (mns.MESH, mns.TO_SOCKET): Role.TO_SOCKET,
        (mns.SOCKET, mns.FROM_MESH): Role.FROM_MESH,
        (mns.SOCKET, mns.WARP): Role.WARP,
        **{(mns.SOCKET, mns.port_name(v)): Role.PRIVACY for v in mns.PRIVACY_IDS},
        **{(mns.SOCKET, mns.port_name(v)): Role.SERVICE for v in mns.SERVICE_IDS},
    }
    assert {k: classify_port(cfg, *k).role for k in expect} == expect
    assert sorted(n for _, n in expect) == sorted(mns.ROOT_LINKS)
    assert all(len(n) <= 15 for n in (*mns.ROOT_LINKS, *mns.BRIDGES))


# --------------------------------------------------------------------------- real Mininet


@pytest.mark.ovs
def test_mininet_socket_network_verdicts(mininet_ready, workdir):
    before = _machine()
    try:
        res = subprocess.run([sys.executable, "-m", "labs.mininet_socket", "--check", "--json",
                              "--workdir", str(workdir)], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=RUN_TIMEOUT_S)
    finally:
        cleaned = _clean(workdir)  # a run killed by the timeout cannot tear itself down
    lines = res.stdout.strip().splitlines()
    assert lines, f"no output (rc {res.returncode}): {res.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert out["error"] is None, f"{out['error']}\n{res.stderr[-3000:]}"
    got = {(v["what"], v["src"], v["dst"]): v["got"] for v in out["verdicts"]}
    failed = [v for v in out["verdicts"] if not v["ok"]]
    assert not failed, f"verdicts not as expected: {failed}\nflows: {out.get('flows')}"
    assert got == {
        ("service -> service", "c200", "10.0.0.201"): "pass",
        ("service -> service", "c201", "10.0.0.200"): "pass",
        ("service -> mesh", "c200", "10.0.0.210"): "pass",
        ("mesh -> service", "mpeer", "10.0.0.201"): "pass",
        ("privacy -> WARP", "c100", "10.0.0.1"): "pass",
        ("privacy -> internet via WARP", "c102", "198.18.0.2"): "pass",
        ("privacy -> service", "c100", "10.0.0.200"): "drop",
        ("privacy -> service", "c102", "10.0.0.201"): "drop",
        ("service -> privacy", "c200", "10.0.0.100"): "drop",
        ("service -> WARP", "c201", "10.0.0.1"): "drop",
    }
    assert res.returncode == 0
    # the run tore itself down: --clean found nothing left to remove
    assert "removed: nothing" in cleaned, cleaned
    _assert_as_before(before, workdir)


@pytest.mark.ovs
def test_killed_run_is_cleaned_up(mininet_ready, workdir):
    """SIGKILL in the middle of a run (no teardown at all): --clean removes all it made."""
    before = _machine()
    proc = subprocess.Popen([sys.executable, "-m", "labs.mininet_socket", "--check",
                             "--workdir", str(workdir)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        state = workdir / "state.json"
        while time.monotonic() < deadline and proc.poll() is None:
            # up to the pings: bridges, Mininet hosts, socknet and its flows exist
            if state.exists() and (workdir / "controller.log").exists():
                log = (workdir / "controller.log").read_text()
                if '"bridge": "vmbr0"' in log and '"event": "reconciled"' in log:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        during = _machine()
        assert set(mns.BRIDGES) <= set(during["bridges"] or [])
        assert _processes(workdir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        cleaned = _clean(workdir)
    assert "bridge mesh" in cleaned and "bridge vmbr0" in cleaned, cleaned
    _assert_as_before(before, workdir)
