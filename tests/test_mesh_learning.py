"""Host learning across a real 3-host WireGuard mesh (labs.mesh_lab), real packets.

socknet manages the per-peer VXLAN ports itself here (host.yaml ``vxlan: true``).
test_mesh_lab.py covers two hosts exchanging ICMP/TCP/UDP; this module adds the
third host and what learning buys: no flooding of known unicast to uninvolved
peers, ARP answered on the local host, a moved container found again, a
removed WireGuard peer losing its port and flows.

Convergence times (container move, peer removal) are measured, not asserted,
and written to ``$SOCKNET_RESULTS_DIR/mesh-convergence.json`` (default: the
system temp directory) for the benchmarks.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.l2 import ARP, Ether

from labs import conn
from labs import netns as nsl
from labs.lab import container_mac
from labs.mesh_lab import NETMAKER_IF, MeshHost, MeshLab, mesh_ip
from labs.ovs_instance import OvsError
from labs.pkt import Sniffer
from labs.waiting import eventually
from topology.model import LEARNED_COOKIE

pytestmark = pytest.mark.ovs

_MISSING = [b for b in ("wireguard-go", "wg", "unshare") if shutil.which(b) is None]
SYNC_PERIOD_S = 2.0  # controller.peersync.SYNC_INTERVAL_S
RESULTS = Path(os.environ.get("SOCKNET_RESULTS_DIR", tempfile.gettempdir())) / \
    "mesh-convergence.json"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    if _MISSING:
        pytest.skip(f"not installed: {', '.join(_MISSING)} (make deps)")
    lab = MeshLab(f"l{secrets.token_hex(2)}", tmp_path_factory.mktemp("meshl"), hosts=3)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def ping(ns: str, dst: str, count: int = 2) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", dst]
    return nsl.run(ns, argv).returncode == 0



def record(key: str, value: dict[str, Any]) -> None:
    """Add one measurement to the results file (read by the benchmark report)."""
    try:
        data = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = {**value, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"{key}: {value} (-> {RESULTS})")


def pair_bpf(a: str, b: str) -> str:
    return f"(ether src {a} and ether dst {b}) or (ether src {b} and ether dst {a})"


def garp(mac: str, ip: str) -> bytes:
    """What a container's network setup sends when it comes up (arping -U)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    return (b"\xff" * 6 + hw + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01"
            + hw + addr + b"\x00" * 6 + addr)


def send_raw(ns: str, frame: bytes) -> None:
    """One raw frame out of eth0 (no scapy start-up: this is on the clock)."""
    code = ("import socket,sys; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
            "s.bind(('eth0', 0)); s.send(bytes.fromhex(sys.argv[1]))")
    res = nsl.run(ns, ["python3", "-c", code, frame.hex()])
    assert res.returncode == 0, res.stderr


def mesh_flows(h: MeshHost) -> list[str]:
    return h.flows("mesh")


def _ofport(h: MeshHost, port: str) -> int | None:
    try:
        return h.ovs.ofport(port)
    except OvsError:  # not (yet) in OVSDB
        return None


def learned_to(h: MeshHost, ofport: int) -> list[str]:
    return [f for f in mesh_flows(h)
            if f"cookie={LEARNED_COOKIE:#x}" in f and f.endswith(f"actions=output:{ofport}")]


# ------------------------------------------------------------------ the third host

@pytest.mark.parametrize("a,b", [(220, 200), (211, 220)])
def test_icmp_tcp_udp_with_the_third_host(lab: MeshLab, a: int, b: int):
    c = lab.containers
    assert ping(c[a].ns, c[b].ip)
    servers = [conn.server(c[b].ns, proto, c[b].ip, 7000) for proto in ("tcp", "udp")]
    try:
        for proto in ("tcp", "udp"):
            assert conn.connect(c[a].ns, proto, c[a].ip, c[b].ip, 7000, timeout_s=3), proto
    finally:
        for s in servers:
            s.kill()
            s.wait()


