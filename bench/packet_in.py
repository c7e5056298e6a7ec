"""Packet-in path: socknet's learning path vs a minimal os-ken learning switch, driven
by the project's fake switch (`bench.fakeswitch`), plus the first packet through real
OVS. ``python -m bench.packet_in profile`` prints where socknet's handler spends its
time (JSON)."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._probe import Probe
from bench.core import Context, Row, Target, alternate, benchmark, median
from bench.labkit import events, neigh, neigh_del, wait_until
from bench.oflab import OfLab
from labs import netns as nsl
from labs.lab import container_ip, container_mac
from labs.ovs_instance import OvsInstance
from labs.pkt import _cli_env

SOCKNET_PORT, BASELINE_PORT = 6653, 6654
MESH_DPID, VMBR0_DPID = 0xA0, 0xA1
FROM_MESH_OFPORT = 1
DISPATCH_TABLE = 30  # topology.pipeline.SOCKET_PIPELINE["dispatch"]
OFPR_ACTION = 1
TOTAL_WINDOW = 64  # throughput mode: packet-ins outstanding, spread over the switches
LS_COOKIE = 0x5157  # bench._learning_switch.LEARNED_COOKIE
FIRST_VMID = 240
_RTT = re.compile(r"time=([\d.]+) ms")

PORTS = {
    "mesh": {"nm-privacy": 1, "to-socket": 2},
    "vmbr0": {"from-mesh": FROM_MESH_OFPORT, "warp0": 2, "veth100i0": 3, "veth102i0": 4,
              "veth200i0": 5, "veth201i0": 6},
}


def host_yaml(db_sock: Path, port: int) -> str:
    """The one-host lab's host.yaml (labs.lab), its OVSDB being the private ovsdb-server."""
    containers = "\n".join(
        f'  {vmid}: {{mac: "{container_mac(vmid)}", ip: {container_ip(vmid)}/24}}'
        for vmid in (100, 102, 200, 201))
    return (f"host: fakeswitch\novsdb: unix:{db_sock}\ndatapath_type: netdev\n"
            f"controller: {{listen: 'tcp:127.0.0.1:{port}'}}\n"
            "bridges:\n"
            "  mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}\n"
            "  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}\n"
            f"containers:\n{containers}\npve: null\n")


class OvsdbOnly(OvsInstance):
    """An ovsdb-server with no ovs-vswitchd: the rows vswitchd would fill in
    (Bridge.datapath_id, Interface.ofport) are written with ``ovs-vsctl --no-wait``."""

    def start(self, timeout_s: float = 10.0) -> OvsdbOnly:
        self.rundir.mkdir(parents=True, exist_ok=True)
        if not self.db_path.exists():
            from labs.ovs_instance import SCHEMA

            self._run(["ovsdb-tool", "create", str(self.db_path), str(SCHEMA)])
        self._start_ovsdb(timeout_s)
        self.vsctl("--no-wait", "init")
        for bridge, dpid in (("mesh", MESH_DPID), ("vmbr0", VMBR0_DPID)):
            self.vsctl("--no-wait", "add-br", bridge, "--", "set", "bridge", bridge,
                       "datapath_type=netdev", f"datapath_id={dpid:016x}")
            for name, ofport in PORTS[bridge].items():
                self.vsctl("--no-wait", "add-port", bridge, name, "--", "set", "interface",
                           name, f"ofport={ofport}")
        return self


