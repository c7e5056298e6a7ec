"""What the operator sees, with real packets on real OVS (the one-host lab): a port with
no role and a spoofed source each show as a `problem:`/drop counter in `socknet status`,
a drop counter in the metrics and a `dropped` event naming port, container and reason;
ports coming and going are logged by name, role and container; `status` run outside
the lab host's namespace says so; `make lab-up` (with and without POLICY=) prints
hints that work as printed."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from labs import netns as nsl
from labs.lab import SocketLab
from labs.pkt import send_frame

pytestmark = pytest.mark.ovs

REPO = Path(__file__).resolve().parent.parent
BROADCAST = "ff:ff:ff:ff:ff:ff"


def eventually(pred: Callable[[], Any], timeout_s: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketLab]:
    lab = SocketLab(f"o{secrets.token_hex(2)}", tmp_path_factory.mktemp("oplab"))
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def events(lab: SocketLab, name: str, after: int = 0, **fields: Any) -> list[dict[str, Any]]:
    return [e for e in lab.log_events()[after:]
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]


def scrape(lab: SocketLab) -> str:
    code = ("import urllib.request;"
            f"print(urllib.request.urlopen({lab.metrics_url!r}, timeout=10).read().decode())")
    res = nsl.run(lab.host, [sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    return res.stdout


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in the metrics")


def status(lab: SocketLab) -> tuple[int, str, dict[str, Any]]:
    text = lab.socknet("status", check=False)
    data = json.loads(lab.socknet("status", "--json", check=False).stdout)
    return text.returncode, text.stdout, data


def dropped(data: dict[str, Any], bridge: str, reason: str) -> int:
    return int(data["bridges"][bridge]["drops"][reason]["packets"])


def connected(lab: SocketLab) -> bool:
    _, _, data = status(lab)
    return all(c["connected"] for b in data["bridges"].values() for c in b["controllers"])


def test_a_port_without_a_role(lab: SocketLab) -> None:
    eventually(lambda: connected(lab), 20.0, "OVS to report the controller connected")
    ns, port = f"{lab.prefix}q", "veth999i0"
    mark = len(lab.log_events())
    before = dropped(status(lab)[2], "vmbr0", "no_role")
    metric_before = metric(scrape(lab), "socknet_dropped_packets_total", bridge="vmbr0",
                           reason="no_role")
    nsl.create_netns(ns)
    try:
        nsl.add_veth(port, "eth0", lab.host, ns)
        nsl.disable_ipv6(ns)
        nsl.add_addr(ns, "eth0", "10.0.0.99/24")
        lab.ovs.add_port("vmbr0", port)
        [added] = eventually(lambda: events(lab, "port_added", mark, port=port), 10.0,
                             "port_added")
        assert (added["level"], added["role"], added["container"]) == ("warning", "unknown", 999)
        assert "neither privacy_ids 100-199 nor service_ids 200-299" in added["dropped"]
        frame = bytes(Ether(src="02:00:00:00:09:99", dst=BROADCAST)
                      / IP(src="10.0.0.99", dst="10.0.0.255") / UDP(dport=9))
        send_frame(ns, "eth0", frame, count=5, interval=0.02)
        # the event names port, container and reason
        seen = eventually(lambda: events(lab, "dropped", mark, port=port,
                                         eth_src="02:00:00:00:09:99"), 10.0, "dropped")
        assert (seen[0]["reason"], seen[0]["container"], seen[0]["role"]) == (
            "no_role", 999, "unknown")
        # status: a problem (exit 1) and the drop counter
        code, text, data = status(lab)
        assert code == 1
        assert (f"problem: bridge vmbr0: port {port} has no role, its packets are dropped "
                "(container 999 is in neither privacy_ids 100-199 nor service_ids 200-299)"
                in text.splitlines())
        assert dropped(data, "vmbr0", "no_role") >= before + 5
        lines = text.splitlines()
        vmbr0 = next(i for i, ln in enumerate(lines) if ln.startswith("bridge vmbr0 "))
        line = next(ln for ln in lines[vmbr0:] if ln.strip().startswith("no_role"))
        assert int(line.split()[1]) >= before + 5
        # and the metric
        assert metric(scrape(lab), "socknet_dropped_packets_total", bridge="vmbr0",
                      reason="no_role") >= metric_before + 5
    finally:
        lab.ovs.vsctl("--if-exists", "del-port", "vmbr0", port)
        nsl.delete_netns(ns, kill_procs=True)
    [gone] = eventually(lambda: events(lab, "port_removed", mark, port=port), 10.0,
                        "port_removed")
    assert (gone["bridge"], gone["role"], gone["container"]) == ("vmbr0", "unknown", 999)
    eventually(lambda: status(lab)[0] == 0, 15.0, "status to be clean again")


def test_a_spoofed_source(lab: SocketLab) -> None:
    c = lab.containers
    mark = len(lab.log_events())
    before = dropped(status(lab)[2], "vmbr0", "spoofed_source")
    # container 200 sends with container 100's addresses
    frame = bytes(Ether(src=c[100].mac, dst=BROADCAST) / IP(src=c[100].ip, dst="10.0.0.255")
                  / UDP(dport=9))
    send_frame(c[200].ns, "eth0", frame, count=4, interval=0.02)
    seen = eventually(lambda: events(lab, "dropped", mark, reason="spoofed_source"), 10.0,
                      "dropped")
    first = seen[0]
    assert (first["port"], first["container"], first["role"]) == ("veth200i0", 200, "service")
    assert (first["eth_src"], first["ip"]) == (c[100].mac, c[100].ip)
    assert c[200].mac in first["why"]
    assert len(seen) <= 5  # rate-limited: at most the burst for one port and reason
    data = eventually(lambda: (d := status(lab)[2]) and
                      dropped(d, "vmbr0", "spoofed_source") >= before + 4 and d, 10.0,
                      "the spoofed_source counter")
    assert dropped(data, "vmbr0", "kill_switch") == 0
    assert metric(scrape(lab), "socknet_dropped_packets_total", bridge="vmbr0",
                  reason="spoofed_source") >= before + 4
    assert metric(scrape(lab), "socknet_dropped_logged_total") >= 1


def test_status_in_another_network_namespace_says_so(lab: SocketLab) -> None:
    """Run where ovs-vswitchd is not (the root namespace): every port would look missing."""
    res = subprocess.run([sys.executable, "-m", "controller.cli", "status", "-c",
                          str(lab.config_path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res.stdout + res.stderr
    problems = [ln for ln in res.stdout.splitlines() if ln.startswith("problem: ")]
    assert problems[0].startswith("problem: wrong network namespace: OVSDB at "), problems
    assert f"ip netns exec {lab.host} socknet status" in problems[0]
    inside = lab.socknet("status", check=False).stdout
    assert "wrong network namespace" not in inside


# ------------------------------------------------------------------ make lab-up


def _lab_cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labs.lab", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "SOCKNET_LAB_DIR": str(state)})


def _run_hint(line: str) -> subprocess.CompletedProcess[str]:
    command = line.split(":", 1)[1].split("  (")[0].strip()
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("policy", [None, "examples/pmoves-tiers.yaml"], ids=["plain", "policy"])
def test_lab_up_prints_hints_that_work(tmp_path: Path, policy: str | None) -> None:
    prefix = f"u{secrets.token_hex(2)}"
    args = ["up", "--prefix", prefix, *(["--policy", policy] if policy else [])]
    try:
        up = _lab_cli(tmp_path, *args)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Traceback" not in up.stderr and "Warning" not in up.stderr, up.stderr
        lines = [ln.strip() for ln in up.stdout.splitlines()]
        hint = {ln.split(":", 1)[0]: ln for ln in lines if ln.split(":", 1)[0] in
                ("flows", "status", "metrics")}
        assert set(hint) == {"flows", "status", "metrics"}, up.stdout
        assert "controller.cli" not in up.stdout
        metrics = _run_hint(hint["metrics"])
        assert metrics.returncode == 0 and "socknet_switch_connected" in metrics.stdout
        res = eventually(lambda: (r := _run_hint(hint["status"])).returncode == 0 and r, 30.0,
                         "the printed status command to report all well")
        if policy:
            assert "policy lab up" in up.stdout
            assert any(ln.startswith("container 200: 172.30.1.10 (tier api)") for ln in lines)
            assert "policy rules (packets / bytes decided" in res.stdout
            assert "monitoring-scrape" in res.stdout
    finally:
        down = _lab_cli(tmp_path, "down")
    assert down.returncode == 0 and "lab down" in down.stdout, down.stdout + down.stderr
    assert not [n for n in nsl.list_netns() if n.startswith(prefix)]
