"""`make demo`: the one-host lab, the seed's traffic types passing, forbidden paths dropped."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from labs import netns as nsl
from labs.lab import INTERNET_IP, MESH_SERVICE_IP, MESH_USER_IP, SocketLab
from labs.pkt import Sniffer


def ping_from(ns: str, dst: str, src: str | None = None) -> bool:
    argv = ["ping", "-c", "2", "-i", "0.2", "-W", "1", dst]
    if src:
        argv[1:1] = ["-I", src]
    return nsl.run(ns, argv).returncode == 0


class Demo:
    def __init__(self, lab: SocketLab) -> None:
        self.lab = lab
        self.failures = 0

    def check(self, what: str, expect: bool, fn: Callable[[], bool]) -> None:
        got = fn()
        ok = got == expect
        self.failures += not ok
        verdict = "passes" if got else "dropped"
        mark = "ok  " if ok else "FAIL"
        print(f"  [{mark}] {what:<62} {verdict}{'' if ok else ' (unexpected)'}", flush=True)

    def run(self) -> int:
        lab, c = self.lab, self.lab.containers
        print("\nseed 004 traffic types:")
        self.check("service 200 -> service 201 (local switching)", True,
                   lambda: ping_from(c[200].ns, c[201].ip))
        self.check("service 200 -> remote service 10.0.0.210 via mesh", True,
                   lambda: ping_from(c[200].ns, MESH_SERVICE_IP))
        self.check("privacy 100 -> internet 198.18.0.2 through WARP", True,
                   lambda: ping_from(c[100].ns, INTERNET_IP))
        self.check("privacy 102 -> internet through WARP, nothing on the mesh", True,
                   self._privacy_only_on_warp)
        self.check(f"mesh user {MESH_USER_IP} -> privacy router 100 (seed flow 1)", True,
                   lambda: ping_from(lab.mesh_ns, c[100].ip, src=MESH_USER_IP))
        print("\nforbidden paths:")
        self.check("privacy 100 -> service 200", False, lambda: ping_from(c[100].ns, c[200].ip))
        self.check("privacy 100 -> privacy 102", False, lambda: ping_from(c[100].ns, c[102].ip))
        self.check("privacy 100 -> remote service via mesh", False,
                   lambda: ping_from(c[100].ns, MESH_SERVICE_IP))
        self.check("service 200 -> internet (WARP is for privacy only)", False,
                   lambda: ping_from(c[200].ns, INTERNET_IP))
        self.check("mesh -> service 200 from a rogue port on the mesh bridge", False,
                   self._rogue_mesh_port)
        print("\nkill switch and controller loss:")
        lab.ovs.vsctl("del-port", "vmbr0", "warp0")
        self.check("WARP port gone: privacy 100 -> internet", False,
                   lambda: ping_from(c[100].ns, INTERNET_IP))
        lab.ovs.vsctl("add-port", "vmbr0", "warp0")
        self.check("WARP port back: privacy 100 -> internet", True,
                   lambda: ping_from(c[100].ns, INTERNET_IP))
        lab.stop_controller(signal.SIGKILL)
        self.check("controller killed: service 200 -> service 201 still works", True,
                   lambda: ping_from(c[200].ns, c[201].ip))
        self.check("controller killed: privacy 100 -> service 200 still dropped", False,
                   lambda: ping_from(c[100].ns, c[200].ip))
        lab.ovs.vsctl("del-port", "vmbr0", "warp0")
        self.check("controller killed, WARP gone: privacy 100 -> internet", False,
                   lambda: ping_from(c[100].ns, INTERNET_IP))
        lab.ovs.vsctl("add-port", "vmbr0", "warp0")
        before = len(lab.log_events())
        lab.start_controller(wait=False)
        lab.wait_reconciled(after=before)
        self.check("controller restarted: privacy 100 -> internet", True,
                   lambda: ping_from(c[100].ns, INTERNET_IP))
        print()
        print(self._status_when_connected())
        if self.failures:
            print(f"demo: {self.failures} check(s) did not behave as expected", file=sys.stderr)
            return 1
        print("demo: every check behaved as expected")
        return 0

    def _status_when_connected(self, timeout_s: float = 15.0) -> str:
        """`socknet status`, once OVS reports the restarted controller (it does so lazily)."""
        deadline = time.monotonic() + timeout_s
        while True:
            res = self.lab.socknet("status", check=False)
            if res.returncode == 0 or time.monotonic() > deadline:
                return res.stdout
            time.sleep(0.5)

    def _privacy_only_on_warp(self) -> bool:
        lab, c = self.lab, self.lab.containers
        bpf = f"ip host {c[102].ip}"
        with Sniffer(lab.mesh_ns, "eth0", 2.0, bpf) as mesh_sniff:
            ok = ping_from(c[102].ns, INTERNET_IP)
            seen = mesh_sniff.result()["count"]
        return ok and seen == 0

    def _rogue_mesh_port(self) -> bool:
        lab = self.lab
        rogue = f"{lab.prefix}r"
        nsl.create_netns(rogue)
        try:
            nsl.add_veth("rogue0", "eth0", lab.host, rogue)
            nsl.add_addr(rogue, "eth0", "10.0.0.99/24")
            lab.ovs.add_port("mesh", "rogue0")
            return ping_from(rogue, lab.containers[200].ip)
        finally:
            lab.ovs.vsctl("--if-exists", "del-port", "mesh", "rogue0")
            nsl.delete_netns(rogue, kill_procs=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="socknet-demo-") as tmp:
        lab = SocketLab("sndemo", Path(tmp))
        print("bringing up the lab: private OVS (netdev), mesh + vmbr0, containers 100 102 200 201,"
              " mesh peer, WARP exit, socknet controller ...", flush=True)
        try:
            lab.up()
            print("\nflows socknet installed on vmbr0 (cookies identify owners):")
            for line in lab.flows("vmbr0"):
                print("  " + line)
            return Demo(lab).run()
        finally:
            lab.down()
            print("lab torn down")


if __name__ == "__main__":
    sys.exit(main())