def test_known_unicast_between_two_hosts_never_reaches_the_third(lab: MeshLab):
    c = lab.containers
    h3 = lab.host(3)
    a, b = c[200], c[210]  # host 1 and host 2
    assert ping(a.ns, b.ip)  # the first exchange: both hosts learn where the other MAC is
    towards = h3.vx_ports()  # host 3's ports towards hosts 1 and 2
    bpf = f"{pair_bpf(a.mac, b.mac)} or {pair_bpf(a.mac, c[220].mac)}"
    sniffers = {m: Sniffer(h3.host, port, 3.0, bpf).start() for m, port in towards.items()}
    sniffers[0] = Sniffer(h3.host, "from-mesh", 3.0, pair_bpf(a.mac, b.mac)).start()
    server = conn.server(b.ns, "tcp", b.ip, 7001)
    try:
        assert ping(a.ns, b.ip, count=5)
        assert ping(c[211].ns, c[201].ip, count=3)
        assert conn.connect(a.ns, "tcp", a.ip, b.ip, 7001, timeout_s=3)
        assert ping(a.ns, c[220].ip, count=1)  # control: traffic for host 3 is seen
        seen = {m: s.result()["frames"] for m, s in sniffers.items()}
    finally:
        server.kill()
        server.wait()
        for s in sniffers.values():
            s.close()

    def of_pair(frames: list[str], x: str, y: str) -> list[str]:
        out = []
        for f in frames:
            e = Ether(bytes.fromhex(f))
            if {e.src, e.dst} == {x, y}:
                out.append(e.summary())
        return out

    for m, frames in seen.items():
        assert of_pair(frames, a.mac, b.mac) == [], f"host 3 port {m}"
        assert of_pair(frames, c[201].mac, c[211].mac) == [], f"host 3 port {m}"
    assert of_pair(seen[1], a.mac, c[220].mac), "control: the sniffer saw nothing"


def test_arp_for_a_known_remote_address_is_answered_on_the_local_host(lab: MeshLab):
    c = lab.containers
    h1 = lab.host(1)
    a, b = c[200], c[210]
    assert ping(a.ns, b.ip)
    # host 1 knows 210 (learned from ARP that crossed the mesh): it answers for it
    assert eventually(lambda: any(re.search(rf"arp_tpa={re.escape(b.ip)}\b", f)
                                         for f in h1.flows("vmbr0")), 5.0)
    nsl.run(a.ns, ["ip", "neigh", "flush", "dev", "eth0"], check=True)
    mesh_side = [Sniffer(h1.host, port, 2.0, "arp").start() for port in h1.vx_ports().values()]
    mesh_side.append(Sniffer(h1.host, "to-socket", 2.0, "arp").start())
    in_container = Sniffer(a.ns, "eth0", 2.0, "arp").start()
    try:
        assert ping(a.ns, b.ip, count=1)
        frames = [f for s in mesh_side for f in s.result()["frames"]]
        local = [Ether(bytes.fromhex(f)) for f in in_container.result()["frames"]]
    finally:
        for s in (*mesh_side, in_container):
            s.close()
    asked = [p for p in local if ARP in p and p[ARP].op == 1 and p[ARP].pdst == b.ip]
    answered = [p for p in local if ARP in p and p[ARP].op == 2 and p[ARP].psrc == b.ip
                and p[ARP].hwsrc == b.mac and p[ARP].pdst == a.ip]
    assert asked and answered, [p.summary() for p in local]
    leaked = [Ether(bytes.fromhex(f)) for f in frames]
    assert [p.summary() for p in leaked if ARP in p and p[ARP].psrc == a.ip] == []
    neigh = nsl.run(a.ns, ["ip", "neigh", "show", b.ip]).stdout
    assert b.mac in neigh.lower()


# ------------------------------------------------------------------ a container moves

