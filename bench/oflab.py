"""A private OVS (netdev) in its own namespace with bench bridges, and the
`bench.ofapp` harness as their controller."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.labkit import endpoint_ns
from labs import netns as nsl
from labs.ovs_instance import OvsInstance
from labs.pkt import _cli_env

OF_PORT = 6653
CALL_TIMEOUT_S = 120.0


class OfLab:
    def __init__(self, ctx: Any, tag: str = "o") -> None:
        self.ctx = ctx
        self.prefix = ctx.prefix(tag)
        self.ns = f"{self.prefix}h"
        self.dir = ctx.dir(self.prefix)
        nsl.create_netns(self.ns)
        ctx.defer(nsl.delete_netns, self.ns, kill_procs=True)
        self.ovs = OvsInstance(f"{self.prefix}-ovs", self.dir / "ovs", netns=self.ns)
        ctx.defer(self.ovs.stop)
        self.ovs.start()

    # ------------------------------------------------------------ bridges
    def add_bridge(self, name: str, dpid: int, *, controller: bool) -> None:
        args = ["add-br", name, "--", "set", "bridge", name, "datapath_type=netdev",
                "fail_mode=secure", "protocols=OpenFlow14",
                f"other-config:datapath-id={dpid:016x}"]
        if controller:
            args += ["--", "set-controller", name, f"tcp:127.0.0.1:{OF_PORT}",
                     "--", "set", "controller", name, "connection_mode=out-of-band",
                     "max_backoff=1000"]
        self.ovs.vsctl(*args)

    def del_bridge(self, name: str) -> None:
        self.ovs.vsctl("--if-exists", "del-br", name)

    def flow_count(self, bridge: str) -> int:
        out = self.ovs.ofctl("dump-aggregate", self.ovs.mgmt(bridge))
        m = re.search(r"flow_count=(\d+)", out)
        return int(m.group(1)) if m else -1

    def add_endpoints(self, bridge: str) -> tuple[str, str]:
        """Two namespaces (10.9.0.1 on ofport 1, 10.9.0.2 on ofport 2) wired to ``bridge``.
        Returns their names. Each knows the other's MAC (no ARP)."""
        a = endpoint_ns(self.ctx, self.prefix, "a", self.ns, "pa", "10.9.0.1",
                        "02:aa:00:00:00:01")
        b = endpoint_ns(self.ctx, self.prefix, "b", self.ns, "pb", "10.9.0.2",
                        "02:aa:00:00:00:02")
        from bench.labkit import neigh

        neigh(a, "10.9.0.2", "02:aa:00:00:00:02")
        neigh(b, "10.9.0.1", "02:aa:00:00:00:01")
        self.ovs.add_port(bridge, "pa", ofport=1)
        self.ovs.add_port(bridge, "pb", ofport=2)
        return a, b

    # ------------------------------------------------------------ harness
    def start_app(self, *, bare: bool = False, tag: str = "app") -> OfApp:
        app = OfApp(self, bare=bare, log=self.dir / f"{tag}.log")
        self.ctx.defer(app.kill)
        return app


class OfApp:
    """One `bench.ofapp` process inside the lab's namespace."""

    def __init__(self, lab: OfLab, *, bare: bool, log: Path) -> None:
        self.log_path = log
        argv = [sys.executable, "-m", "bench.ofapp", "--port", str(OF_PORT)]
        if bare:
            argv.append("--bare")
        self.started = time.time()
        with log.open("ab") as fh:
            self.proc = nsl.popen(lab.ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=fh, text=True, env=_cli_env())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: dict[str, Any], timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise TimeoutError(f"bench.ofapp: no reply to {cmd.get('cmd')} "
                                   f"in {timeout_s}s; log: {self.log_tail()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.ofapp exited: {self.log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"bench.ofapp {cmd.get('cmd')}: {reply.get('error')}\n"
                               f"{reply.get('trace', '')}")
        return dict(reply)

    def wait_connected(self, dpid: int, timeout_s: float = 15.0) -> None:
        if not self.call({"cmd": "wait", "dpid": dpid, "timeout": timeout_s},
                         timeout_s + 5)["ok"]:
            raise TimeoutError(f"switch {dpid:x} did not connect to bench.ofapp")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
