"""Drops made visible: the reason table, the counters read from flow statistics (one way,
for `socknet status` and the metrics), the `dropped` and port events. No switch needed;
tests/test_operator_lab.py does the same with real packets on real OVS."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from structlog.testing import capture_logs

from controller.metrics import ControllerCollector
from controller.ovsdb import OvsdbSnapshot, status_data
from controller.runtime import Controller, port_changes
from controller.status import format_status, namespace_problem, parse_dump_flows
from controller.switch import InstalledFlow
from topology.config import parse_host_config
from topology.counters import FlowCount, drop_counters, rule_counters
from topology.drops import DROP_REASONS, drop_reason_at, reasons_of
from topology.flows import desired_state
from topology.model import Ct, Output, OutputReg, Resubmit, ToController
from topology.pipeline import METER_DROP, METER_LEARN, METER_RATES, PIPELINES, SOCKET_PIPELINE

HOST = """
host: unit
addresses: learn-first-packet
pve: null
bridges:
  mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}
  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
containers:
  100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
  200: {mac: "02:00:00:00:02:00", ip: 10.0.0.200/24}
"""
PORTS = {"mesh": {"nm-privacy": 1, "to-socket": 2},
         "vmbr0": {"from-mesh": 1, "warp0": 2, "veth100i0": 3, "veth200i0": 4,
                   "veth201i0": 5, "veth999i0": 6}}
DPIDS = {"mesh": 0xA0, "vmbr0": 0xA1}
BRIDGE_OF = {"mesh": "mesh", "socket": "vmbr0"}


def _forwards(f: Any) -> bool:
    return f.goto is not None or any(
        isinstance(a, Output | OutputReg | Resubmit | Ct) for a in f.actions)


# ------------------------------------------------------------------ the reason table


@pytest.mark.parametrize("reason", DROP_REASONS, ids=lambda r: r.name)
def test_every_reason_names_drop_flows_that_exist(reason: Any) -> None:
    """Each point of each reason is a declared table, and the flows found there in a
    desired state all drop (a copy to the controller at most)."""
    cfg = parse_host_config(HOST)
    no_warp = {**PORTS, "vmbr0": {k: v for k, v in PORTS["vmbr0"].items() if k != "warp0"}}
    for point in reason.points:
        assert point.table in {t.name for t in PIPELINES[point.pipeline].tables}
        found = [f for ports in (PORTS, no_warp)
                 for f in desired_state(cfg, ports)[BRIDGE_OF[point.pipeline]]
                 if (f.table, f.priority) == (point.table_number, point.priority)]
        assert found, f"{reason.name}: no flow at {point}"
        assert not [f for f in found if _forwards(f)], f"{reason.name}: {point} forwards"
        assert drop_reason_at(point.pipeline, point.table_number, point.priority) is reason


def test_reason_names_are_unique_and_places_not_shared() -> None:
    names = [r.name for r in DROP_REASONS]
    places = [(p.pipeline, p.table, p.priority) for r in DROP_REASONS for p in r.points]
    assert len(set(names)) == len(names) and len(set(places)) == len(places)
    assert {"no_role", "spoofed_source"} <= set(names)


def test_spoof_drop_sends_a_copy_through_its_own_meter() -> None:
    """The `dropped` event needs a copy; the meter keeps a flood of spoofed frames from
    loading the controller (and from eating the learning meter's budget)."""
    cfg = parse_host_config(HOST)
    t = SOCKET_PIPELINE["spoof_guard"]
    drops = [f for f in desired_state(cfg, PORTS)["vmbr0"]
             if (f.table, f.priority) == (t, 10)
             and ToController(meter=METER_LEARN) not in f.actions]
    assert {f.match_dict["in_port"] for f in drops} == {3, 4}  # the declared containers
    for f in drops:
        assert f.actions == (ToController(meter=METER_DROP),)
    assert METER_DROP in METER_RATES and METER_RATES[METER_DROP] <= 50


# ------------------------------------------------------------------ counters


def test_counters_from_flow_counts() -> None:
    rules_t, classify = SOCKET_PIPELINE["policy_rules"], SOCKET_PIPELINE["classify"]
    counts = [
        FlowCount(rules_t, 1000, 3, 300, rule_id=1),
        FlowCount(rules_t, 999, 2, 200, rule_id=1),
        FlowCount(rules_t, 0, 5, 500, rule_id=0),
        FlowCount(classify, 0, 7, 700),  # no role
        FlowCount(classify, 100, 9, 900),  # a classified port: not a drop
        FlowCount(SOCKET_PIPELINE["spoof_guard"], 10, 4, 400),
    ]
    assert rule_counters(counts) == {1: (5, 500), 0: (5, 500)}
    drops = drop_counters("socket", counts)
    assert drops["no_role"] == (7, 700) and drops["spoofed_source"] == (4, 400)
    assert set(drops) == {r.name for r in reasons_of("socket")}  # zeros listed too
    assert drop_counters("mesh", [FlowCount(0, 0, 2, 120)]) == {"no_role": (2, 120),
                                                              "invalid_source_mac": (0, 0)}


DUMP = "\n".join(" " + line for line in (
    "cookie=0x5c02000000000001, duration=3.5s, table=0, n_packets=12, n_bytes=1008, "
    "priority=0 actions=controller(meter_id=3)",
    "cookie=0x5c02000000000002, duration=3.5s, table=0, n_packets=5, n_bytes=420, "
    "priority=100,in_port=3 actions=load:0x3->NXM_NX_REG0[],learn(table=40,priority=10,"
    "idle_timeout=300,NXM_OF_ETH_DST[]=NXM_OF_ETH_SRC[]),goto_table:10",
    "cookie=0x5c03000000000003, duration=1.0s, table=22, n_packets=3, n_bytes=222, "
    "priority=1000,conj_id=5,ip actions=load:0x3->NXM_NX_REG2[],goto_table:23",
    "cookie=0x5c03000000000004, duration=1.0s, table=22, n_packets=1, n_bytes=60, "
    "priority=0 actions=set_field:0->reg2,goto_table:24",
    "cookie=0x1, duration=1.0s, table=50, n_packets=0, n_bytes=0 actions=NORMAL",
)) + "\n"


def test_ovs_ofctl_dump_parsed_into_the_same_counts() -> None:
    flows = parse_dump_flows(DUMP)
    counts = [f for _, f in flows]
    assert [c.priority for c in counts] == [0, 100, 1000, 0, 32768]  # not learn's priority=10
    assert counts[2].rule_id == 3 and counts[3].rule_id == 0 and counts[1].rule_id is None
    assert rule_counters(counts) == {3: (3, 222), 0: (1, 60)}
    assert drop_counters("socket", counts)["no_role"] == (12, 1008)
    assert flows[4][0] == 1


# ------------------------------------------------------------------ status


def _snapshot(sock_ports: dict[str, int]) -> OvsdbSnapshot:
    return OvsdbSnapshot(
        ports={"mesh": PORTS["mesh"], "vmbr0": sock_ports},
        dpids=DPIDS,
        controllers={b: [("tcp:127.0.0.1:6653", True)] for b in DPIDS},
        fail_modes={b: "secure" for b in DPIDS},
        datapath_types={b: "system" for b in DPIDS})


def test_status_problems_name_roleless_and_missing_configured_ports() -> None:
    cfg = parse_host_config(HOST.replace("warp: warp0", "warp: wrap0"))
    data = status_data(cfg, _snapshot(PORTS["vmbr0"]))
    problems = data["problems"]
    assert ("bridge vmbr0: port wrap0 does not exist or has no ofport "
            "(host.yaml bridges.socket.warp: wrap0)") in problems
    assert any(p.startswith("bridge vmbr0: port warp0 has no role, its packets are dropped")
               for p in problems), problems
    assert ("bridge vmbr0: port veth999i0 has no role, its packets are dropped (container "
            "999 is in neither privacy_ids 100-199 nor service_ids 200-299)") in problems
    good = status_data(parse_host_config(HOST), _snapshot(
        {k: v for k, v in PORTS["vmbr0"].items() if k != "veth999i0"}))
    assert good["problems"] == []


def test_status_text_shows_drops_per_reason() -> None:
    cfg = parse_host_config(HOST)
    data = status_data(cfg, _snapshot(PORTS["vmbr0"]))
    data["bridges"]["vmbr0"]["drops"] = {r.name: {"packets": 0, "bytes": 0}
                                         for r in reasons_of("socket")}
    data["bridges"]["vmbr0"]["drops"]["no_role"] = {"packets": 12, "bytes": 1008}
    text = format_status(data)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("no_role"))
    assert line.split()[1:3] == ["12", "1008"] and "no role" in line
    assert text.splitlines()[-1].startswith("problem: bridge vmbr0: port veth999i0 has no role")


