"""ovs-vswitchd restart under traffic: no denied packet may pass, allowed traffic resumes."""

from __future__ import annotations

import time

from bench.core import Context, Row, Target, benchmark
from bench.labkit import PAIR, events, policy_lab, wait_until
from bench.traffic import UdpStream
from labs.policy_lab import SERVICE_INTERNET_IP

RATE_PPS = 1000


@benchmark(
    "ovs_restart",
    title="ovs-vswitchd restart under allowed and denied traffic",
    order=25,
    baseline="none (n/a): the figure is the gap and whether any denied packet passed",
    method=(
        "A policy lab (about 10k policy flows; containers 200 and 201 may exchange UDP). "
        f"Two sequence-numbered UDP streams at {RATE_PPS} packets/s each: 200 -> 201 on an "
        "allowed port and 200 -> the internet stand-in behind the host's gateway, which the "
        "policy denies. One second in, "
        "ovs-vswitchd is stopped and started again (OVSDB keeps running; the bridges come "
        "back with no flows and fail_mode=secure, so they drop everything until the "
        "controller has reconciled). The allowed stream's gap is the outage; the denied "
        "stream must deliver nothing at any moment. Resume time: vswitchd started -> the "
        "controller's `reconciled` (read_from_switch) for vmbr0."
    ),
)
def ovs_restart(ctx: Context) -> list[Row]:
    lab = policy_lab(ctx, "o", ctx.pick(10_000, 300))
    src, dst = lab.containers[200], lab.containers[201]
    lost, denied_through, gaps, resume = [], [], [], []
    for _ in range(ctx.n(3, 1)):
        ok = UdpStream(src.ns, dst.ns, PAIR[201], port=9999, rate=RATE_PPS, seconds=6.0)
        # the generated policy lets the pair talk, not 200 reach the internet behind the host
        bad = UdpStream(src.ns, lab.gw_ns, SERVICE_INTERNET_IP, port=5999, rate=RATE_PPS,
                        seconds=6.0)
        ok.start()
        bad.start()
        try:
            time.sleep(1.0)
            mark = len(lab.log_events())
            t0 = time.monotonic()
            lab.ovs.restart_vswitchd()
            wait_until(lambda m=mark: any(e.get("bridge") == "vmbr0"
                                          and e.get("read_from_switch")
                                          for e in events(lab, m, "reconciled")),
                       60.0, "reconcile after the vswitchd restart")
            resume.append(time.monotonic() - t0)
            a, d = ok.stop(), bad.stop()
        finally:
            ok.close()
            bad.close()
        lost.append(a["lost"])
        gaps.append(max((ms for _, ms in a["recv"].get("gaps", [])), default=0.0))
        denied_through.append(d["received"])
    return [
        Row.of("denied packets delivered during the restart", "packets", denied_through, None,
               stat="max", target=Target.equals(0)),
        Row.of("allowed packets lost (vswitchd down + reconnect + reinstall)", "packets", lost,
               None, stat="median"),
        Row.of("largest gap in the allowed stream", "ms", gaps, None, stat="median"),
        Row.of("vswitchd restart -> policy reinstalled (reconciled)", "s", resume, None,
               stat="median"),
    ]
