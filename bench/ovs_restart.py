"""ovs-vswitchd restart under traffic: no denied packet may pass, allowed traffic resumes."""

from __future__ import annotations

import time
from typing import Any

from bench.core import Context, Row, Target, benchmark
from bench.labkit import PAIR, events, policy_lab, wait_until
from bench.traffic import UdpStream
from labs.policy_lab import SERVICE_INTERNET_IP, PolicyLab

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
        "policy denies. One second in, ovs-vswitchd is restarted (OVSDB keeps running), two "
        "ways. Plain: stopped and started again; the bridges come back with no flows and "
        "fail_mode=secure, so they drop everything until the controller has reconciled. "
        "ovs-ctl: as `ovs-ctl restart` does on a package upgrade "
        "(`OvsInstance.restart_vswitchd_restoring_flows`): the distribution's ovs-save "
        "writes a script that restores every bridge's flows (cookies included), the new "
        "ovs-vswitchd starts with other_config:flow-restore-wait=true (no packets "
        "processed, no controller connected), the script restores the flows, then "
        "flow-restore-wait is removed. The allowed stream's gap is the outage; the denied "
        "stream must deliver nothing at any moment. Resume time: vswitchd started (ovs-ctl: "
        "flow-restore-wait removed) -> the controller's `reconciled` (read_from_switch) for "
        "vmbr0; flow-mods: what the controller sent in those reconciles."
    ),
)
def ovs_restart(ctx: Context) -> list[Row]:
    lab = policy_lab(ctx, "o", ctx.pick(10_000, 300))
    rows: list[Row] = []
    for how, label in (("plain", "plain restart"),
                       ("ovs-ctl", "ovs-ctl restart (ovs-save, flow-restore-wait)")):
        lost, denied_through, gaps, resume, mods = [], [], [], [], []
        for _ in range(ctx.n(3, 1)):
            r = _one_restart(lab, restore=how == "ovs-ctl")
            lost.append(r["lost"])
            gaps.append(r["gap_ms"])
            denied_through.append(r["denied"])
            resume.append(r["resume_s"])
            mods.append(r["flow_mods"])
        rows += [
            Row.of(f"{label}: denied packets delivered during the restart", "packets",
                   denied_through, None, stat="max", target=Target.equals(0)),
            Row.of(f"{label}: allowed packets lost", "packets", lost, None, stat="median"),
            Row.of(f"{label}: largest gap in the allowed stream", "ms", gaps, None,
                   stat="median"),
            Row.of(f"{label}: -> policy reinstalled (reconciled)", "s", resume, None,
                   stat="median"),
            Row.of(f"{label}: flow-mods the controller sent", "", mods, None, stat="median"),
        ]
    ctx.note("ovs-ctl restart: OVS 3.1 flushes a bridge's flows when its controllers come "
             "back (connmgr_set_controllers flushes whenever the bridge goes from no "
             "controller to some), and flow-restore-wait hides the controllers until it is "
             "removed: the restored flows are dropped at that moment and the controller, "
             "which OVS then connects at once, installs them again (hence as many "
             "flow-mods as a plain restart). Its outage is longer than a plain restart's: "
             "vswitchd processes no packet at all while ovs-ofctl restores the 10k flows "
             "under flow-restore-wait, then the flush-to-reinstall window follows. Both "
             "ways are fail-secure: a drop, never a hole.")
    return rows


def _one_restart(lab: PolicyLab, *, restore: bool) -> dict[str, float]:
    src, dst = lab.containers[200], lab.containers[201]
    ok = UdpStream(src.ns, dst.ns, PAIR[201], port=9999, rate=RATE_PPS, seconds=6.0)
    # the generated policy lets the pair talk, not 200 reach the internet behind the host
    bad = UdpStream(src.ns, lab.gw_ns, SERVICE_INTERNET_IP, port=5999, rate=RATE_PPS,
                    seconds=6.0)
    ok.start()
    bad.start()
    try:
        time.sleep(1.0)
        mark = len(lab.log_events())
        if restore:
            t0 = lab.ovs.restart_vswitchd_restoring_flows()["cleared"]
        else:
            t0 = time.monotonic()
            lab.ovs.restart_vswitchd()

        def reconciled(m: int = mark) -> list[dict[str, Any]]:
            return [e for e in events(lab, m, "reconciled")
                    if e.get("bridge") == "vmbr0" and e.get("read_from_switch")]

        wait_until(reconciled, 60.0, "reconcile after the vswitchd restart")
        resume = time.monotonic() - t0
        a, d = ok.stop(), bad.stop()
        mods = sum(int(e.get("flow_mods", 0)) for e in events(lab, mark, "reconciled"))
    finally:
        ok.close()
        bad.close()
    return {"lost": a["lost"], "denied": d["received"], "resume_s": resume, "flow_mods": mods,
            "gap_ms": max((ms for _, ms in a["recv"].get("gaps", [])), default=0.0)}
