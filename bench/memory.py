"""Controller memory: RSS idle in the lab, and with 10k / 100k installed policy flows."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from bench.core import Context, Row, benchmark
from bench.labkit import owned_flows, policy_lab, proc_status, wait_until
from bench.oflab import OfLab
from labs.pkt import _cli_env

SETTLE_S = 1.0  # let the allocator and os-ken settle before reading RSS


@benchmark(
    "memory",
    title="Controller memory (RSS)",
    order=50,
    baseline="idle: a do-nothing os-ken app (`bench/_bare_app.py`) holding one switch "
             "connection, same Python; with flows: none (n/a)",
    method=(
        "VmRSS (and VmHWM, the peak) of the `socknet run` process from /proc/<pid>/status, "
        f"in MiB, read {SETTLE_S:.0f} s after both bridges reported `reconciled`. Idle: the "
        "one-host lab without a policy; each round restarts the controller (a fresh "
        "process). With N flows: the policy lab (`labs.policy_lab`) with a generated tier "
        "policy of about N flows (`bench.policygen`); 'installing' rounds stop the "
        "controller, delete the bridge's flows and start it again, so it compiles and "
        "installs everything; 'restart' rounds restart it with the flows in place, so it "
        "compiles, reads all flows back from the switch and sends nothing (checked)."
    ),
)
def memory(ctx: Context) -> list[Row]:
    rounds = ctx.n(3, 1)
    settle = ctx.pick(SETTLE_S, 0.2)
    rows = _idle(ctx, rounds, settle)
    for n in ctx.pick((10_000, 100_000), (1000,)):
        ctx.log(f"{n}-flow policy: {rounds} installing + {rounds} restart rounds")
        lab = policy_lab(ctx, "w", n)
        flows = owned_flows(lab)
        inst_rss, inst_hwm, inst_s, rest_rss, rest_hwm, rest_s = [], [], [], [], [], []
        for i in range(rounds):
            inst_s.append(_restart(lab, wipe=True) if i else lab.bench_first_start_s)
            time.sleep(settle)
            st = _status(lab)
            inst_rss.append(st["VmRSS"] / 1024)
            inst_hwm.append(st["VmHWM"] / 1024)
        for _ in range(rounds):
            rest_s.append(_restart(lab, wipe=False))
            time.sleep(settle)
            st = _status(lab)
            rest_rss.append(st["VmRSS"] / 1024)
            rest_hwm.append(st["VmHWM"] / 1024)
        lab.down()
        what = f"{n // 1000}k-flow policy ({flows:,} flows)"
        ctx.note(f"{what}: the compiled policy's `Flow.note` texts alone (for `socknet flows "
                 f"--comments`) add up to {_note_mib(n):,.1f} MiB of characters "
                 "(measured in a separate process from the same policy).")
        rows += [
            Row.of(f"{what}: after installing them", "MiB", inst_rss, None),
            Row.of(f"{what}: peak while installing (VmHWM)", "MiB", inst_hwm, None),
            Row.of(f"{what}: after a restart (flows read back)", "MiB", rest_rss, None),
            Row.of(f"{what}: peak during a restart (VmHWM)", "MiB", rest_hwm, None),
        ]
        rows.append(Row.of(f"{what}: controller start, compile + install, spawned -> "
                           "reconciled", "s", inst_s, None))
        rows.append(Row.of(f"{what}: controller start, compile + read back, spawned -> "
                           "reconciled", "s", rest_s, None))
    return rows


def _note_mib(n: int) -> float:
    """Characters of all `Flow.note`s of the compiled generated policy, in MiB."""
    code = ("import sys; from bench.policygen import sized_policy; "
            "from bench.labkit import PAIR; "
            "from topology.policy import parse_policy; "
            "from topology.policy_compile import compile_policy; "
            "p = parse_policy(sized_policy(int(sys.argv[1]), pair=(PAIR[200], PAIR[201]))); "
            "print(sum(len(f.note) for f in compile_policy(p)))")
    res = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                         env=_cli_env(), timeout=300, check=True)
    return int(res.stdout.strip()) / 2**20


def _status(lab: Any) -> dict[str, int]:
    assert lab.controller is not None
    return proc_status(lab.controller.pid)


def _restart(lab: Any, *, wipe: bool) -> float:
    """Restart the controller (SIGTERM, start); with ``wipe`` delete vmbr0's flows while it
    is down. Returns spawn -> both bridges reconciled, in seconds."""
    before = len(lab.log_events())
    lab.stop_controller()
    if wipe:
        lab.ovs.ofctl("del-flows", lab.ovs.mgmt("vmbr0"))
    t = time.monotonic()
    lab.start_controller(wait=False)
    lab.wait_reconciled(after=before, timeout_s=240)
    took = time.monotonic() - t
    if not wipe:
        sent = [e for e in lab.log_events()[before:]
                if e.get("event") == "reconciled" and int(e.get("flow_mods", 0))]
        if sent:
            raise RuntimeError(f"a restart with unchanged flows sent flow-mods: {sent}")
    return took


def _idle(ctx: Context, rounds: int, settle: float) -> list[Row]:
    lab = ctx.socknet_lab("m")
    olab = OfLab(ctx, "z")
    socknet, bare = [], []
    for i in range(rounds):
        if i:
            _restart(lab, wipe=False)
        time.sleep(settle)
        socknet.append(_status(lab)["VmRSS"] / 1024)
        dpid = 0x4000 + i
        olab.add_bridge(f"z{i}", dpid, controller=True)
        app = olab.start_app(bare=True, tag=f"bare{i}")
        try:
            wait_until(lambda dpid=dpid, app=app: dpid in app.call({"cmd": "status"})["connected"],
                       15.0, "the switch to connect to the bare os-ken app", interval_s=0.05)
            time.sleep(settle)
            bare.append(app.call({"cmd": "status"})["rss_kib"] / 1024)
        finally:
            app.kill()
            olab.del_bridge(f"z{i}")
    flows = owned_flows(lab)
    lab.down()
    return [Row.of(f"idle in the lab (no policy, 2 bridges, {flows} flows)", "MiB", socknet,
                   bare)]
