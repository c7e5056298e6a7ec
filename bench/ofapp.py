"""socknet's controller runtime on a synthetic desired state, for benchmarks.

    ip netns exec NS python -m bench.ofapp --port 6653 [--bare]

This is `socknet run` without OVSDB: the same os-ken app (`apps.socknet_app`),
the same `controller.runtime.Controller` (reconcile, `SwitchSession`, the
encoder, one bundle per reconcile), but the desired flows of a datapath come
from the ``install`` command (see `bench.flowgen`) instead of host.yaml and the
discovered ports; reconcile runs in the command thread, timed. ``--bare`` runs
a do-nothing os-ken app instead (the memory baseline). JSON logs on stderr.

Commands on stdin, one JSON object per line, one JSON reply per line on stdout:

    {"cmd": "wait", "dpid": D, "timeout": S}        until the switch is connected
    {"cmd": "install", "dpid": D, "n": N, "seed": S, "fwd": [...], "cold": true}
        set the desired state and reconcile it in this thread (timed):
        -> {"ms", "flow_mods", "gen_ms"}
    {"cmd": "reread", "dpid": D}  forget what is installed, reconcile (what a
        restart does): -> {"ms", "flow_mods"}
    {"cmd": "status"}  -> {"rss_kib", "hwm_kib", "desired", "cache"}
    {"cmd": "quit"}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any

from bench.flowgen import desired as desired_flows

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

_out_lock = threading.Lock()


def _reply(obj: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def _bridge(dpid: int) -> str:
    return f"dp{dpid:x}"


def _set_desired(ctrl: Any, dpid: int, flows: frozenset[Any]) -> None:
    with ctrl._lock:
        ctrl._dpids = {**ctrl._dpids, _bridge(dpid): dpid}
        ctrl._desired = {**(ctrl._desired or {}), _bridge(dpid): flows}


def _command_loop(ctrl: Any) -> None:
    from controller import encode

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            name = cmd.get("cmd")
            if name == "quit":
                _reply({"ok": True})
                os._exit(0)
            elif name == "wait":
                dpid = int(cmd["dpid"])
                deadline = time.monotonic() + float(cmd.get("timeout", 15))
                while ctrl.session(dpid) is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                _reply({"ok": ctrl.session(dpid) is not None})
            elif name == "install":
                dpid = int(cmd["dpid"])
                t = time.perf_counter()
                flows = frozenset(desired_flows(cmd))
                gen_ms = (time.perf_counter() - t) * 1000
                if cmd.get("cold", True):
                    encode.cache_clear()
                _set_desired(ctrl, dpid, flows)
                t = time.perf_counter()
                sent = ctrl.reconcile(dpid)
                ms = (time.perf_counter() - t) * 1000
                _reply({"ok": True, "ms": ms, "flow_mods": sent, "gen_ms": gen_ms,
                        "t_end": time.time()})
            elif name == "reread":
                dpid = int(cmd["dpid"])
                session = ctrl.session(dpid)
                session.installed = None
                t = time.perf_counter()
                sent = ctrl.reconcile(dpid)
                _reply({"ok": True, "ms": (time.perf_counter() - t) * 1000, "flow_mods": sent})
            elif name == "status":
                st = _status_kib()
                ci = encode.cache_info()
                _reply({"ok": True, "rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM"),
                        "desired": {k: len(v) for k, v in (ctrl._desired or {}).items()},
                        "cache": {"hits": ci.hits, "misses": ci.misses,
                                  "size": ci.currsize}})
            else:
                _reply({"ok": False, "error": f"unknown command {name!r}"})
        except Exception as exc:  # keep serving; the caller sees the error
            _reply({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()})
    os._exit(0)


def _bare_loop() -> None:
    for line in sys.stdin:
        cmd = json.loads(line) if line.strip() else {}
        if cmd.get("cmd") == "quit":
            _reply({"ok": True})
            os._exit(0)
        from bench._bare_app import CONNECTED

        st = _status_kib()
        _reply({"ok": True, "rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM"),
                "connected": sorted(CONNECTED)})
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ofapp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6653)
    parser.add_argument("--bare", action="store_true", help="a do-nothing os-ken app")
    args = parser.parse_args(argv)

    os.environ.setdefault("OSKEN_HUB_TYPE", "native")
    from os_ken import cfg as osken_cfg
    from os_ken.base.app_manager import AppManager

    osken_cfg.CONF(args=["--ofp-listen-host", args.host,
                         "--ofp-tcp-listen-port", str(args.port)], project="os_ken")
    if args.bare:
        threading.Thread(target=_bare_loop, name="bench-cmd", daemon=True).start()
        AppManager.run_apps(["bench._bare_app"])
        return 0

    from apps import socknet_app
    from controller.logs import setup_logging
    from controller.runtime import Controller
    from topology.config import parse_host_config

    setup_logging("info")
    cfg = parse_host_config("host: bench\nbridges: {mesh: {}, socket: {}}\n")
    ctrl = Controller(cfg, audit_interval_s=1e9)
    socknet_app.bind(ctrl)
    threading.Thread(target=_command_loop, args=(ctrl,), name="bench-cmd", daemon=True).start()
    from controller.logs import get_logger

    get_logger("bench.ofapp").info("started", listen=f"tcp:{args.host}:{args.port}")
    AppManager.run_apps(["apps.socknet_app"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
