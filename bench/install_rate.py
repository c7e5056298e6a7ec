"""Flow install rate through socknet's sender vs `ovs-ofctl --bundle add-flows`."""

from __future__ import annotations

import itertools
import subprocess
import time
from typing import Any

from bench.core import Context, Row, Target, alternate, benchmark, median
from bench.flowgen import forwarding_flows, synthetic_flows
from bench.oflab import OfLab
from bench.traffic import UdpStream
from topology.render import flows_text

FWD = [[1, 2], [2, 1]]
STALL_RATE_PPS = 5000


@benchmark(
    "install_rate",
    title="Flow install rate (one bundle into a fresh netdev bridge)",
    order=30,
    baseline="`ovs-ofctl --bundle add-flows` of the same flows, rendered by "
             "`topology.render.flows_text` (same cookies), into a fresh bridge of the same OVS",
    method=(
        "N distinct classify-style flows (`bench.flowgen`: table 0, in_port + eth_src, "
        "load reg0, goto 1; real socknet cookies). socknet: `bench.ofapp`, i.e. "
        "`apps.socknet_app` + `controller.runtime.Controller.reconcile` (read switch, "
        "`controller.reconcile.plan`, `controller.encode`, `SwitchSession.apply` = one "
        "OpenFlow 1.4 bundle over TCP, streamed in chunks of "
        "`controller.encode.CHUNK_MESSAGES` messages as they are packed) with a cold encode "
        "cache (`encode.cache_clear()`) and flows whose cookies were never computed (new "
        "Flow objects: each cookie's content hash is worked out inside the timed "
        "reconcile); timed from the start of "
        "reconcile to the commit reply. Baseline: wall time of the `ovs-ofctl` process "
        "(parse text + send + commit). Each round uses a new bridge and new flows; the "
        "flow count on the bridge is checked after every round. Forwarding stall: UDP at "
        f"{STALL_RATE_PPS} pps crosses the bridge while 10k flows are installed as one "
        "bundle; the figure is the largest inter-arrival gap at the receiver that starts "
        "between the first message and the commit reply (the noise floor, the largest gap "
        "elsewhere, is in the notes)."
    ),
)
def install_rate(ctx: Context) -> list[Row]:
    lab = OfLab(ctx, "i")
    app = lab.start_app(tag="ofapp")
    seeds = itertools.count(1)
    dpids = itertools.count(0x1000)
    rows: list[Row] = []

    def socknet_install(n: int) -> tuple[float, float]:
        """Cold encode cache into a fresh bridge, then the same flows again into another
        fresh bridge (warm cache: what a reconnect to a wiped switch costs)."""
        seed = next(seeds)
        times = []
        for cold in (True, False):
            dpid = next(dpids)
            name = f"s{dpid:x}"
            lab.add_bridge(name, dpid, controller=True)
            try:
                app.wait_connected(dpid)
                r = app.call({"cmd": "install", "dpid": dpid, "n": n, "seed": seed,
                              "cold": cold})
                _check_count(lab, name, n, r)
                times.append(r["ms"] / 1000.0)
            finally:
                lab.del_bridge(name)
        return times[0], times[1]

    def ofctl_install(n: int) -> float:
        dpid = next(dpids)
        name = f"o{dpid:x}"
        path = lab.dir / f"{name}.flows"
        path.write_text(flows_text(synthetic_flows(n, next(seeds))))
        lab.add_bridge(name, dpid, controller=False)
        try:
            t = time.perf_counter()
            subprocess.run(["ovs-ofctl", "-O", "OpenFlow14", "--bundle", "add-flows",
                            lab.ovs.mgmt(name), str(path)], check=True, capture_output=True,
                           env=lab.ovs.env)
            dt = time.perf_counter() - t
            _check_count(lab, name, n, {})
            return dt
        finally:
            lab.del_bridge(name)
            path.unlink(missing_ok=True)

    rounds = ctx.n(3, 1)
    for n in ctx.pick((10_000, 100_000), (1000,)):
        ctx.log(f"{n} flows x {rounds} rounds")
        s, b = alternate(rounds, lambda _i, n=n: socknet_install(n),
                         lambda _i, n=n: ofctl_install(n))
        cold, warm = [x[0] for x in s], [x[1] for x in s]
        rows.append(Row.of(f"{n:,} flows: install rate", "flows/s", [n / t for t in cold],
                           [n / t for t in b], target=Target.ratio_at_least(0.5)))
        rows.append(Row.of(f"{n:,} flows: install time", "s", cold, b))
        rows.append(Row.of(f"{n:,} flows: install rate, encode cache warm", "flows/s",
                           [n / t for t in warm], [n / t for t in b],
                           note="equal flows again (new Flow objects, so cookies are "
                                "computed again) into a fresh bridge (socknet's per-Flow "
                                "encode cache already holds their bytes)"))

    rows += _stall(ctx, lab, app, seeds, dpids)
    return rows