class FakeBench:
    """One namespace: a private ovsdb-server, and in turn socknet (`socknet run`) or the
    baseline learning switch as the controller of `bench.fakeswitch` switches."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.prefix = ctx.prefix("f")
        self.ns = f"{self.prefix}h"
        self.dir = ctx.dir(self.prefix)
        nsl.create_netns(self.ns)
        ctx.defer(nsl.delete_netns, self.ns, kill_procs=True)
        self.db = OvsdbOnly(f"{self.prefix}-db", self.dir / "ovsdb", netns=self.ns)
        ctx.defer(self.db.stop)
        self.db.start()
        self.config = self.dir / "host.yaml"
        self.config.write_text(host_yaml(self.db.db_sock, SOCKNET_PORT))
        self.seq = 0

    def _controller(self, socknet: bool) -> tuple[subprocess.Popen[Any], Path]:
        if socknet:
            argv = [sys.executable, "-m", "controller.cli", "run", "-c", str(self.config)]
            log = self.dir / "socknet.log"
        else:
            argv = [sys.executable, "-m", "bench._learning_switch", "--port",
                    str(BASELINE_PORT)]
            log = self.dir / "baseline.log"
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as fh:
            proc = nsl.popen(self.ns, argv, stdin=subprocess.PIPE, stdout=fh, stderr=fh,
                             env=_cli_env())
        want = '"event": "started"' if socknet else '"listening"'

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited: {log.read_text()[-2000:]}")
            return want in log.read_text()[offset:]

        wait_until(up, 30.0, "the controller to listen")
        return proc, log

    def run(self, socknet: bool, switches: int, mode: str, seconds: float) -> dict[str, Any]:
        """A fresh controller, ``switches`` fake switches, one measurement."""
        proc, log = self._controller(socknet)
        offset = log.stat().st_size
        try:
            window = max(1, TOTAL_WINDOW // switches)
            self.seq += 1_000_000  # never the same MAC/IP twice
            argv = [sys.executable, "-m", "bench.fakeswitch", "--switches", str(switches),
                    "--mode", mode, "--window", str(window), "--seconds", str(seconds),
                    "--seq-base", str(self.seq % 0x400000)]
            if socknet:
                argv += ["--controller", f"127.0.0.1:{SOCKNET_PORT}",
                         "--dpid-base", hex(VMBR0_DPID), "--frame", "arp",
                         "--table", str(DISPATCH_TABLE), "--in-port", str(FROM_MESH_OFPORT),
                         "--reason", str(OFPR_ACTION), "--commits", "1"]
            else:
                argv += ["--controller", f"127.0.0.1:{BASELINE_PORT}", "--dpid-base", "0x1",
                         "--frame", "unicast"]
            res = nsl.run(self.ns, argv, capture_output=True, text=True, env=_cli_env(),
                          timeout=seconds + 120)
            if res.returncode != 0:
                raise RuntimeError(f"fakeswitch failed: {res.stderr[-3000:]}\n"
                                   f"controller log: {log.read_text()[-2000:]}")
            out: dict[str, Any] = json.loads(res.stdout)
            if socknet:
                out.update(_reconciles(log, offset))
                out["learned"] = self._metric("socknet_remote_hosts_learned_total")
            return out
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _metric(self, name: str) -> float | None:
        """One sample from socknet's Prometheus endpoint (default: 127.0.0.1:9464)."""
        script = ("import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())")
        res = nsl.run(self.ns, [sys.executable, "-c", script], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def profile(self, full: bool) -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.packet_in", "profile", "--config",
                str(self.config)]
        if not full:
            argv.append("--quick")
        res = nsl.run(self.ns, argv, capture_output=True, text=True, env=_cli_env(),
                      timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"profile failed: {res.stderr[-3000:]}")
        out: dict[str, Any] = json.loads(res.stdout)
        return out


def _reconciles(log: Path, offset: int) -> dict[str, Any]:
    """socknet's own account of the run: its vmbr0 reconciles after the first one (each one
    bundle), their duration, and the remote hosts it learned."""
    with log.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    evs = []
    for line in lines:
        try:
            evs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rec = [e for e in evs if e.get("event") == "reconciled" and e.get("bridge") == "vmbr0"
           and not e.get("read_from_switch") and int(e.get("flow_mods", 0)) > 0]
    return {"bundles": len(rec),
            "reconcile_ms_median": median(float(e.get("ms", 0)) for e in rec),
            "learned_logged": sum(1 for e in evs if e.get("event") == "remote_host_learned")}


