"""socknet's controller runtime installing a policy file into a bench bridge.

    ip netns exec NS python -m bench._policy_app --port 6653

`bench.policy_compile` uses it for "compiled and installed": the same os-ken app
(`apps.socknet_app`) and `controller.runtime.Controller` as `socknet run`, with
no OVSDB. Commands on stdin, one JSON object per line, one JSON reply per line:

    {"cmd": "wait", "dpid": D, "timeout": S}   until the switch is connected
    {"cmd": "install", "dpid": D, "path": P}
        timed from before reading the file to the bundle commit reply:
        `controller.reload.load_checked` (read, parse, validate, run the tests),
        the desired state of the socket bridge with that policy and no ports
        (`Controller._recompute`: `topology.flows.desired_state`, which compiles the
        policy and checks every flow against the pipeline), then
        `Controller.reconcile` (read the switch, meters, plan, encode, one bundle).
        The encode cache is cleared first (cold). -> {"s", "load_s", "desired_s",
        "reconcile_s", "flows", "flow_mods"}
    {"cmd": "render", "path": P, "out": F}  the same desired flows as
        `ovs-ofctl add-flows` text into F (for the baseline) -> {"flows"}
    {"cmd": "quit"}

The bridge is mapped to the socket bridge's name (``vmbr0``) so reconcile does
what it does for vmbr0 (meters for the log/learn rate limits, then the flows).
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
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

HOST_YAML = "host: bench\nbridges: {mesh: {}, socket: {}}\n"


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _desired(path: str) -> Any:
    from controller.reload import load_checked
    from topology.config import parse_host_config
    from topology.flows import desired_state

    cfg = parse_host_config(HOST_YAML)
    policy, problems = load_checked(Path(path))
    if policy is None:
        raise RuntimeError(f"policy refused: {problems[:3]}")
    return desired_state(cfg, {cfg.bridges.socket.name: {}, cfg.bridges.mesh.name: {}},
                         policy)[cfg.bridges.socket.name]


def _command_loop(ctrl: Any) -> None:
    from controller import encode
    from controller.reload import load_checked
    from topology.policy_compile import clear_caches

    socket_name = ctrl.cfg.bridges.socket.name
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
                encode.cache_clear()
                clear_caches()  # cold parse and compile too (render compiled it already)
                with ctrl._lock:  # a fresh bridge: nothing known about it
                    ctrl._dpids = {socket_name: dpid}
                    ctrl._ports = {socket_name: {}, ctrl.cfg.bridges.mesh.name: {}}
                    ctrl.policy = None
                    ctrl._desired = None
                t0 = time.perf_counter()
                policy, problems = load_checked(Path(cmd["path"]))
                if policy is None:
                    raise RuntimeError(f"policy refused: {problems[:3]}")
                t1 = time.perf_counter()
                with ctrl._lock:
                    ctrl.policy = policy
                    ctrl._recompute()
                t2 = time.perf_counter()
                sent = ctrl.reconcile(dpid)
                t3 = time.perf_counter()
                _reply({"ok": True, "s": t3 - t0, "load_s": t1 - t0, "desired_s": t2 - t1,
                        "reconcile_s": t3 - t2, "flow_mods": sent,
                        "flows": len(ctrl._desired[socket_name])})
            elif name == "render":
                from topology.render import flows_text

                flows = _desired(cmd["path"])
                Path(cmd["out"]).write_text(flows_text(flows))
                _reply({"ok": True, "flows": len(flows)})
            else:
                _reply({"ok": False, "error": f"unknown command {name!r}"})
        except Exception as exc:  # keep serving; the caller sees the error
            _reply({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc()})
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._policy_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6653)
    args = parser.parse_args(argv)

    os.environ.setdefault("OSKEN_HUB_TYPE", "native")
    from os_ken import cfg as osken_cfg
    from os_ken.base.app_manager import AppManager

    osken_cfg.CONF(args=["--ofp-listen-host", args.host,
                         "--ofp-tcp-listen-port", str(args.port)], project="os_ken")
    from apps import socknet_app
    from controller.logs import setup_logging
    from controller.runtime import Controller
    from topology.config import parse_host_config

    setup_logging("info")
    ctrl = Controller(parse_host_config(HOST_YAML), audit_interval_s=1e9)
    socknet_app.bind(ctrl)
    threading.Thread(target=_command_loop, args=(ctrl,), name="bench-cmd", daemon=True).start()
    AppManager.run_apps(["apps.socknet_app"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