def _check_count(lab: OfLab, bridge: str, n: int, reply: dict[str, Any]) -> None:
    got = lab.flow_count(bridge)
    if got != n:
        raise RuntimeError(f"{bridge}: {got} flows installed, expected {n} ({reply})")


def _stall(ctx: Context, lab: OfLab, app: Any, seeds: Any, dpids: Any) -> list[Row]:
    n = ctx.pick(10_000, 1000)
    settle_s = ctx.pick(1.0, 0.3)
    a_ns = b_ns = ""

    def one(socknet: bool) -> tuple[float, float, int, float]:
        nonlocal a_ns, b_ns
        dpid = next(dpids)
        name = f"{'s' if socknet else 'o'}{dpid:x}"
        lab.add_bridge(name, dpid, controller=socknet)
        try:
            if not a_ns:
                a_ns, b_ns = lab.add_endpoints(name)
            else:
                lab.ovs.add_port(name, "pa", ofport=1)
                lab.ovs.add_port(name, "pb", ofport=2)
            seed = next(seeds)
            if socknet:
                app.wait_connected(dpid)
                app.call({"cmd": "install", "dpid": dpid, "n": 0, "fwd": FWD})
            else:
                path = lab.dir / f"{name}.flows"
                path.write_text(flows_text(synthetic_flows(n, seed)
                                           + forwarding_flows([(1, 2), (2, 1)])))
                base = lab.dir / f"{name}.base"
                base.write_text(flows_text(forwarding_flows([(1, 2), (2, 1)])))
                lab.ovs.ofctl("add-flows", lab.ovs.mgmt(name), str(base))
            stream = UdpStream(a_ns, b_ns, "10.9.0.2", rate=STALL_RATE_PPS, seconds=30).start()
            try:
                time.sleep(settle_s)
                t0 = time.time()
                if socknet:
                    app.call({"cmd": "install", "dpid": dpid, "n": n, "seed": seed,
                              "fwd": FWD})
                else:
                    subprocess.run(["ovs-ofctl", "-O", "OpenFlow14", "--bundle", "add-flows",
                                    lab.ovs.mgmt(name), str(path)], check=True,
                                   capture_output=True, env=lab.ovs.env)
                t1 = time.time()
                time.sleep(settle_s)
            finally:
                res = stream.stop()
            _check_count(lab, name, n + 2, {})
            gaps = res["recv"]["gaps"]
            inside = [ms for t, ms in gaps if t0 - 0.002 <= t <= t1]
            outside = [ms for t, ms in gaps if not (t0 - 0.002 <= t <= t1)]
            floor = 1000.0 / STALL_RATE_PPS
            return (max(inside, default=floor), max(outside, default=floor), res["lost"],
                    (t1 - t0) * 1000)
        finally:
            lab.del_bridge(name)

    ctx.log(f"forwarding gaps during a {n}-flow install")
    s, b = alternate(ctx.n(3, 1), lambda _i: one(True), lambda _i: one(False))
    ctx.note(f"Forwarding gaps: largest gap outside the install (noise floor), median: "
             f"socknet run {_med([x[1] for x in s]):.1f} ms, ofctl run "
             f"{_med([x[1] for x in b]):.1f} ms; packets lost in those rounds: "
             f"socknet {sum(x[2] for x in s)}, ofctl {sum(x[2] for x in b)}.")
    return [
        Row.of(f"largest forwarding gap while {n:,} flows are installed", "ms",
               [x[0] for x in s], [x[0] for x in b],
               note="socknet streams the bundle for the whole install window (next row), "
                    "competing for the 2 cores with OVS and the traffic tools"),
        Row.of(f"install window for {n:,} flows (first message -> commit reply)", "ms",
               [x[3] for x in s], [x[3] for x in b]),
        Row.of(f"packets lost from the {STALL_RATE_PPS} pps stream (install included)",
               "packets", [x[2] for x in s], [x[2] for x in b], stat="max"),
    ]


def _med(v: list[float]) -> float:
    return median(v) or 0.0