def _start_prober(ns: str, dst: str) -> subprocess.Popen[bytes]:
    """ping every 20 ms with a wall-clock stamp on each reply (-D), until killed."""
    return nsl.popen(ns, ["ping", "-D", "-n", "-i", "0.02", "-W", "1", dst],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


_REPLY = re.compile(r"^\[(?P<t>\d+\.\d+)\] \d+ bytes from ")


def _first_reply_after(proc: subprocess.Popen[bytes], t0: float,
                       timeout_s: float) -> float | None:
    """Epoch time of the first echo reply stamped after ``t0`` (None: none in time)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(0.1):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                m = _REPLY.match(line.decode(errors="replace"))
                if m and float(m.group("t")) > t0:
                    return float(m.group("t"))
    return None


def test_a_moved_container_is_reachable_again(lab: MeshLab):
    h1, h2 = lab.host(1), lab.host(2)
    c201, c220 = lab.containers[201], lab.containers[220]
    assert ping(c220.ns, c201.ip)  # host 3 has learned that 201 is behind host 1
    prober = _start_prober(c220.ns, c201.ip)
    try:
        # stop on host 1: Proxmox deletes the port and the veth; the container is gone
        h1.remove_container(201)
        nsl.delete_netns(c201.ns, kill_procs=True)
        del h1.containers[201]
        assert not ping(c220.ns, c201.ip, count=1)
        # start on host 2 with the same MAC and IP (host 2's host.yaml does not know it)
        t0 = time.time()
        moved = h2.add_container(201)
        assert moved.mac == container_mac(201) and moved.ip == c201.ip
        send_raw(moved.ns, garp(moved.mac, moved.ip))  # its network setup says hello
        t1 = _first_reply_after(prober, t0, 20.0)
    finally:
        prober.kill()
        prober.wait()
    record("container_move", {"hosts": 3, "from": 1, "to": 2, "probe_interval_s": 0.02,
                              "converged_s": None if t1 is None else round(t1 - t0, 3)})
    assert t1 is not None, "201 not reachable from host 3 within 20 s of its move"
    assert ping(c220.ns, c201.ip)
    assert ping(lab.containers[200].ns, c201.ip)  # and from its old host


# ------------------------------------------------------------------ a peer goes away

def test_a_device_deleted_behind_socknets_back_comes_back_with_a_working_port(lab: MeshLab):
    """netdev datapath: OVS keeps a port whose device was deleted and does not re-bind a
    new device of that name; the sync re-adds the port, and traffic flows again."""
    h2 = lab.host(2)
    port = h2.vx_ports()[3]
    before = h2.ovs.ofport(port)
    nsl.delete_link(h2.host, port)
    assert eventually(lambda: nsl.link_exists(h2.host, port), SYNC_PERIOD_S + 8.0, 0.05)
    assert eventually(lambda: _ofport(h2, port) not in (None, before, -1), 10.0)
    assert eventually(lambda: ping(lab.containers[210].ns, lab.containers[220].ip, count=1),
                      10.0)


def test_a_peer_removed_from_wireguard_loses_its_port_and_flows(lab: MeshLab):
    h3 = lab.host(3)
    port = h3.vx_ports()[1]  # host 3's port towards host 1
    ofport = h3.ovs.ofport(port)
    key1 = lab.keys["h1"].public
    assert ping(lab.containers[200].ns, lab.containers[220].ip)
    assert learned_to(h3, ofport), "nothing learned behind host 1's port"
    t0 = time.monotonic()
    h3.wg("set", NETMAKER_IF, "peer", key1, "remove")
    try:
        def gone() -> bool:
            return (not nsl.link_exists(h3.host, port)
                    and port not in h3.ovs.vsctl("list-ports", "mesh").split()
                    and not any(f"output:{ofport}" in f or f"in_port={ofport}" in f
                                for f in mesh_flows(h3)))
        ok = eventually(gone, SYNC_PERIOD_S + 8.0, 0.05)
        record("peer_removed", {"hosts": 3, "sync_period_s": SYNC_PERIOD_S,
                                "converged_s": round(time.monotonic() - t0, 3) if ok else None})
        assert ok, mesh_flows(h3)
        # logged once the whole sync pass is done, which may be a moment after the port
        # and its flows are gone
        assert eventually(lambda: any(
            port in str(e.get("port")) for e in h3.log_events()
            if e.get("event") == "mesh_peer_port_removed"), 10.0)
        status = json.loads(h3.socknet("status", "--json", check=False).stdout)
        peers = {p["public_key"] for p in status["mesh_peers"]["peers"]}
        assert key1 not in peers
        # host 3 still reaches host 2's containers, and not host 1's
        assert ping(lab.containers[220].ns, lab.containers[210].ip)
        assert not ping(lab.containers[220].ns, lab.containers[200].ip, count=1)
    finally:
        h3.wg("set", NETMAKER_IF, *lab.netmaker_peer_args(1))
    # back: the handshake comes with the keepalive, then the port
    assert eventually(lambda: ping(h3.host, mesh_ip(1), count=1), 10.0)
    assert eventually(lambda: port in h3.ovs.vsctl("list-ports", "mesh").split(), 10.0)
    assert eventually(lambda: ping(lab.containers[220].ns, lab.containers[200].ip, count=1),
                      10.0)
