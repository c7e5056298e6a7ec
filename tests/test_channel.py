"""The OpenFlow channel against a local process, on real OVS (docs/security.md, "The
OpenFlow channel (local process)").

The lab opts into plain tcp (``insecure_tcp: true``): that is where a local process can
reach the listener at all (with the default ssl: it cannot complete the handshake:
tests/test_pki.py). The impostor is `labs.ofpeer`, run in the lab's host namespace.

- a connection announcing vmbr0's datapath id while the switch is connected is refused
  (``dpid_conflict``); the switch keeps its session: a policy change after the
  impostor has left reaches it;
- a connection that no longer answers is replaced, and the newcomer is read in full;
- malformed lengths (zero-length port in PORT_DESC, zero-length flow-stats and meter
  entries, a header shorter than itself, a port running past its message) close the
  connection with a log line; the controller's memory stays flat and it goes on
  serving the switch;
- what the operator sees: a second ``socknet run`` names the taken address in one line
  (exit 2); audits log no expected OpenFlow errors and no no-op ``reconciled`` lines
  at info; a real error names the bridge, type, code and the flow.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import struct
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from labs import netns as nsl
from labs.lab import _env
from labs.policy_lab import PolicyLab
from labs.waiting import eventually
from topology.pipeline import METER_RATES

pytestmark = pytest.mark.ovs

EDGE, APP, DB = 200, 201, 202
SERVICES = {EDGE: "10.10.0.10", APP: "10.20.0.10", DB: "10.30.0.10"}
EDGE_APP = "    - {name: edge-app, from: edge, to: app, tcp: [3000]}\n"
POLICY = f"""\
tiers:
  edge: {{cidrs: [10.10.0.0/24]}}
  app:  {{cidrs: [10.20.0.0/24], internal: true}}
  db:   {{cidrs: [10.30.0.0/24], internal: true}}
policy:
  default: deny
  rules:
{EDGE_APP}    - {{name: app-db, from: app, to: db, tcp: [5432]}}
"""
RULE_FLOW = re.compile(r"tp_dst=3000\b")  # the edge-app rule's port clause
HEADER = struct.Struct("!BBHI")
RSS_GROWTH_MB = 25  # os-ken's loop grew the process by ~40 MB a second


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyLab]:
    lab = PolicyLab(f"c{secrets.token_hex(2)}", tmp_path_factory.mktemp("chan"), POLICY,
                    SERVICES, insecure_tcp=True)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def controller(lab: PolicyLab) -> Iterator[PolicyLab]:
    """The lab with its controller running (restarted if a test left it dead)."""
    if lab.controller is None or lab.controller.poll() is not None:
        lab.start_controller()
    yield lab


def events(lab: PolicyLab, after: int, name: str) -> list[dict[str, Any]]:
    return [e for e in lab.log_events()[after:] if e.get("event") == name]


def dpid(lab: PolicyLab, bridge: str) -> int:
    return int(lab.ovs.vsctl("get", "Bridge", bridge, "datapath_id").strip().strip('"'), 16)


def ofpeer(lab: PolicyLab, *args: str, hold: float = 6.0) -> dict[str, Any]:
    argv = [sys.executable, "-m", "labs.ofpeer", "--controller",
            f"127.0.0.1:{lab.controller_port}", "--hold", str(hold), *args]
    res = nsl.run(lab.host, argv, env=_env(), timeout=hold + 30)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def rss_mb(lab: PolicyLab) -> float:
    assert lab.controller is not None
    status = open(f"/proc/{lab.controller.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def rule_installed(lab: PolicyLab) -> bool:
    return any(RULE_FLOW.search(f) for f in lab.flows("vmbr0"))


def policy_change_reaches_the_switch(lab: PolicyLab) -> None:
    """Toggle the edge-app rule in the policy file; the switch's flows follow."""
    want = not rule_installed(lab)
    mark = len(lab.log_events())
    lab.write_policy(POLICY if want else POLICY.replace(EDGE_APP, ""))
    assert eventually(lambda: events(lab, mark, "policy_reloaded"), 15.0), "not reloaded"
    assert eventually(lambda: rule_installed(lab) == want, 15.0), (
        f"policy change (edge-app {'added' if want else 'removed'}) never reached vmbr0")


# ------------------------------------------------------------------ datapath id conflicts

