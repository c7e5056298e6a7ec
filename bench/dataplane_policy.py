"""Data plane with the pmoves example policy (conntrack on every packet) vs NORMAL."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.core import Context, Row, Target, alternate, benchmark
from bench.dataplane import _enable_userspace_tso, _set_offload, _stop
from labs import netns as nsl
from labs.lab import SocketLab

API, DATA = "172.30.1.20", "172.30.4.5"  # an API service and a data store (rule api-data)
PORT = 5432  # the port api-data allows: iperf3 listens there
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pmoves-tiers.yaml"


@benchmark(
    "dataplane_policy",
    title="Data plane with the pmoves example policy (conntrack) vs NORMAL",
    order=45,
    baseline="the same traffic through a lab with one actions=NORMAL flow per bridge",
    method=(
        "iperf3 TCP from an api-tier container (172.30.1.20) to a data-tier container "
        f"(172.30.4.5) on tcp/{PORT}, which `examples/pmoves-tiers.yaml` allows (rule "
        "api-data): every packet goes through spoof_guard, conntrack (zone 2) and the "
        "conjunctive rules of the whole example policy. Userspace TSO enabled on both OVS "
        "instances; TSO on / off on the veths as in the plain data plane benchmark. Rounds "
        "alternate socknet/baseline."
    ),
)
def dataplane_policy(ctx: Context) -> list[Row]:
    from labs.policy_lab import PolicyLab

    prefix = ctx.prefix("q")
    lab = PolicyLab(prefix, ctx.dir(prefix), EXAMPLE.read_text(), {200: API, 201: DATA})
    ctx.defer(lab.down)
    lab.up()
    for vmid in (200, 201):  # the tier subnets are on-link on vmbr0 (the lab routes 10/8 so)
        nsl.add_route(lab.containers[vmid].ns, "172.30.0.0/16", ifname="eth0")
    labs: dict[str, SocketLab] = {"socknet": lab, "baseline": ctx.normal_lab("r")}
    for kind, one in labs.items():
        _enable_userspace_tso(one, socknet=kind == "socknet")
        server = nsl.popen(one.containers[201].ns, ["iperf3", "-s", "-p", str(PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctx.defer(_stop, server)
    time.sleep(0.3)
    seconds, rounds = ctx.pick(3, 1), ctx.n(5, 1)
    rows = []
    for label, tso in (("TCP, TSO off", False), ("TCP, TSO on", True)):
        ctx.log(f"{label}: {rounds} rounds x {seconds} s")
        for one in labs.values():
            _set_offload(one, tso)
        s, b = alternate(rounds, lambda _i: _iperf(labs["socknet"], seconds),
                         lambda _i: _iperf(labs["baseline"], seconds))
        rows.append(Row.of(f"{label}: throughput with policy + conntrack", "Gbit/s", s, b,
                           target=Target.ratio_at_least(0.85)))
    for one in labs.values():
        _set_offload(one, False)
    return rows


def _iperf(lab: SocketLab, seconds: int) -> float:
    c200, c201 = lab.containers[200], lab.containers[201]
    res = nsl.run(c200.ns, ["iperf3", "-c", c201.ip, "-p", str(PORT), "-t", str(seconds),
                            "-J"], timeout=seconds + 30)
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3 failed: {res.stdout[-500:]} {res.stderr[-500:]}") from exc
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"] / 1e9)