# ---------------------------------------------------------------- the benchmark


@benchmark(
    "packet_in",
    title="Packet-in path: fake switches vs socknet and an os-ken learning switch; "
          "first packet through OVS",
    order=50,
    baseline="a minimal os-ken learning switch (`bench._learning_switch`, OpenFlow 1.3, "
             "simple_switch_13 logic) under the same os-ken AppManager (native hub)",
    method=(
        "`bench.fakeswitch` (written here; cbench is not available) opens one TCP "
        "connection per fake switch, completes the handshake (HELLO with a version bitmap, "
        "FEATURES_REPLY with a distinct dpid, echo, barrier, empty multipart replies, "
        "bundle open/commit replies; meter mods accepted) and then sends packet-ins, each "
        "from a new source MAC. Latency mode: one packet-in outstanding per switch; "
        f"throughput mode: {TOTAL_WINDOW} outstanding in all (spread over the switches). A "
        "packet-in counts as answered when the controller's reaction is in force: the "
        "first FLOW_MOD or PACKET_OUT carrying its MAC, or the commit of the bundle that "
        "carried it. Rate = answered / measuring time; latency = send -> answered. Every "
        "run starts a fresh controller process. socknet: `socknet run` with the one-host "
        "lab's host.yaml, its OVSDB a private ovsdb-server with no ovs-vswitchd (bridge, "
        "port and interface rows, datapath_id and ofport written with `ovs-vsctl "
        "--no-wait`), the fake switch is vmbr0 (its dpid) and sends what socknet learns "
        "from: ARP requests from the mesh port into table `dispatch` (new sender MAC and "
        "IPv4 each: a new remote host, which socknet answers with one flow-mod adding its "
        "ARP-responder flow (the learning fast path: no recompute, no diff) and logs "
        "`remote_host_learned` within a budget (50 lines at once, then 20/s; every host is "
        "counted in socknet_remote_hosts_learned_total, and the next line logged says how "
        "many were left out), as it runs by default at info level; socknet's app "
        "speaks OpenFlow 1.4 only, so that switch negotiates 1.4, "
        "the baseline's 1.3: packet-in, flow-mod and packet-out are the same in both). "
        "socknet manages exactly the host's two bridges, so it is measured with "
        "1 switch; the baseline with 1, 16 and 64. Baseline packet-ins: unicast frames "
        "from a new MAC to a MAC it learned during warm-up (answered with a flow-mod and a "
        "packet-out). Both controllers run in the same namespace, one at a time; rounds "
        "alternate (ABBA). socknet handler profile: `python -m bench.packet_in profile` "
        "calls `Controller.packet_in` directly (no I/O) with new remote hosts after N "
        "known ones, and with the 10k-flow policy of `bench.policygen`. First packet "
        "through real OVS: two service containers of the one-host lab (socknet, both "
        "declared in host.yaml) vs two namespaces on a netdev bridge of a private OVS "
        "whose controller is the baseline learning switch (OpenFlow 1.3, fail_mode "
        "secure); static neighbour entries on both (no ARP), learned state wiped before "
        "each round (socknet: learned flows deleted by cookie; baseline: MAC table reset "
        "and its flows deleted; both: `ovs-appctl dpctl/del-flows`). Figure: the first "
        "`ping -c 1` round trip, then the third (steady). Undeclared container: a new "
        "service container that host.yaml does not declare (so its first packet goes to "
        "the controller, which learns its addresses) sends a UDP datagram every 1 ms "
        "(`bench._probe`) to container 200; figure = first datagram received - first "
        "sent; baseline: the same probe across the learning switch with fresh state."
    ),
)
def packet_in(ctx: Context) -> list[Row]:
    fb = FakeBench(ctx)
    rounds = ctx.n(3, 1)
    seconds = ctx.pick(5.0, 0.5)
    rows: list[Row] = []
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}

    def both_modes(socknet: bool, n: int) -> dict[str, dict[str, Any]]:
        out = {}
        for mode in ("latency", "throughput"):
            who = "socknet" if socknet else "baseline"
            r = fb.run(socknet, n, mode, seconds)
            ctx.log(f"{who} {n} switch(es) {mode}: {r['rate']:.0f}/s, median "
                    f"{r['latency_us_median'] or 0:.0f} us, unanswered {r['unanswered']}")
            results.setdefault((who, n, mode), []).append(r)
            out[mode] = r
        return out

    alternate(rounds, lambda _i: both_modes(True, 1), lambda _i: both_modes(False, 1))
    for n in ctx.pick((16, 64), (4,)):
        for _ in range(rounds):
            both_modes(False, n)

    def col(who: str, n: int, mode: str, key: str) -> list[float] | None:
        rs = results.get((who, n, mode))
        if rs is None:
            return None
        return [float(r[key]) for r in rs if r.get(key) is not None]

    for mode in ("latency", "throughput"):
        win = "1 outstanding per switch" if mode == "latency" else f"window {TOTAL_WINDOW}"
        rows.append(Row.of(f"1 switch, {mode} mode ({win}): packet-ins answered/s", "/s",
                           col("socknet", 1, mode, "rate"), col("baseline", 1, mode, "rate"),
                           target=Target.ratio_at_least(1.0)))
        rows.append(Row.of(f"1 switch, {mode} mode: packet-in -> answered, median", "us",
                           col("socknet", 1, mode, "latency_us_median"),
                           col("baseline", 1, mode, "latency_us_median")))
    for n in ctx.pick((16, 64), (4,)):
        for mode in ("latency", "throughput"):
            rows.append(Row.of(f"{n} switches, {mode} mode: packet-ins answered/s", "/s",
                               None, col("baseline", n, mode, "rate"),
                               note="socknet n/a: it manages exactly the host's two bridges "
                                    "(a dpid not in its OVSDB gets no flows and its "
                                    "packet-ins are ignored)"))
            rows.append(Row.of(f"{n} switches, {mode} mode: packet-in -> answered, median",
                               "us", None, col("baseline", n, mode, "latency_us_median")))
    _notes_fake(ctx, results)

    prof = fb.profile(full=not ctx.quick)
    rows += _profile_rows(ctx, prof)
    rows += _first_packet(ctx)
    return rows