def test_impostor_announcing_vmbr0_is_refused_and_reloads_still_reach_the_switch(
        controller: PolicyLab) -> None:
    lab = controller
    mark = len(lab.log_events())
    got = ofpeer(lab, "--dpid", hex(dpid(lab, "vmbr0")), hold=8.0)
    assert got["handshake"], got
    assert got["closed"] is not None, f"the impostor kept its connection: {got}"
    assert "multipart_request:1" not in got["rx"], "the impostor was asked for flows"
    (conflict,) = events(lab, mark, "dpid_conflict")
    assert conflict["bridge"] == "vmbr0" and conflict["level"] == "warning"
    assert "in place and answers" in str(conflict["reason"])
    assert conflict["refused"] != conflict["kept"]
    assert not [e for e in events(lab, mark, "switch_connected") if e.get("bridge") == "vmbr0"]
    # the impostor has left: the real switch still gets every change
    policy_change_reaches_the_switch(lab)
    policy_change_reaches_the_switch(lab)


def _take_over_vmbr0(lab: PolicyLab, *args: str) -> tuple[int, dict[str, Any]]:
    """ovs-vswitchd hangs (SIGSTOP): a newcomer announcing vmbr0's id replaces the
    connection that no longer answers. Returns the log mark and what the newcomer saw."""
    vmbr0 = dpid(lab, "vmbr0")
    pid = lab.ovs.vswitchd_pid
    assert pid is not None
    mark = len(lab.log_events())
    os.kill(pid, signal.SIGSTOP)
    try:
        got = ofpeer(lab, "--dpid", hex(vmbr0), *args, hold=15.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    return mark, got


def _switch_back(lab: PolicyLab, mark: int) -> None:
    """The newcomer has left; the real switch reconnects (its old connection was closed)
    and is read in full."""
    def reconnected_and_read() -> bool:
        evs = lab.log_events()[mark:]
        fresh = [i for i, e in enumerate(evs) if e.get("event") == "switch_connected"
                 and e.get("bridge") == "vmbr0" and not e.get("replaced")]
        return bool(fresh) and any(
            e.get("event") == "reconciled" and e.get("bridge") == "vmbr0"
            and e.get("read_from_switch") for e in evs[fresh[-1]:])

    assert eventually(reconnected_and_read, 30.0), "vmbr0 never came back"
    policy_change_reaches_the_switch(lab)


def test_a_hung_connection_is_replaced_and_the_newcomer_read_in_full(
        controller: PolicyLab) -> None:
    lab = controller
    mark, got = _take_over_vmbr0(lab, "--until", "multipart_request:1")
    assert got["handshake"] and "multipart_request:1" in got["rx"], got  # flows re-read
    (conflict,) = events(lab, mark, "dpid_conflict")
    assert "did not answer" in str(conflict["reason"]) and conflict["bridge"] == "vmbr0"
    assert any(e.get("replaced") and e.get("bridge") == "vmbr0"
               for e in events(lab, mark, "switch_connected"))
    _switch_back(lab, mark)


def test_a_real_openflow_error_names_bridge_type_code_and_flow(controller: PolicyLab) -> None:
    lab = controller
    # the newcomer refuses the first flow of the bundle: OFPET_BAD_ACTION/BAD_OUT_PORT
    mark, got = _take_over_vmbr0(lab, "--error", "34:2:4", "--until", "bundle_add")
    assert "multipart_request:1" in got["rx"], got
    assert eventually(lambda: events(lab, mark, "reconcile_failed"), 10.0)
    failed = events(lab, mark, "reconcile_failed")[0]
    assert failed["bridge"] == "vmbr0"
    assert (failed["type"], failed["code"]) == ("OFPET_BAD_ACTION", "OFPBAC_BAD_OUT_PORT")
    assert re.match(r"flow cookie=0x[0-9a-f]+,table=\d+,priority=\d+", str(failed["request"]))
    assert "OFPET_BAD_ACTION/OFPBAC_BAD_OUT_PORT for flow cookie=" in str(failed["error"])
    _switch_back(lab, mark)


# ------------------------------------------------------------------ malformed messages

def _port(length: int, props: bytes = b"") -> bytes:
    return struct.pack("!IH2x6s2x16sII", 1, length, b"\x02" * 6, b"p1", 0, 0) + props


def _multipart(mptype: int, body: bytes) -> bytes:
    rest = struct.pack("!HH4x", mptype, 0) + body
    return HEADER.pack(5, 19, 8 + len(rest), 0x77) + rest


FLOW_ENTRY_0 = struct.pack("!HBxIIHHHHH2xQQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0) + \
    struct.pack("!HH4x", 1, 4)
METER_0 = struct.pack("!IH6xIQQII", 1, 0, 0, 0, 0, 0, 0)

MALFORMED = {
    # (ofpeer arguments, what the log line says)
    "port_desc_zero_length_port": (["--body", f"13={_port(0).hex()}"], "port entry of length 0"),
    "port_desc_port_past_its_message": (["--body", f"13={_port(400).hex()}"],
                                        "runs 360 bytes past"),
    "flow_stats_zero_length_entry": (["--send", _multipart(1, FLOW_ENTRY_0).hex()],
                                     "MULTIPART_REPLY FLOW: entry of length 0"),
    "meter_stats_zero_length_entry": (["--send", _multipart(9, METER_0).hex()],
                                      "MULTIPART_REPLY METER: entry of length 0"),
    "header_shorter_than_a_header": (["--send", HEADER.pack(5, 21, 4, 9).hex()],
                                     "below the 8-byte header"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_lengths_close_the_connection_and_memory_stays_flat(
        controller: PolicyLab, case: str) -> None:
    lab = controller
    args, reason = MALFORMED[case]
    before = rss_mb(lab)
    mark = len(lab.log_events())
    got = ofpeer(lab, "--dpid", hex(0x5EED_0000_0000_0001), *args, hold=6.0)
    grown = rss_mb(lab) - before
    if got["closed"] is None:  # os-ken is looping: stop it before it eats the machine
        lab.stop_controller(signal.SIGKILL)
    assert got["closed"] is not None, f"connection still open after 6 s: {got}"
    assert grown < RSS_GROWTH_MB, f"controller grew by {grown:.0f} MB"
    (line,) = events(lab, mark, "openflow_malformed")
    assert reason in str(line["reason"]) and line["action"] == "connection closed"
    assert line["level"] == "warning"
    # and the controller goes on serving the real switch
    policy_change_reaches_the_switch(lab)


# ------------------------------------------------------------------ what the operator sees

def test_a_second_run_names_the_taken_address_in_one_line_and_exits_2(
        controller: PolicyLab, tmp_path: Any) -> None:
    lab = controller
    assert lab.controller is not None
    res = lab.socknet("run", check=False)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "listen_failed" and event["level"] == "error"
    problem = str(event["problem"])
    assert problem.startswith(f"127.0.0.1:{lab.controller_port} (OpenFlow) already in use by "
                              f"pid {lab.controller.pid} (socknet run -c {lab.config_path}")
    assert "127.0.0.1:9464 (metrics) already in use" in problem
    # with metrics off the OpenFlow port is still named, before anything starts
    quiet = tmp_path / "host.yaml"
    quiet.write_text(lab.config_path.read_text() + "metrics: {enabled: false}\n")
    (tmp_path / "policy.yaml").write_text(lab.policy_path.read_text())
    argv = [sys.executable, "-m", "controller.cli", "run", "-c", str(quiet)]
    res = nsl.run(lab.host, argv, env=_env(), timeout=60)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert f"127.0.0.1:{lab.controller_port} (OpenFlow) already in use" in line
    assert "metrics" not in json.loads(line)["problem"] and "started" not in res.stderr


def test_audits_log_no_expected_errors_and_no_noop_lines(controller: PolicyLab) -> None:
    lab = controller
    lab.stop_controller()
    mark = len(lab.log_events())
    lab.start_controller(args=("--audit-interval", "1"))

    def audits() -> list[dict[str, Any]]:
        return [e for e in events(lab, mark, "reconciled")
                if e.get("bridge") == "vmbr0" and e.get("read_from_switch")]

    assert eventually(lambda: len(audits()) >= 3, 20.0)
    # a flow removed behind the controller's back: the next audit puts it back, at info
    victim = next(f for f in lab.flows("vmbr0") if RULE_FLOW.search(f) or "tp_dst=5432" in f)
    lab.ovs.ofctl("--strict", "del-flows", lab.ovs.mgmt("vmbr0"),
                  re.sub(r"\s*actions=.*", "", re.sub(r"cookie=\S+,?\s*", "", victim)))
    assert eventually(lambda: any(e["flow_mods"] for e in audits()), 10.0)
    lab.stop_controller()
    assert events(lab, mark, "openflow_error") == []
    assert events(lab, mark, "meter_failed") == []
    recs = events(lab, mark, "reconciled")
    assert sum(1 for e in recs if e["flow_mods"] == 0) >= 3
    assert all(e["level"] == "debug" for e in recs if e["flow_mods"] == 0)
    assert all(e["level"] == "info" for e in recs if e["flow_mods"] > 0)
    meters = lab.ovs.ofctl("-O", "OpenFlow14", "dump-meters", lab.ovs.mgmt("vmbr0"))
    assert len(re.findall(r"meter=\d+", meters)) == len(METER_RATES)
    lab.start_controller()