def test_wrong_network_namespace_is_named() -> None:
    cfg = parse_host_config(HOST)
    elsewhere = namespace_problem(cfg, {"mesh": {"nm-zz9q": 1}, "vmbr0": {"veth-zz9q": 2}})
    assert elsewhere is not None and elsewhere.startswith("wrong network namespace")
    assert "nm-zz9q" in elsewhere
    # one of them visible here (every namespace has lo): this is the right one
    assert namespace_problem(cfg, {"mesh": {"nm-zz9q": 1}, "vmbr0": {"lo": 2}}) is None
    assert namespace_problem(cfg, {}) is None


# ------------------------------------------------------------------ events


def _controller() -> Controller:
    ctl = Controller(parse_host_config(HOST))
    ctl.ovsdb_changed(PORTS, DPIDS)
    return ctl


def _packet_in(table: str, in_port: int, frame: bytes) -> Any:
    return SimpleNamespace(match={"in_port": in_port}, data=frame,
                           table_id=SOCKET_PIPELINE[table], cookie=0)


def _udp(mac: str, ip: str) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=ip, dst="10.0.0.255")
                 / UDP(dport=9))


def test_port_changes_are_named_with_role_and_container() -> None:
    assert port_changes({"b": {"x": 1, "y": 2}}, {"b": {"y": 3, "z": 4}}) == [
        ("b", "x", 1, False), ("b", "y", 2, False), ("b", "y", 3, True), ("b", "z", 4, True)]
    ctl = _controller()
    after = {**PORTS, "vmbr0": {**{k: v for k, v in PORTS["vmbr0"].items()
                                   if k != "veth200i0"}, "veth150i0": 9}}
    with capture_logs() as logs:
        ctl.ovsdb_changed(after, DPIDS)
    events = {(e["event"], e["port"]): e for e in logs if e["event"].startswith("port_")}
    gone = events[("port_removed", "veth200i0")]
    assert (gone["bridge"], gone["ofport"], gone["role"], gone["container"]) == (
        "vmbr0", 4, "service", 200)
    new = events[("port_added", "veth150i0")]
    assert (new["ofport"], new["role"], new["container"]) == (9, "privacy", 150)
    assert not any(e["event"] == "ports_removed" for e in logs)


