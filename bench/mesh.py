"""Multi-host mesh (`labs.mesh_lab`): convergence after a container move and after a peer
loss; first-packet latency and iperf3 TCP throughput across the WireGuard mesh, socknet vs
one NORMAL flow per bridge.

Two benchmarks, each with its own labs (every name from ``ctx.prefix``, torn down with
``ctx.defer``; traffic only between addresses inside the lab's namespaces):

- ``mesh_convergence``: one 3-host MeshLab with socknet. A container moves between hosts 1
  and 2 while a container on host 3 pings it; then host 3 drops host 1 from WireGuard.
- ``mesh_dataplane``: two 2-host MeshLabs, one with socknet, one with the controllers never
  started and one ``actions=NORMAL`` flow per bridge on every host (two hosts only: with
  three, NORMAL over a full mesh of VXLAN ports is a loop). First-packet latency and iperf3
  from host 1 to host 2, rounds alternating (ABBA).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from bench.core import Context, Row, Target, alternate, benchmark
from bench.labkit import make_normal, neigh, wait_until
from labs import netns as nsl
from labs.lab import Container, container_mac
from labs.mesh_lab import NETMAKER_IF, MeshHost, MeshLab, mesh_ip
from topology.model import LEARNED_COOKIE

NEEDS = ("wireguard-go", "wg", "unshare", "iperf3", "ping")

# ---------------------------------------------------------------- labs


def mesh_lab(ctx: Context, tag: str, hosts: int, *, normal: bool = False) -> MeshLab:
    """A MeshLab torn down with ``ctx``. ``normal``: no controller ever runs; every host's
    bridges get one ``actions=NORMAL`` flow (the VXLAN ports socknet bootstrap made stay)."""
    missing = [b for b in NEEDS if shutil.which(b) is None]
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)} (make deps)")
    prefix = ctx.prefix(tag)
    lab = MeshLab(prefix, ctx.dir(prefix), hosts=hosts)
    ctx.defer(lab.down)
    t = time.monotonic()
    lab.up(controller=not normal)
    if normal:
        for h in lab.hosts:
            make_normal(h.ovs)
    ctx.log(f"{'NORMAL' if normal else 'socknet'} mesh lab {prefix} ({hosts} hosts) up in "
            f"{time.monotonic() - t:.1f} s")
    return lab


def ping_ok(ns: str, dst: str, count: int = 1) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", dst]
    return nsl.run(ns, argv).returncode == 0


def dp_flows_to(h: MeshHost, mac: str) -> list[str]:
    """Datapath (megaflow) entries of host ``h`` whose match has eth dst ``mac``."""
    return [f for f in h.ovs.appctl("dpctl/dump-flows").splitlines() if f"dst={mac}" in f]


# ---------------------------------------------------------------- probes


_REPLY = re.compile(r"^\[(?P<t>\d+\.\d+)\] \d+ bytes from ")


class Prober:
    """``ping -D`` every ``interval`` from ``ns`` to ``dst`` until stopped; the wall-clock
    stamp of every echo reply is collected by a reader thread."""

    def __init__(self, ns: str, dst: str, interval: str = "0.005") -> None:
        self.proc = nsl.popen(ns, ["ping", "-D", "-n", "-i", interval, "-W", "1", dst],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.replies: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = _REPLY.match(line)
            if m:
                self.replies.append(float(m.group("t")))

    def first_after(self, t0: float, timeout_s: float) -> float | None:
        """Wall-clock time of the first reply stamped after ``t0`` (None: none in time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = [t for t in list(self.replies) if t > t0]
            if got:
                return got[0]
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return None
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(2)


GARP = r"""
import socket, sys, time
mac, ip = sys.argv[1], sys.argv[2]
hw = bytes.fromhex(mac.replace(":", ""))
addr = socket.inet_aton(ip)
frame = (b"\xff" * 6 + hw + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01" + hw + addr
         + b"\x00" * 6 + addr)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
print("READY", flush=True)
sys.stdin.readline()
s.send(frame)
print(time.time(), flush=True)
"""


class GarpSender:
    """A process in a container, started ahead, that sends one gratuitous ARP (the request
    form, ``arping -U``: what the container's network setup sends when it comes up, as in
    tests/test_mesh_learning.py) the moment it is told to: no interpreter start-up on the
    clock."""

    def __init__(self, c: Container) -> None:
        self.proc = nsl.popen(c.ns, [sys.executable, "-c", GARP, c.mac, c.ip],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "READY" not in line:
            self.proc.kill()
            raise RuntimeError(f"GARP sender did not start: {line}{self.proc.stderr.read()}")

    def fire(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        self.proc.wait(5)
        return float(out)


# ---------------------------------------------------------------- container move

MOVER = 201  # declared in host 1's host.yaml; host 2's does not know it
OBSERVER = 220  # on host 3
MOVE_GAP_S = 0.5  # stopped on the old host -> its port appears on the new one
MOVE_TIMEOUT_S = 5.0
GARP_AFTER_S = 0.1  # the container's network comes up after Proxmox attached its port
FORGET_TIMEOUT_S = 25.0


def _stop_container(h: MeshHost, vmid: int) -> None:
    """Container stop on Proxmox: its port and veth go, and with the namespace the container."""
    c = h.containers[vmid]
    h.remove_container(vmid)
    nsl.delete_netns(c.ns, kill_procs=True)
    del h.containers[vmid]


def _boot_container(h: MeshHost, vmid: int) -> Container:
    """Everything of ``MeshHost.add_container`` but the OVS port: namespace, veth (MTU
    1370), MAC, address, route. Registered with the host at once (``lab.down`` removes it)."""
    ns = f"{h.prefix}c{vmid}"
    nsl.create_netns(ns)
    nsl.disable_ipv6(ns)
    port = h.port_name(vmid)
    c = Container(vmid, ns, port, h.container_ip(vmid), container_mac(vmid))
    h.containers[vmid] = c
    nsl.add_veth(port, "eth0", h.host, ns, mtu=h.mtu)
    nsl.tx_off(h.host, port)
    nsl.tx_off(ns, "eth0")
    nsl.set_mac(ns, "eth0", c.mac)
    nsl.add_addr(ns, "eth0", f"{c.ip}/24")
    h.container_routes(ns, vmid)
    return c


def _wait_forgotten(ctx: Context, h: MeshHost, mac: str) -> float:
    """Wait until host ``h``'s datapath holds no megaflow towards ``mac`` (OVS drops
    datapath flows idle for 10 s, other_config:max-idle). Returns the seconds waited."""
    t = time.monotonic()
    wait_until(lambda: not dp_flows_to(h, mac), FORGET_TIMEOUT_S,
               f"{h.host}: datapath flows towards {mac} to expire", interval_s=0.25)
    return time.monotonic() - t


def _move(lab: MeshLab, src: int, dst: int, *, garp_after_s: float = GARP_AFTER_S,
          timeout_s: float = MOVE_TIMEOUT_S) -> dict[str, Any]:
    """Stop MOVER on host ``src``, start it with the same MAC/IP on host ``dst``, its GARP
    ``garp_after_s`` after the port; the seconds from its port appearing on ``dst`` to the
    first echo reply at OBSERVER."""
    a, b = lab.host(src), lab.host(dst)
    obs = lab.containers[OBSERVER]
    old = a.containers[MOVER]
    prober = Prober(obs.ns, old.ip)
    try:
        if prober.first_after(time.time() - 1, 5.0) is None:
            raise RuntimeError(f"{MOVER} on host {src} not reachable from {OBSERVER} "
                               "before the move")
        _stop_container(a, MOVER)
        time.sleep(MOVE_GAP_S)
        c = _boot_container(b, MOVER)
        garp = GarpSender(c)
        t0 = time.time()
        b.ovs.vsctl("add-port", "vmbr0", c.port)
        time.sleep(max(0.0, t0 + garp_after_s - time.time()))
        t_garp = garp.fire()
        t1 = prober.first_after(t0, timeout_s)
    finally:
        prober.stop()
    return {"from": src, "to": dst, "converged_s": None if t1 is None else t1 - t0,
            "garp_s": t_garp - t0}


def _recover(ctx: Context, lab: MeshLab, at: int) -> None:
    """After a move that did not converge: no traffic until host ``at``'s stale datapath
    flows have idled out, the container says hello again (GARP), then it must answer."""
    h = lab.host(at)
    waited = _wait_forgotten(ctx, h, container_mac(MOVER))
    GarpSender(h.containers[MOVER]).fire()
    obs = lab.containers[OBSERVER]
    wait_until(lambda: ping_ok(obs.ns, h.containers[MOVER].ip), 15.0,
               f"{MOVER} reachable again on host {at}", interval_s=0.2)
    ctx.log(f"recovered on host {at} (waited {waited:.1f} s for its datapath to forget "
            f"{MOVER}, then one more GARP)")


# ---------------------------------------------------------------- peer loss

_MESH_PEER = (3, 1)  # host 3 drops host 1


def _port_refs(ofport: int) -> re.Pattern[str]:
    return re.compile(rf"(?:output:|in_port=){ofport}(?![0-9])")


def _learned_to(h: MeshHost, ofport: int) -> list[str]:
    cookie = f"cookie={LEARNED_COOKIE:#x}"
    return [f for f in h.flows("mesh") if cookie in f and f.endswith(f"actions=output:{ofport}")]


def _link_exists(ns: str, name: str) -> bool:
    return nsl.run(None, ["ip", "-n", ns, "link", "show", "dev", name]).returncode == 0


def _peer_loss(ctx: Context, lab: MeshLab) -> dict[str, float]:
    me, peer = _MESH_PEER
    h = lab.host(me)
    port = h.vx_ports()[peer]
    key = lab.keys[f"h{peer}"].public
    src = lab.host(peer).containers[200 if peer == 1 else 210]
    dst = h.containers[220]
    ofport = h.ovs.ofport(port)
    if not wait_until(lambda: ping_ok(src.ns, dst.ip) and _learned_to(h, ofport), 10.0,
                      "a learned flow towards the peer's port", interval_s=0.2):
        raise RuntimeError("nothing learned behind the peer's port")
    refs = _port_refs(ofport)
    seen: dict[str, float] = {}
    t0 = time.time()
    h.wg("set", NETMAKER_IF, "peer", key, "remove")
    deadline = time.monotonic() + 15.0
    while len(seen) < 3 and time.monotonic() < deadline:
        now = time.time()
        if "device" not in seen and not _link_exists(h.host, port):
            seen["device"] = now
        if "port" not in seen and port not in h.ovs.vsctl("list-ports", "mesh").split():
            seen["port"] = now
        if "flows" not in seen and not any(refs.search(f) for f in h.flows("mesh")):
            seen["flows"] = now
        time.sleep(0.01)
    if len(seen) < 3:
        left = sorted({"device", "port", "flows"} - set(seen))
        raise RuntimeError(f"peer removed, still there after 15 s: {left}")
    out = {k: v - t0 for k, v in seen.items()}
    out["all"] = max(out.values())
    # back: the peer again, its handshake (a ping through the tunnel), its port, a container
    t1 = time.time()
    h.wg("set", NETMAKER_IF, *lab.netmaker_peer_args(peer))
    wait_until(lambda: ping_ok(h.host, mesh_ip(peer)), 15.0, "the handshake with the peer")
    wait_until(lambda: port in h.ovs.vsctl("list-ports", "mesh").split(), 15.0,
               "the peer's port back")
    out["port_back"] = time.time() - t1
    wait_until(lambda: ping_ok(src.ns, dst.ip), 15.0, "containers across the peer again",
               interval_s=0.1)
    out["reachable_back"] = time.time() - t1
    return out


@benchmark(
    "mesh_convergence",
    title="Mesh convergence: container move and peer loss (3 hosts, real WireGuard)",
    order=70,
    baseline="none (n/a): with three hosts one NORMAL flow per bridge over a full mesh of "
             "VXLAN ports is a forwarding loop, so there is no like-for-like baseline",
    method=(
        "One 3-host `labs.mesh_lab.MeshLab` (wireguard-go mesh, socknet on every host, its "
        "VXLAN port per peer). **Container move**: service container 201 moves between host "
        "1 (which declares it in host.yaml) and host 2 (which does not: it learns MAC/IP "
        "from its first packet), alternately. Container 220 on host 3 pings 10.0.0.201 "
        "every 5 ms (`ping -D`, permanent neighbour entry: the MAC does not change in a "
        "move). A move: the port and veth are deleted on the old host and the namespace "
        "goes (Proxmox stops the container); 0.5 s later the new namespace and veth exist "
        "on the new host (MTU 1370, same MAC/IP, empty neighbour cache); t0 is taken just "
        "before `ovs-vsctl add-port vmbr0 veth201i0` there; right after it returns the "
        "container sends one gratuitous ARP (request form, as `arping -U` / "
        "tests/test_mesh_learning.py; the sender is started beforehand); the figure is the "
        "timestamp of the first echo reply at host 3 minus t0 (resolution 5 ms). Before a "
        "timed move the datapath of the destination host must hold no megaflow towards "
        "201's MAC (OVS expires idle datapath flows after 10 s); a move that does not "
        "converge within 5 s is counted, left out of the medians, and the lab recovers "
        "before the next round. A separate round moves 201 back to host 1 immediately "
        "(<1 s) after it left it. **Peer loss**: host 3 runs `wg set netmaker peer <host "
        "1's key> remove` (t0 just before the command is spawned: ~10 ms of `ip netns exec "
        "+ unshare + wg` are counted); then every 10 ms: the VXLAN device gone (`ip link`), "
        "the port gone from the mesh bridge (`ovs-vsctl list-ports`), no mesh flow "
        "referencing its ofport (`ovs-ofctl dump-flows`: learned `output:N` flows, the "
        "flood list, `in_port=N`); before each round a ping 200 -> 220 makes host 3 learn "
        "a MAC behind that port. The controller follows the WireGuard peers every 2 s "
        "(`controller.peersync`), so the figure is mostly the phase of that timer. Then "
        "the peer is added back (`wg set`, a ping through the tunnel for the handshake) "
        "and the time until its port is back is reported too."
    ),
)
def mesh_convergence(ctx: Context) -> list[Row]:
    lab = mesh_lab(ctx, "c", 3)
    obs = lab.containers[OBSERVER]
    neigh(obs.ns, lab.containers[MOVER].ip, container_mac(MOVER))
    mac = container_mac(MOVER)
    moves = ctx.n(10, 2)
    ctx.log(f"{moves} container moves between hosts 1 and 2, observed from host 3")
    results: list[dict[str, Any]] = []
    waits: list[float] = []
    at = 1
    for i in range(moves):
        dst = 2 if at == 1 else 1
        waits.append(_wait_forgotten(ctx, lab.host(dst), mac))
        r = _move(lab, at, dst)
        results.append(r)
        ctx.log(f"move {i + 1}: host {at} -> {dst}: "
                + (f"{r['converged_s'] * 1000:.0f} ms" if r["converged_s"] is not None
                   else "NOT reachable within 5 s"))
        at = dst
        if r["converged_s"] is None:
            _recover(ctx, lab, at)
    # moved back at once: first 1 -> 2 (untimed), then 2 -> 1 as soon as it answered there
    back: list[dict[str, Any]] = []
    for i in range(ctx.n(2, 1)):
        if at == 2:
            _wait_forgotten(ctx, lab.host(1), mac)
            if _move(lab, 2, 1)["converged_s"] is None:
                _recover(ctx, lab, 1)
            at = 1
        _wait_forgotten(ctx, lab.host(2), mac)
        first = _move(lab, 1, 2)
        if first["converged_s"] is None:
            _recover(ctx, lab, 2)
        left = time.time()
        r = _move(lab, 2, 1)
        r["left_s_before"] = time.time() - left
        back.append(r)
        at = 1
        ctx.log(f"moved back at once {i + 1}: "
                + (f"{r['converged_s'] * 1000:.0f} ms" if r["converged_s"] is not None
                   else "NOT reachable within 5 s"))
        if r["converged_s"] is None:
            stale = dp_flows_to(lab.host(1), mac)
            ctx.log(f"host 1 datapath towards {mac}: {stale}")
            _recover(ctx, lab, 1)

    losses = ctx.n(10, 1)
    ctx.log(f"{losses} peer removals (host 3 drops host 1)")
    peer = [_peer_loss(ctx, lab) for _ in range(losses)]

    ms = 1000.0
    conv = [r["converged_s"] * ms for r in results if r["converged_s"] is not None]
    to2 = [r["converged_s"] * ms for r in results if r["to"] == 2 and r["converged_s"] is not None]
    to1 = [r["converged_s"] * ms for r in results if r["to"] == 1 and r["converged_s"] is not None]
    failed = [0 if r["converged_s"] is not None else 1 for r in results]
    back_failed = [0 if r["converged_s"] is not None else 1 for r in back]
    ctx.settings.update({"moves": moves, "probe_interval_ms": 5, "move_gap_s": MOVE_GAP_S,
                         "move_timeout_s": MOVE_TIMEOUT_S, "peer_removals": losses,
                         "peer_sync_interval_s": 2.0,
                         "moves_detail": results, "moved_back_detail": back,
                         "waited_for_datapath_expiry_s": [round(w, 2) for w in waits]})
    rows = [
        Row.of("container move -> reachable again from a third host", "ms", conv,
               target=Target.at_most(2000)),
        Row.of("container move -> reachable again from a third host", "ms", conv, stat="max"),
        Row.of("  host 1 -> host 2 (not declared there: learned from its GARP)", "ms", to2),
        Row.of("  host 2 -> host 1 (declared in its host.yaml)", "ms", to1),
        Row.of("  GARP sent (after add-port returned)", "ms",
               [r["garp_s"] * ms for r in results]),
        Row.of("container moves not reachable within 5 s", "moves", failed, stat="sum",
               target=Target.equals(0), note=f"of {len(failed)}"),
        Row.of("moved back to host 1 < 1 s after it left: not reachable within 5 s", "moves",
               back_failed, stat="sum", target=Target.equals(0),
               note=f"of {len(back_failed)}; times of the ones that converged: "
                    + (", ".join(f"{r['converged_s'] * 1000:.0f} ms" for r in back
                                 if r["converged_s"] is not None) or "none")),
        Row.of("peer removed -> its VXLAN port and every flow using it gone", "ms",
               [p["all"] * ms for p in peer]),
        Row.of("peer removed -> its VXLAN port and every flow using it gone", "ms",
               [p["all"] * ms for p in peer], stat="max"),
        Row.of("  peer removed -> port gone from OVSDB", "ms", [p["port"] * ms for p in peer]),
        Row.of("  peer removed -> VXLAN device deleted", "ms", [p["device"] * ms for p in peer]),
        Row.of("peer added back -> its port back (handshake included)", "ms",
               [p["port_back"] * ms for p in peer]),
        Row.of("peer added back -> containers across it reachable again", "ms",
               [p["reachable_back"] * ms for p in peer]),
    ]
    return rows


# ---------------------------------------------------------------- data plane

ECHO = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("READY", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    t = time.time_ns()
    s.sendto(data[:8] + struct.pack("!Q", t), addr)
"""

CLIENT = r"""
import json, socket, struct, sys, time
print("READY", flush=True)
for line in sys.stdin:
    dst, port = line.split()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new source port: a new 5-tuple
    s.settimeout(3.0)
    s.bind(("0.0.0.0", 0))
    t = time.time_ns()
    s.sendto(struct.pack("!Q", t), (dst, int(port)))
    try:
        data = s.recv(64)
        back = time.time_ns()
        arrived = struct.unpack("!QQ", data[:16])[1]
        out = {"one_way_us": (arrived - t) / 1000, "rtt_us": (back - t) / 1000,
               "sport": s.getsockname()[1]}
    except socket.timeout:
        out = {"lost": True}
    s.close()
    print(json.dumps(out), flush=True)
"""

ECHO_PORT = 7777
SRC, DST = 200, 210  # host 1 -> host 2


def _spawn_ready(ns: str, code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    proc = nsl.popen(ns, [sys.executable, "-c", code, *args],
                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        raise RuntimeError(f"[{ns}] helper did not start: {line}{proc.stderr.read()}")
    return proc


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


class FirstPacket:
    """The echo server in DST, the probing client in SRC, and the cache flushes."""

    def __init__(self, ctx: Context, lab: MeshLab, *, socknet: bool) -> None:
        self.lab = lab
        self.socknet = socknet
        self.src, self.dst = lab.containers[SRC], lab.containers[DST]
        server = _spawn_ready(self.dst.ns, ECHO, str(ECHO_PORT))
        ctx.defer(_stop, server)
        self.client = _spawn_ready(self.src.ns, CLIENT, stdin=True)
        ctx.defer(_stop, self.client)

    def probe(self) -> dict[str, Any]:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(f"{self.dst.ip} {ECHO_PORT}\n")
        self.client.stdin.flush()
        return dict(json.loads(self.client.stdout.readline()))

    def flush_datapath(self) -> None:
        for h in self.lab.hosts:
            h.ovs.appctl("dpctl/del-flows")

    def forget_l2(self) -> None:
        """As after every learned entry aged out: the containers' neighbour caches, the
        switches' learned MACs (socknet: its learn() flows; NORMAL: the fdb)."""
        for c in (self.src, self.dst):
            nsl.run(c.ns, ["ip", "neigh", "flush", "dev", "eth0"], check=True)
        for h in self.lab.hosts:
            if self.socknet:
                for br in ("mesh", "vmbr0"):
                    h.ovs.ofctl("del-flows", h.ovs.mgmt(br), f"cookie={LEARNED_COOKIE:#x}/-1")
            else:
                h.ovs.appctl("fdb/flush")

    def round(self, variant: str) -> dict[str, Any]:
        # the same warm start for every variant: both directions known everywhere
        if not ping_ok(self.src.ns, self.dst.ip):
            raise RuntimeError(f"{SRC} cannot reach {DST} before the probe")
        if variant == "cold_l2":
            self.forget_l2()
        if variant in ("cold_dp", "cold_l2"):
            self.flush_datapath()
        time.sleep(0.1)
        r = self.probe()
        if r.get("lost"):
            raise RuntimeError(f"first datagram ({variant}) got no echo within 3 s")
        return r


VARIANTS = {
    "new_5tuple": "new UDP 5-tuple, caches warm",
    "cold_dp": "new UDP 5-tuple, datapath flow cache flushed on both hosts",
    "cold_l2": "new UDP 5-tuple, datapath flushed + learned MACs and neighbour caches forgotten",
}


def _iperf(lab: MeshLab, seconds: int, omit: int) -> float:
    src, dst = lab.containers[SRC], lab.containers[DST]
    argv = ["iperf3", "-c", dst.ip, "-t", str(seconds), "-O", str(omit), "-J"]
    res = nsl.run(src.ns, argv, timeout=seconds + omit + 30)
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3 failed: {res.stdout[-500:]} {res.stderr[-500:]}") from exc
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    return float(end["sum_received"]["bits_per_second"] / 1e6)


@benchmark(
    "mesh_dataplane",
    title="Mesh data plane: first-packet latency and iperf3 TCP across the WireGuard mesh",
    order=75,
    baseline="the same 2-host MeshLab (same WireGuard, VXLAN ports, MTU 1370), controllers "
             "never started and one `actions=NORMAL` flow per bridge on every host",
    method=(
        "Two 2-host `labs.mesh_lab.MeshLab`s side by side: socknet on every host, and the "
        "baseline. Path: container 200 (host 1) -> veth -> vmbr0 -> from-mesh/to-socket -> "
        "mesh -> kernel VXLAN -> wireguard-go -> underlay -> wireguard-go -> VXLAN -> mesh "
        "-> vmbr0 -> container 210 (host 2). No policy: socknet's pipeline without the "
        "policy stage (classify with learn, spoof_guard, dispatch, learned service_l2; mesh "
        "isolation with learn, learned mesh_l2). **First packet**: a UDP echo server in "
        "210, a client in 200 that opens a new socket (a new source port, so a new 5-tuple) "
        "for every probe and sends one 8-byte datagram stamped with the wall clock; the "
        "server stamps its arrival and echoes. One-way = arrival - send (one kernel clock, "
        "so comparable); round trip = echo received - send. 'First' in three depths, each "
        "round starting from a warm state (a ping 200 -> 210 just before): (1) only the "
        "5-tuple is new, every cache warm; (2) in addition the datapath flow cache of both "
        "hosts is flushed (`ovs-appctl dpctl/del-flows`), so the datagram and its echo "
        "are translated by ovs-vswitchd through the OpenFlow tables at every bridge they "
        "cross (4 each way), which is where a longer pipeline costs; (3) in addition "
        "everything learned is forgotten, as after the entries aged out: both containers' "
        "neighbour caches are flushed, socknet's learned flows (cookie "
        f"{LEARNED_COOKIE:#x}) deleted on both bridges of both hosts, the baseline's "
        "`fdb/flush`ed; the datagram now waits for ARP (socknet answers it on host 1 from "
        "its controller-learned ARP responder; NORMAL floods it across the mesh) and both "
        "directions are flooded until learned. **Throughput**: `iperf3 -c 10.0.0.210 -t 5 "
        "-O 1` (one TCP stream, first second omitted, receiver's rate) from 200 to 210; TSO "
        "and tx checksum offload off on the veths as the labs run, MSS from the "
        "containers' MTU 1370. Rounds alternate socknet/baseline (ABBA)."
    ),
)
def mesh_dataplane(ctx: Context) -> list[Row]:
    labs = {"socknet": mesh_lab(ctx, "s", 2), "baseline": mesh_lab(ctx, "n", 2, normal=True)}
    for kind, lab in labs.items():
        src, dst = lab.containers[SRC], lab.containers[DST]
        if not wait_until(lambda src=src, dst=dst: ping_ok(src.ns, dst.ip), 10.0,
                          f"{kind}: {SRC} reaching {DST}", interval_s=0.2):
            raise RuntimeError(f"{kind}: {SRC} cannot reach {DST}")
        server = nsl.popen(dst.ns, ["iperf3", "-s"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        ctx.defer(_stop, server)
    probes = {k: FirstPacket(ctx, lab, socknet=k == "socknet") for k, lab in labs.items()}
    rounds = ctx.n(20, 2)
    ctx.settings.update({"first_packet_rounds": rounds})
    rows: list[Row] = []
    us = 1000.0
    for variant, label in VARIANTS.items():
        ctx.log(f"first packet, {label}: {rounds} rounds each")
        s, b = alternate(rounds, lambda _i, v=variant: probes["socknet"].round(v),
                         lambda _i, v=variant: probes["baseline"].round(v))
        rows.append(Row.of(f"first packet one-way ({label})", "ms",
                           [r["one_way_us"] / us for r in s], [r["one_way_us"] / us for r in b]))
        rows.append(Row.of(f"first packet round trip ({label})", "ms",
                           [r["rtt_us"] / us for r in s], [r["rtt_us"] / us for r in b]))
    seconds, omit = ctx.pick(5, 1), ctx.pick(1, 0)
    rounds = ctx.n(3, 1)
    ctx.settings.update({"iperf_seconds": seconds, "iperf_omit_s": omit, "iperf_rounds": rounds})
    time.sleep(0.5)
    ctx.log(f"iperf3 TCP host 1 -> host 2: {rounds} rounds x {seconds} s")
    s, b = alternate(rounds, lambda _i: _iperf(labs["socknet"], seconds, omit),
                     lambda _i: _iperf(labs["baseline"], seconds, omit))
    rows.append(Row.of("iperf3 TCP container on host 1 -> container on host 2", "Mbit/s", s, b,
                       target=Target.ratio_at_least(0.9)))
    return rows
