"""Data plane: iperf3 through socknet's vmbr0 pipeline vs one NORMAL flow."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from bench.core import Context, Row, Target, alternate, benchmark
from bench.labkit import make_normal, offload
from labs import netns as nsl
from labs.lab import SocketLab


@benchmark(
    "dataplane",
    title="Data plane: iperf3 between two service containers",
    order=40,
    baseline="the same lab, same OVS settings, no controller and one `actions=NORMAL` flow "
             "per bridge",
    method=(
        "iperf3 from service container 200 to service container 201 on vmbr0. socknet: the "
        "controller's full vmbr0 pipeline (classify, spoof_guard with learn, policy "
        "stages, dispatch, learned service_l2). Both OVS instances run with "
        "`other_config:userspace-tso-enable=true` (set, then ovs-vswitchd restarted; socknet "
        "re-installs its flows, the baseline gets its NORMAL flow back). TSO on: `ethtool -K "
        "tx on tso on gso on` on both veth ends of both containers; TSO off: the same with "
        "off (tx checksum off, as the labs run). TCP: one stream, receiver's rate. UDP: "
        "`iperf3 -u -l 64 -b 0` (as fast as the sender goes, TSO off), packets the receiver "
        "got per second. Each run lasts 4 s, its first second not counted (`iperf3 -O 1`: "
        "slow start, warm-up); 5 rounds a side, alternating socknet/baseline (ABBA), as "
        "single streams on 2 shared cores vary from run to run."
    ),
)
def dataplane(ctx: Context) -> list[Row]:
    labs = {"socknet": ctx.socknet_lab("d"), "baseline": ctx.normal_lab("e")}
    for kind, lab in labs.items():
        _enable_userspace_tso(lab, socknet=kind == "socknet")
        server = nsl.popen(lab.containers[201].ns, ["iperf3", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctx.defer(_stop, server)
    time.sleep(0.3)
    for lab in labs.values():
        c200, c201 = lab.containers[200], lab.containers[201]
        if nsl.run(c200.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", c201.ip]).returncode:
            raise RuntimeError(f"{lab.prefix}: service 200 cannot reach service 201")
    seconds = ctx.pick(4, 1)
    rounds = ctx.n(5, 1)  # single streams on 2 shared cores vary: 5 rounds a side
    ctx.settings.update({"seconds_per_run": seconds, "rounds": rounds,
                         "userspace_tso_enable": True})
    rows = []
    for label, tso, udp in (("TCP, TSO off", False, False), ("TCP, TSO on", True, False),
                            ("UDP 64-byte packets, TSO off", False, True)):
        ctx.log(f"{label}: {rounds} rounds x {seconds} s")
        for lab in labs.values():
            _set_offload(lab, tso)
        s, b = alternate(rounds, lambda _i, udp=udp: _iperf(labs["socknet"], seconds, udp),
                         lambda _i, udp=udp: _iperf(labs["baseline"], seconds, udp))
        if udp:
            rows.append(Row.of(f"{label}: packets received", "pps", s, b,
                               target=Target.ratio_at_least(0.9)))
        else:
            rows.append(Row.of(f"{label}: throughput", "Gbit/s", s, b,
                               target=Target.ratio_at_least(0.9)))
    for lab in labs.values():
        _set_offload(lab, False)
    return rows


def _enable_userspace_tso(lab: SocketLab, *, socknet: bool) -> None:
    lab.ovs.vsctl("set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true")
    before = len(lab.log_events())
    lab.ovs.restart_vswitchd()
    if socknet:
        lab.wait_reconciled(after=before, timeout_s=30)
    else:
        make_normal(lab.ovs)


def _set_offload(lab: SocketLab, on: bool) -> None:
    for vmid in (200, 201):
        c = lab.containers[vmid]
        offload(c.ns, "eth0", on)
        offload(lab.host, c.port, on)


def _iperf(lab: SocketLab, seconds: int, udp: bool) -> float:
    c200, c201 = lab.containers[200], lab.containers[201]
    argv = ["iperf3", "-c", c201.ip, "-t", str(seconds), "-J"]
    if seconds > 1:
        argv += ["-O", "1"]  # the first second (TCP slow start, warm-up) is not counted
    if udp:
        argv += ["-u", "-l", "64", "-b", "0"]
    res = nsl.run(c200.ns, argv, timeout=seconds + 30)
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3 failed: {res.stdout[-500:]} {res.stderr[-500:]}") from exc
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    if udp:
        s = end["sum"]
        return float((s["packets"] - s["lost_packets"]) / s["seconds"])
    return float(end["sum_received"]["bits_per_second"] / 1e9)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