def test_a_roleless_port_added_is_a_warning_saying_why() -> None:
    ctl = Controller(parse_host_config(HOST))
    with capture_logs() as logs:
        ctl.ovsdb_changed(PORTS, DPIDS)
    [odd] = [e for e in logs if e["event"] == "port_added" and e["port"] == "veth999i0"]
    assert odd["log_level"] == "warning" and odd["role"] == "unknown"
    assert odd["container"] == 999 and "neither privacy_ids" in odd["dropped"]


def test_dropped_events_name_port_container_and_reason() -> None:
    ctl = _controller()
    dpid = DPIDS["vmbr0"]
    with capture_logs() as logs:
        # a port with no role: classify's default drop sent a copy
        ctl.packet_in(dpid, _packet_in("classify", 6, _udp("02:00:00:00:09:99", "10.0.0.99")))
        # container 200 sends with container 100's addresses: spoof_guard's drop copy
        ctl.packet_in(dpid, _packet_in("spoof_guard", 4,
                                       _udp("02:00:00:00:01:00", "10.0.0.100")))
        # container 201 (undeclared) says who it is: learned, not a drop
        ctl.packet_in(dpid, _packet_in("spoof_guard", 5, bytes(
            Ether(src="02:00:00:00:02:01", dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc="02:00:00:00:02:01", psrc="10.0.0.201", pdst="10.0.0.1"))))
    dropped = [e for e in logs if e["event"] == "dropped"]
    assert [(e["reason"], e["port"], e["container"], e["role"]) for e in dropped] == [
        ("no_role", "veth999i0", 999, "unknown"),
        ("spoofed_source", "veth200i0", 200, "service")]
    assert dropped[0]["log_level"] == "warning" and "neither privacy_ids" in dropped[0]["why"]
    assert dropped[1]["eth_src"] == "02:00:00:00:01:00" and dropped[1]["ip"] == "10.0.0.100"
    assert "02:00:00:00:02:00" in dropped[1]["why"] and dropped[1]["ethertype"] == "0x0800"
    assert ctl.bindings["veth201i0"].ip == "10.0.0.201"
    assert ctl.stats.dropped_logged == 2


