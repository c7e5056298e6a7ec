"""Controller restart under traffic: SIGKILL, restart, count lost packets and flow-mods."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from typing import Any

from bench.core import Context, Row, Target, benchmark
from bench.labkit import file_size, ovs_log_lines, owned_flow, owned_flows, parse_ts, policy_lab
from bench.traffic import UdpStream
from labs import netns as nsl
from labs.lab import SocketLab
from labs.ovs_instance import OvsInstance

RATE_PPS = 1000
_RECEIVED = re.compile(r"vconn\|DBG\|tcp:[^ ]+: received: (OFPT_FLOW_MOD|NXT_FLOW_MOD|"
                       r"OFPT_BUNDLE_ADD_MESSAGE|OFPT_BUNDLE_CONTROL)")
_CONNECTED = re.compile(r"rconn\|INFO\|([^<]+)<->tcp:[^ ]+: connected")
_DROPPED = re.compile(r"rconn\|[A-Z]+\|([^<]+)<->tcp:[^ ]+: (connection closed by peer|"
                      r"connection dropped)")


@benchmark(
    "controller_restart",
    title="Controller restart under traffic (SIGKILL, restart)",
    order=20,
    baseline="none: there is nothing to compare a restart without loss with (n/a)",
    method=(
        f"Sequence-numbered UDP at {RATE_PPS} packets/s flows between two service containers "
        "(`bench.traffic`: the receiver counts every sequence number it never saw). One "
        "second in, the controller is SIGKILLed and started again at once; the traffic "
        "runs on for one second after both bridges report `reconciled`. Flow-mods sent by "
        "the restarted controller come from its `reconciled` log lines; independently OVS "
        "logs every OpenFlow message it receives (`vlog/set vconn:file:dbg`) and the "
        "received OFPT_FLOW_MOD / OFPT_BUNDLE_ADD_MESSAGE are counted; a third check "
        "counts socknet flows on the bridges younger than the kill (`ovs-ofctl dump-flows` "
        "durations). Times from the restarted controller's own log: process spawned -> "
        "`started` (listening) -> `switch_connected` -> `reconciled`; OVS's reconnect "
        "delay (`started` -> the bridge's `connected` in OVS's rconn log) is reported "
        "separately. It is OVS's: after the kill OVS retries after 1 s, then 2 s, 4 s, ... "
        "while nothing listens, even with `max_backoff=1000` (1 s, the least the Controller "
        "table accepts) in the Controller row; verified on a bare OVS 3.1 bridge. A "
        "controller that takes longer than about 1 s to listen again pays the doubling. "
        "Part 1 is the one-host lab of `labs.lab` (no policy). Part 2 is the policy lab "
        "(`labs.policy_lab`) with a generated tier policy of 10k flows (`bench.policygen`: "
        "100 conjunctive rules; the first lets the two containers exchange UDP, so the "
        "traffic crosses the policy stage and conntrack)."
    ),
)
def controller_restart(ctx: Context) -> list[Row]:
    rounds = ctx.n(3, 1)
    rows: list[Row] = []
    if not ctx.quick:  # --quick: the policy part alone runs the same code
        lab = ctx.socknet_lab("r")
        rows += _rounds(ctx, lab, rounds, "lab")
        lab.down()  # one lab at a time: less noise
    n = ctx.pick(10_000, 1000)
    rows += _rounds(ctx, policy_lab(ctx, "k", n), rounds, f"{n // 1000}k-flow policy")
    return rows


def _rounds(ctx: Context, lab: SocketLab, rounds: int, what: str) -> list[Row]:
    lab.ovs.appctl("vlog/set", "vconn:file:dbg")
    c200, c201 = lab.containers[200], lab.containers[201]
    if nsl.run(c200.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", c201.ip]).returncode:
        raise RuntimeError(f"{what}: service 200 cannot reach service 201 before the restart")
    results = []
    for i in range(rounds):
        ctx.log(f"{what}: restart round {i + 1}/{rounds}")

        def kill_and_restart() -> tuple[Callable[[], list[dict[str, Any]]], float]:
            ev_before = len(lab.log_events())
            lab.stop_controller(signal.SIGKILL)
            t_spawn = time.time()
            lab.start_controller(wait=False)
            lab.wait_reconciled(after=ev_before, timeout_s=120)
            return (lambda: lab.log_events()[ev_before:]), t_spawn

        results.append(_restart_round(lab.ovs, ("mesh", "vmbr0"), c200.ns, c201.ns, c201.ip,
                                      kill_and_restart, ctx.pick(1.0, 0.3)))
    return _rows(results, f"{what} ({owned_flows(lab):,} flows)")


# ---------------------------------------------------------------- one round


def _restart_round(ovs: OvsInstance, bridges: tuple[str, ...], src_ns: str, dst_ns: str,
                   dst_ip: str,
                   kill_and_restart: Callable[[], tuple[Callable[[], list[dict[str, Any]]],
                                                        float]],
                   settle_s: float) -> dict[str, float]:
    stream = UdpStream(src_ns, dst_ns, dst_ip, rate=RATE_PPS, seconds=120).start()
    try:
        time.sleep(settle_s)
        log_off = file_size(ovs.vswitchd_log)
        t_kill = time.time()
        new_events, t_spawn = kill_and_restart()
        time.sleep(settle_s)
    finally:
        traffic = stream.stop()
    t_end = time.time()
    evs = new_events()
    started = [parse_ts(e["timestamp"]) for e in evs if e.get("event") == "started"]
    connected = {e.get("bridge"): parse_ts(e["timestamp"]) for e in evs
                 if e.get("event") == "switch_connected"}
    reconciled: dict[Any, dict[str, Any]] = {}
    for e in evs:
        if e.get("event") == "reconciled" and e.get("bridge") not in reconciled:
            reconciled[e.get("bridge")] = e
    if not started or not reconciled:
        raise RuntimeError(f"restarted controller logged no started/reconciled: {evs[:5]}")
    t_started = started[0]
    t_reconciled = max(parse_ts(e["timestamp"]) for e in reconciled.values())
    reconnect_to_reconciled = max(
        parse_ts(e["timestamp"]) - connected.get(b, parse_ts(e["timestamp"]))
        for b, e in reconciled.items())
    ovs_lines = ovs_log_lines(ovs.vswitchd_log, log_off)
    received = [m.group(1) for _, line in ovs_lines if (m := _RECEIVED.search(line))]
    ovs_connected = [t for t, line in ovs_lines if t and _CONNECTED.search(line)]
    ovs_dropped = [t for t, line in ovs_lines if t and _DROPPED.search(line)]
    young = _young_flows(ovs, bridges, t_end - t_kill)
    return {
        "lost": traffic["lost"],
        "sent": traffic["sent"],
        "flow_mods_log": sum(int(e.get("flow_mods", 0)) for e in reconciled.values()),
        "flow_mods_ovs": sum(1 for r in received if r != "OFPT_BUNDLE_CONTROL"),
        "bundle_ctrl_ovs": sum(1 for r in received if r == "OFPT_BUNDLE_CONTROL"),
        "young_flows": young,
        "startup_s": t_started - t_spawn,
        "ovs_reconnect_s": (max(ovs_connected) - t_started) if ovs_connected else float("nan"),
        "reconnect_to_reconciled_s": reconnect_to_reconciled,
        "spawn_to_reconciled_s": t_reconciled - t_spawn,
        "kill_to_ovs_noticed_s": (min(ovs_dropped) - t_kill) if ovs_dropped else float("nan"),
    }


def _young_flows(ovs: OvsInstance, bridges: tuple[str, ...], max_age_s: float) -> int:
    """socknet-owned flows (learned ones excluded) installed less than ``max_age_s`` ago."""
    young = 0
    for br in bridges:
        for line in ovs.dump_flows(br, no_stats=False):
            m = re.search(r"duration=([\d.]+)s", line)
            if m and owned_flow(line):
                young += float(m.group(1)) < max_age_s
    return young



def _rows(results: list[dict[str, float]], what: str) -> list[Row]:
    def col(key: str) -> list[float]:
        return [r[key] for r in results]

    lost_note = (f"per round: {', '.join(str(int(v)) for v in col('lost'))} of "
                 f"{', '.join(str(int(v)) for v in col('sent'))} sent")
    return [
        Row.of(f"{what}: packets lost", "packets", col("lost"), None, stat="max",
               target=Target.equals(0), note=lost_note),
        Row.of(f"{what}: flow-mods sent (controller log)", "", col("flow_mods_log"), None,
               stat="max", target=Target.equals(0)),
        Row.of(f"{what}: flow-mods received (OVS vconn log)", "", col("flow_mods_ovs"), None,
               stat="max", target=Target.equals(0),
               note="OFPT_FLOW_MOD + OFPT_BUNDLE_ADD_MESSAGE; bundle open/commit messages: "
                    f"{int(max(col('bundle_ctrl_ovs')))} (max)"),
        Row.of(f"{what}: flows younger than the kill (OVS flow age)", "", col("young_flows"),
               None, stat="max", target=Target.equals(0)),
        Row.of(f"{what}: switch_connected -> reconciled", "s",
               col("reconnect_to_reconciled_s"), None, target=Target.below(3)),
        Row.of(f"{what}: process spawned -> started (listening)", "s", col("startup_s"), None),
        Row.of(f"{what}: OVS reconnect delay (started -> OVS connected)", "s",
               col("ovs_reconnect_s"), None),
        Row.of(f"{what}: process spawned -> reconciled (total)", "s",
               col("spawn_to_reconciled_s"), None),
    ]
