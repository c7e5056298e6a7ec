"""Port events: a container port appears in OVSDB -> its flows -> its first packet."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

from bench.core import Context, Row, Target, alternate, benchmark
from bench.labkit import events, neigh, neigh_del, parse_ts, wait_until
from labs import netns as nsl
from labs.lab import SocketLab, container_ip, container_mac

FIRST_VMID = 230  # 10.0.0.230.. : service ids, clear of the lab's own addresses
PING_INTERVAL_S = "0.001"
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from", re.M)


@benchmark(
    "port_events",
    title="Port events: port added in OVSDB -> flows installed -> first packet",
    order=10,
    baseline="the same lab with no controller and one `actions=NORMAL` flow per bridge",
    method=(
        "Each round creates a new service container the way Proxmox starts one: a namespace "
        "and a veth (`veth<vmid>i0`), then `ovs-vsctl add-port vmbr0 veth<vmid>i0`; t0 is "
        "taken just before that command is spawned (its own start-up, a few ms, is counted "
        "against both sides alike). Flows installed: the timestamp of the controller's "
        "`reconciled` log line (logged after the bundle commit is acknowledged) for vmbr0 "
        "with added > 0; the flows for the new ofport are then checked with `ovs-ofctl "
        "dump-flows`. The new container is not in host.yaml: socknet learns its MAC/IP "
        "from its first packet and completes its flows in a second bundle (`binding_learned` "
        "then `reconciled`). First packet: from before t0 the new container pings service "
        "container 200 every 1 ms (`ping -D`), the figure is the timestamp of the first "
        "reply. Both containers know each other's MAC (static neighbour entries), so the "
        "figure is the data path, not the kernel's ARP retry timer. Each round uses a new "
        "vmid; the port, veth and namespace are removed afterwards."
    ),
)
def port_events(ctx: Context) -> list[Row]:
    s_lab = ctx.socknet_lab("p")
    n_lab = ctx.normal_lab("q")
    rounds = ctx.n(20, 2)
    ctx.log(f"{rounds} port additions on each lab")
    s, b = alternate(rounds, lambda i: _round(ctx, s_lab, i, socknet=True),
                     lambda i: _round(ctx, n_lab, i, socknet=False))
    flows = [r["flows_ms"] for r in s]
    complete = [r["complete_ms"] for r in s]
    first_s = [r["first_ms"] for r in s]
    first_b = [r["first_ms"] for r in b]
    vs_s = [r["vsctl_ms"] for r in s]
    vs_b = [r["vsctl_ms"] for r in b]
    ctx.settings["rounds"] = rounds
    return [
        Row.of("port added -> its flows installed", "ms", flows, None,
               target=Target.below(100), note="baseline n/a: the NORMAL flow is there before "
               "the port"),
        Row.of("port added -> its flows installed", "ms", flows, None, stat="p95"),
        Row.of("port added -> address learned from its first packet, flows complete", "ms",
               complete, None, note="the container is not declared in host.yaml (a new "
               "Proxmox container): its MAC/IP are learned from its first packet (packet-in) "
               "and its anti-spoofing flows follow in a second bundle"),
        Row.of("port added -> first packet through", "ms", first_s, first_b,
               target=Target.below(100)),
        Row.of("port added -> first packet through", "ms", first_s, first_b, stat="p95"),
        Row.of("`ovs-vsctl add-port` returns (vswitchd applied it)", "ms", vs_s, vs_b),
    ]


def _round(ctx: Context, lab: SocketLab, i: int, *, socknet: bool) -> dict[str, float]:
    vmid = FIRST_VMID + i
    ns = f"{lab.prefix}c{vmid}"
    port = lab.port_name(vmid)
    ip, mac = container_ip(vmid), container_mac(vmid)
    peer = lab.containers[200]
    nsl.create_netns(ns)
    ping: subprocess.Popen[str] | None = None
    try:
        nsl.disable_ipv6(ns)
        nsl.add_veth(port, "eth0", lab.host, ns)
        nsl.tx_off(lab.host, port)
        nsl.tx_off(ns, "eth0")
        nsl.set_mac(ns, "eth0", mac)
        nsl.add_addr(ns, "eth0", f"{ip}/24")
        neigh(ns, peer.ip, peer.mac)
        neigh(peer.ns, ip, mac)
        ping = nsl.popen(ns, ["ping", "-D", "-n", "-c", "1", "-i", PING_INTERVAL_S, "-w", "10",
                              peer.ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        time.sleep(0.05)
        ev_before = len(lab.log_events()) if socknet else 0
        t0 = time.time()
        lab.ovs.vsctl("add-port", "vmbr0", port)
        t_vsctl = time.time()
        out, _ = ping.communicate(timeout=15)
        m = _REPLY.search(out)
        if m is None:
            raise RuntimeError(f"no ping reply from {ns} to {peer.ip} within 10 s: {out}")
        result = {"first_ms": (float(m.group(1)) - t0) * 1000,
                  "vsctl_ms": (t_vsctl - t0) * 1000}
        if socknet:
            result["flows_ms"] = (_flows_installed(lab, ev_before) - t0) * 1000
            result["complete_ms"] = (_flows_complete(lab, ev_before, port) - t0) * 1000
            ofport = lab.ovs.ofport(port)
            mine = re.compile(rf'in_port=({ofport}|"?{port}"?)[ ,]')
            if not any(mine.search(f) for f in lab.flows("vmbr0")):
                raise RuntimeError(f"no flow for in_port={ofport} ({port}) after reconcile")
        return result
    finally:
        if ping is not None and ping.poll() is None:
            ping.kill()
            ping.communicate()
        lab.ovs.vsctl("--if-exists", "del-port", "vmbr0", port)
        neigh_del(peer.ns, ip)
        nsl.delete_netns(ns, kill_procs=True)


def _flows_installed(lab: SocketLab, ev_before: int) -> float:
    def found() -> Any:
        for e in events(lab, ev_before, "reconciled"):
            if e.get("bridge") == "vmbr0" and int(e.get("added", 0)) > 0:
                return parse_ts(str(e["timestamp"]))
        return None

    return float(wait_until(found, 10.0, "the controller's reconcile of the new port"))


def _flows_complete(lab: SocketLab, ev_before: int, port: str) -> float:
    """When the port's flows are complete: the vmbr0 reconcile after the controller learned
    the container's addresses from its first packet (`binding_learned`). A container that
    host.yaml declares needs no learning: then the first reconcile already completes it."""
    def found() -> Any:
        evs = events(lab, ev_before)
        learned = [i for i, e in enumerate(evs)
                   if e.get("event") == "binding_learned" and e.get("port") == port]
        if not learned:
            return None
        for e in evs[learned[0]:]:
            if e.get("event") == "reconciled" and e.get("bridge") == "vmbr0":
                return parse_ts(str(e["timestamp"]))
        return None

    try:
        return float(wait_until(found, 2.0, f"binding_learned for {port}"))
    except TimeoutError:
        return _flows_installed(lab, ev_before)