def test_dropped_events_are_rate_limited_per_port_and_reason() -> None:
    ctl = _controller()
    dpid = DPIDS["vmbr0"]
    spoof = _packet_in("spoof_guard", 4, _udp("02:00:00:00:66:66", "10.0.0.66"))
    with capture_logs() as logs:
        for _ in range(100):
            ctl.packet_in(dpid, spoof)
        ctl.packet_in(dpid, _packet_in("classify", 6, _udp("02:00:00:00:09:99", "10.0.0.99")))
        ctl._drop_logs[("veth200i0", "spoofed_source")]._tokens = 1.0
        ctl.packet_in(dpid, spoof)
    lines = [e for e in logs if e["event"] == "dropped"]
    spoofed = [e for e in lines if e["reason"] == "spoofed_source"]
    assert len(spoofed) < 10  # the burst, then about one a second
    assert spoofed[-1]["not_logged_before"] >= 90
    assert [e["port"] for e in lines if e["reason"] == "no_role"] == ["veth999i0"]


# ------------------------------------------------------------------ metrics


class _Session:
    def __init__(self, flows: list[InstalledFlow]) -> None:
        self._flows = flows

    def flows(self) -> list[InstalledFlow]:
        return self._flows


def test_metrics_export_drop_counters_per_bridge_and_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = _controller()
    stats = SimpleNamespace(instructions=[])
    sessions = {
        "vmbr0": _Session([InstalledFlow(0, SOCKET_PIPELINE["classify"], 0, 12, 1008, stats),
                           InstalledFlow(0, SOCKET_PIPELINE["spoof_guard"], 10, 3, 180, stats),
                           InstalledFlow(0, SOCKET_PIPELINE["spoof_guard"], 10, 1, 60, stats)]),
        "mesh": _Session([InstalledFlow(0, 0, 0, 2, 120, stats)]),
    }
    monkeypatch.setattr(ctl, "session_for", lambda bridge: sessions.get(bridge))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in ControllerCollector(ctl).collect() for s in fam.samples}

    def value(name: str, bridge: str, reason: str) -> float:
        return samples[(name, (("bridge", bridge), ("reason", reason)))]

    assert value("socknet_dropped_packets_total", "vmbr0", "no_role") == 12
    assert value("socknet_dropped_bytes_total", "vmbr0", "no_role") == 1008
    assert value("socknet_dropped_packets_total", "vmbr0", "spoofed_source") == 4
    assert value("socknet_dropped_packets_total", "vmbr0", "kill_switch") == 0
    assert value("socknet_dropped_packets_total", "mesh", "no_role") == 2
    assert ("socknet_dropped_logged_total", ()) in samples