def _notes_fake(ctx: Context, results: dict[tuple[str, int, str], list[dict[str, Any]]]
                ) -> None:
    for (who, n, mode), rs in sorted(results.items()):
        r = rs[-1]
        msgs = ", ".join(f"{k} {v}" for k, v in sorted(r["rx"].items()))
        own = ""
        if "bundles" in r:
            learned = "?" if r.get("learned") is None else f"{r['learned']:,.0f}"
            own = (f"; socknet: {learned} remote hosts learned "
                   "(socknet_remote_hosts_learned_total), of which "
                   f"{r['learned_logged']} logged one by one; {r['bundles']} "
                   f"reconcile bundles, median reconcile {r['reconcile_ms_median'] or 0:.1f} "
                   "ms")
        ctx.note(f"{who}, {n} switch(es), {mode}: last round answered per second "
                 f"{r['per_second']}; {r['reactions_per_packet_in']:.2f} messages per "
                 f"answered packet-in ({msgs}); unanswered {r['unanswered']}; OpenFlow "
                 f"version {r['versions']}{own}.")
    ctx.settings["fakeswitch"] = {"total_window": TOTAL_WINDOW}


# ---------------------------------------------------------------- handler profile


def _profile_rows(ctx: Context, prof: dict[str, Any]) -> list[Row]:
    rows = []
    for case in prof["cases"]:
        rows.append(Row.of(case["what"], "us",
                           [case["us"]], note=case.get("note", "")))
    for p in prof["profiles"]:
        top = "; ".join(f"{f['function']} {f['us_per_packet_in']:.0f} us ({f['share']:.0%})"
                        for f in p["top"])
        ctx.note(f"Where a new-remote-host packet-in goes in socknet (cProfile, cumulative "
                 f"per packet-in, {p['profiled']}): {top}.")
    ctx.settings["handler_profile"] = prof
    return rows


def _profile_main(argv: list[str]) -> int:
    """In-process: the cost of `Controller.packet_in` for ARP from the mesh."""
    p = argparse.ArgumentParser(prog="python -m bench.packet_in profile")
    p.add_argument("--config", required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from bench.fakeswitch import arp_frame, key_ip, key_mac
    from controller.logs import setup_logging
    from controller.runtime import Controller
    from topology.config import load_host_config
    from topology.policy import parse_policy

    setup_logging("info")
    devnull = os.open(os.devnull, os.O_WRONLY)
    real_stdout = os.dup(1)
    os.dup2(devnull, 2)  # the controller's JSON log lines: not part of the output
    os.dup2(devnull, 1)
    cfg = load_host_config(args.config)
    dpids = {"mesh": MESH_DPID, "vmbr0": VMBR0_DPID}

    class Msg:
        def __init__(self, data: bytes) -> None:
            self.data, self.match, self.table_id = data, {"in_port": FROM_MESH_OFPORT}, 30

    counter = iter(range(1, 1 << 22))

    def new_msgs(n: int) -> list[Msg]:
        return [Msg(arp_frame(key_mac(9, k), key_ip(9, k))) for k in
                (next(counter) for _ in range(n))]

    def per_call_us(ctrl: Controller, msgs: list[Msg]) -> float:
        t = time.perf_counter()
        for m in msgs:
            ctrl.packet_in(VMBR0_DPID, m)
        return (time.perf_counter() - t) / len(msgs) * 1e6

    class Datapath:
        """Connected, its flows read: what the learning path talks to (messages are
        encoded by os-ken as for a real switch, then dropped)."""

        from os_ken.ofproto import ofproto_v1_4 as ofproto
        from os_ken.ofproto import ofproto_v1_4_parser as ofproto_parser

        id, xid = VMBR0_DPID, 0

        def set_xid(self, msg: Any) -> None:
            self.xid += 1
            msg.set_xid(self.xid)

        def send_msg(self, msg: Any) -> bool:
            self.set_xid(msg)
            msg.serialize()
            return True

        def send(self, data: bytes) -> bool:
            return True

    def controller(policy: Any = None, connected: bool = True) -> Controller:
        from controller.switch import SwitchSession

        c = Controller(cfg, audit_interval_s=1e9, policy=policy)
        c.ovsdb_changed(PORTS, dpids)
        if connected:
            session = c._sessions[VMBR0_DPID] = SwitchSession(Datapath(), "vmbr0")
            session.installed = {f.cookie for f in c._desired["vmbr0"]}
        return c

    def know(c: Controller, count: int) -> None:
        """``count`` remote hosts learned already (set directly, one recompute)."""
        now = time.monotonic()
        for m in new_msgs(count):
            mac = ":".join(f"{b:02x}" for b in m.data[6:12])
            ip = ".".join(str(b) for b in m.data[28:32])
            c.remote[ip] = (mac, now)
        with c._lock:
            c._recompute()
            session = c._sessions.get(VMBR0_DPID)
            if session is not None:
                session.installed = {f.cookie for f in c._desired["vmbr0"]}

    n = 50 if args.quick else 100
    cases = []
    base = len(controller()._desired["vmbr0"])
    for known in ((0, 200) if args.quick else (0, 1000, 5000)):
        ctrl = controller()
        know(ctrl, known)
        us = per_call_us(ctrl, new_msgs(n))
        cases.append({"what": f"socknet `Controller.packet_in`, new remote host, {known:,} known "
                              f"before the {n} measured "
                              f"(lab host: {base} vmbr0 flows + 1 per known host)",
                      "us": us})
    from controller.reconcile import plan

    slow = controller(connected=False)
    know(slow, 1000)
    cases.append({"what": "socknet `Controller.packet_in`, new remote host, 1,000 known, "
                          "before the switch's flows were read (full recompute)",
                  "us": per_call_us(slow, new_msgs(n)),
                  "note": "the fast path needs the switch's installed flows; until the first "
                          "reconcile has read them, a new host recomputes the whole desired "
                          "state and the worker diffs it"})
    rctrl = controller(connected=False)
    know(rctrl, 1000)
    installed = {f.cookie for f in rctrl._desired["vmbr0"]}
    rctrl.packet_in(VMBR0_DPID, new_msgs(1)[0])
    want = rctrl._desired["vmbr0"]
    t = time.perf_counter()
    cookies = [f.cookie for f in want]  # new Flow objects: each cookie hashed again
    t1 = time.perf_counter()
    todo = plan(want, installed)
    t2 = time.perf_counter()
    cases.append({"what": f"socknet, full path: then `Controller.reconcile` (worker thread), 1,000 "
                          "known: "
                          f"content-hash cookies of the {len(cookies):,} rebuilt vmbr0 "
                          "flows",
                  "us": (t1 - t) * 1e6,
                  "note": "`_recompute` builds new Flow objects, so reconcile hashes every "
                          "flow's content again (Flow.cookie is cached per object)"})
    cases.append({"what": "socknet, full path: then `controller.reconcile.plan` in it, 1,000 known "
                          f"({len(todo.add)} add)", "us": (t2 - t1) * 1e6})
    known_msgs = new_msgs(n)
    per_call_us(ctrl, known_msgs)
    cases.append({"what": "socknet `Controller.packet_in`, ARP from a remote host already known "
                          "(no change)",
                  "us": per_call_us(ctrl, known_msgs),
                  "note": "parse the frame (struct), look up, return"})
    from bench.policygen import sized_policy

    policy_flows = 1000 if args.quick else 10_000
    pc_policy = parse_policy(sized_policy(policy_flows))
    pctrl = controller(pc_policy)
    pflows = len(pctrl._desired["vmbr0"])
    cases.append({"what": f"socknet `Controller.packet_in`, new remote host, 0 known, "
                          f"{policy_flows // 1000}k-flow policy "
                          f"({pflows:,} vmbr0 flows)",
                  "us": per_call_us(pctrl, new_msgs(n // 2))})

    # where the time goes: cProfile over new hosts, lab host with 1000 (quick: 200) known,
    # and the policy host with none
    prof_known = 200 if args.quick else 1000
    pc = controller()
    know(pc, prof_known)
    profiles = [
        {"profiled": f"{n} new hosts after {prof_known:,} known, lab host",
         "top": _top(pc, new_msgs(n))},
        {"profiled": f"{n // 2} new hosts, none known, {policy_flows // 1000}k-flow policy",
         "top": _top(controller(pc_policy), new_msgs(n // 2))},
    ]
    os.dup2(real_stdout, 1)
    print(json.dumps({"cases": cases, "profiles": profiles}), flush=True)
    return 0


_WANTED = ("packet_in", "parse_packet", "_learn_remote", "_recompute", "desired_state",
           "socket_flows", "mesh_flows", "_arp_responder", "flow", "check_flows",
           "check_against_pipeline", "_remote_flow_update", "raw_flow_mod_add",
           "service_arp_flow", "_wire_tail", "compile_policy", "_spoof_guard",
           "_known_service_addresses", "_kick_all", "meth")


def _top(ctrl: Any, msgs: list[Any]) -> list[dict[str, Any]]:
    """Cumulative time per packet-in of socknet's own functions (and the log call)."""
    pr = cProfile.Profile()
    pr.enable()
    for m in msgs:
        ctrl.packet_in(VMBR0_DPID, m)
    pr.disable()
    st = pstats.Stats(pr, stream=io.StringIO())
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = st.stats  # type: ignore[attr-defined]
    total = max(v[3] for v in stats.values())
    top = []
    for (file, line, func), v in stats.items():
        if func not in _WANTED:
            continue
        if func == "meth":
            if "structlog" not in file:
                continue
            short = "structlog log call"
        elif "/topology/" in file or "/controller/" in file:
            short = f"{Path(file).parent.name}/{Path(file).name}:{line} {func}"
        else:
            continue
        top.append({"function": short, "us_per_packet_in": v[3] / len(msgs) * 1e6,
                    "share": v[3] / total, "calls_per_packet_in": v[1] / len(msgs)})
    top.sort(key=lambda f: -f["us_per_packet_in"])
    return top[:12]


# ---------------------------------------------------------------- first packet, real OVS


class LearningSwitch:
    def __init__(self, ctx: Context, lab: OfLab, port: int) -> None:
        log = lab.dir / "learning_switch.log"
        with log.open("ab") as fh:
            self.proc = nsl.popen(lab.ns, [sys.executable, "-m", "bench._learning_switch",
                                           "--port", str(port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh,
                                  text=True, env=_cli_env())
        ctx.defer(self.kill)

    def call(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _ping_rtts(ns: str, dst: str, count: int = 3) -> list[float]:
    out = []
    for _ in range(count):
        res = nsl.run(ns, ["ping", "-n", "-c", "1", "-W", "2", dst], capture_output=True,
                      text=True)
        m = _RTT.search(res.stdout)
        if m is None:
            raise RuntimeError(f"ping {dst} from {ns}: no reply: {res.stdout}{res.stderr}")
        out.append(float(m.group(1)))
    return out


def _first_through(src_ns: str, dst_ns: str, dst_ip: str, seconds: float) -> float:
    probe = Probe(src_ns, dst_ns, dst_ip, port=7100, interval_ms=1.0)
    try:
        time.sleep(seconds)
    finally:
        sent, received = probe.stop()
    if not received or not sent:
        raise RuntimeError(f"no probe datagram arrived ({len(sent)} sent)")
    first = min(received)
    return (received[first] - sent[0]) * 1000


def _first_packet(ctx: Context) -> list[Row]:
    from topology.model import LEARNED_COOKIE, OWNED_COOKIE_MASK

    s_lab = ctx.socknet_lab("s")
    c200, c201 = s_lab.containers[200], s_lab.containers[201]
    neigh(c200.ns, c201.ip, c201.mac)
    neigh(c201.ns, c200.ip, c200.mac)

    b_lab = OfLab(ctx, "l")
    ls = LearningSwitch(ctx, b_lab, 6653)
    b_lab.ovs.vsctl("add-br", "ls0", "--", "set", "bridge", "ls0", "datapath_type=netdev",
                    "fail_mode=secure", "protocols=OpenFlow13",
                    "other-config:datapath-id=00000000000000b1",
                    "--", "set-controller", "ls0", "tcp:127.0.0.1:6653",
                    "--", "set", "controller", "ls0", "connection_mode=out-of-band",
                    "max_backoff=1000")
    a_ns, b_ns = b_lab.add_endpoints("ls0")
    wait_until(lambda: "CONTROLLER" in b_lab.ovs.ofctl("-O", "OpenFlow13", "dump-flows",
                                                       b_lab.ovs.mgmt("ls0")),
               30.0, "the learning switch's table-miss flow")

    def s_fresh() -> None:
        s_lab.ovs.ofctl("del-flows", s_lab.ovs.mgmt("vmbr0"),
                        f"cookie={LEARNED_COOKIE:#x}/{OWNED_COOKIE_MASK:#x}")
        s_lab.ovs.appctl("dpctl/del-flows")
        time.sleep(0.05)

    def b_fresh() -> None:
        ls.call("reset")
        b_lab.ovs._run(["ovs-ofctl", "-O", "OpenFlow13", "del-flows", b_lab.ovs.mgmt("ls0"),
                        f"cookie={LS_COOKIE:#x}/-1"])
        b_lab.ovs.appctl("dpctl/del-flows")
        time.sleep(0.05)

    def s_ping(_i: int) -> list[float]:
        s_fresh()
        return _ping_rtts(c200.ns, c201.ip)

    def b_ping(_i: int) -> list[float]:
        b_fresh()
        return _ping_rtts(a_ns, "10.9.0.2")

    rounds = ctx.n(10, 1)
    ctx.log(f"first packet through real OVS: {rounds} rounds")
    s, b = alternate(rounds, s_ping, b_ping)
    rows = [
        Row.of("first packet through real OVS: first ping round trip (declared containers)",
               "ms", [x[0] for x in s], [x[0] for x in b],
               note="socknet's data path never needs the controller here: both containers "
                    "are declared in host.yaml, MAC learning is OVS's own `learn` action, "
                    "so the first packet takes OVS's slow path (upcall) only; the "
                    "baseline's first round trip takes two packet-ins (request: learn + "
                    "flood; reply: learn + flow-mod + packet-out)"),
        Row.of("first packet through real OVS: third ping round trip (steady)", "ms",
               [x[2] for x in s], [x[2] for x in b],
               note="the baseline's second ping still takes one packet-in (its flows "
                    "match in_port + both MACs, one direction per packet-in)"),
    ]
    ratio = (median([x[0] for x in s]) or 0) / (median([x[0] for x in b]) or 1)
    ctx.note(f"First ping round trip: socknet / baseline = {ratio:.2f} (issue 5's target: "
             "no slower than the baseline, i.e. at most 1.0; the harness has no "
             "ratio-at-most target kind).")

    # a container host.yaml does not declare: its first packet needs the controller
    vmids = iter(range(FIRST_VMID, FIRST_VMID + 50))

    def s_undeclared(_i: int) -> float:
        vmid = next(vmids)
        ns = f"{s_lab.prefix}c{vmid}"
        port = s_lab.port_name(vmid)
        ip, mac = container_ip(vmid), container_mac(vmid)
        nsl.create_netns(ns)
        try:
            nsl.disable_ipv6(ns)
            nsl.add_veth(port, "eth0", s_lab.host, ns)
            nsl.tx_off(s_lab.host, port)
            nsl.tx_off(ns, "eth0")
            nsl.set_mac(ns, "eth0", mac)
            nsl.add_addr(ns, "eth0", f"{ip}/24")
            neigh(ns, c200.ip, c200.mac)
            neigh(c200.ns, ip, mac)
            before = len(s_lab.log_events())
            s_lab.ovs.vsctl("add-port", "vmbr0", port)
            wait_until(lambda: any(e.get("bridge") == "vmbr0" and int(e.get("added", 0)) > 0
                                   for e in events(s_lab, before, "reconciled")),
                       10.0, f"flows for {port}")
            time.sleep(0.2)
            s_fresh()
            return _first_through(ns, c200.ns, c200.ip, 0.4)
        finally:
            s_lab.ovs.vsctl("--if-exists", "del-port", "vmbr0", port)
            neigh_del(c200.ns, ip)
            nsl.delete_netns(ns, kill_procs=True)

    def b_undeclared(_i: int) -> float:
        b_fresh()
        return _first_through(a_ns, b_ns, "10.9.0.2", 0.4)

    u_rounds = ctx.n(5, 1)
    us, ub = alternate(u_rounds, s_undeclared, b_undeclared)
    rows.append(Row.of("first packet through real OVS: undeclared container, first UDP "
                       "datagram (1 per ms) received - first sent", "ms", us, ub,
                       note="socknet: the first datagram goes to the controller (spoof_guard: "
                            "addresses unknown, learn, drop); it learns the container's "
                            "MAC/IPv4 and installs its flows in a bundle; a later datagram "
                            "is the first through. Baseline: the first datagram goes through "
                            "the controller (packet-in, flood packet-out)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        return _profile_main(argv[1:])
    print("usage: python -m bench.packet_in profile --config HOST_YAML [--quick]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

