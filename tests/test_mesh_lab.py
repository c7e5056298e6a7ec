"""Two simulated Proxmox hosts on a real WireGuard mesh (labs.mesh_lab), real packets.

One lab for the module (it comes up in about 6 s); tests that change it put it
back as they found it.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from controller import wgpeers
from labs import netns as nsl
from labs.lab import INTERNET_IP
from labs.mesh_lab import (
    EXIT_UNDERLAY_IP,
    EXIT_WG_PORT,
    NETMAKER_IF,
    NETMAKER_PORT,
    VXLAN_MTU,
    MeshLab,
    mesh_ip,
    underlay_ip,
)
from labs.pkt import Sniffer

pytestmark = pytest.mark.ovs

_MISSING = [b for b in ("wireguard-go", "wg", "unshare") if shutil.which(b) is None]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    if _MISSING:
        pytest.skip(f"not installed: {', '.join(_MISSING)} (make deps)")
    lab = MeshLab(f"m{secrets.token_hex(2)}", tmp_path_factory.mktemp("mesh"), hosts=2)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def ping(ns: str, dst: str, count: int = 2) -> bool:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst]
    return nsl.run(ns, argv).returncode == 0


def serve(ns: str, code: str) -> subprocess.Popen[str]:
    """Start ``python -c code`` in ``ns``; return once it printed its first line (ready)."""
    proc = nsl.popen(ns, [sys.executable, "-u", "-c", code], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"server in {ns} did not start: {line}{proc.stderr.read()}")
    return proc


def wg_frames_only(frames: list[str]) -> list[tuple[str, str, int, int]]:
    """Every frame captured on the underlay must be WireGuard UDP (or underlay ARP).

    Returns (src, dst, sport, dport) of the WireGuard packets; fails on anything else.
    """
    out = []
    for hexframe in frames:
        pkt = Ether(bytes.fromhex(hexframe))
        if ARP in pkt:
            assert {pkt[ARP].psrc, pkt[ARP].pdst} <= {underlay_ip(1), underlay_ip(2),
                                                      EXIT_UNDERLAY_IP}, pkt.summary()
            continue
        assert IP in pkt and UDP in pkt, f"not UDP on the underlay: {pkt.summary()}"
        payload = bytes(pkt[UDP].payload)
        # WireGuard: type 1-4, then three reserved zero bytes
        assert payload[:1] in (b"\x01", b"\x02", b"\x03", b"\x04") and payload[1:4] == b"\0\0\0", \
            f"not WireGuard: {pkt.summary()}"
        out.append((pkt[IP].src, pkt[IP].dst, pkt[UDP].sport, pkt[UDP].dport))
    return out


# ------------------------------------------------------------------ the mesh itself

def test_wireguard_handshakes_are_real(lab: MeshLab):
    for h in lab.hosts:
        out = h.wg("show", NETMAKER_IF, "latest-handshakes").stdout
        stamps = dict(line.split("\t") for line in out.splitlines())
        peers = {lab.keys[f"h{m}"].public for m in h.peers()}
        assert set(stamps) == peers
        assert all(int(ts) > 0 for ts in stamps.values()), out
        # and the private mount namespaces keep the two `netmaker` sockets apart
        assert h.wg("show", NETMAKER_IF, "public-key").stdout.strip() == \
            lab.keys[f"h{h.index}"].public


def test_one_vxlan_port_per_peer_on_the_mesh_bridge(lab: MeshLab):
    for h in lab.hosts:
        assert h.ovs.vsctl("list-ports", "mesh").split() == sorted(["to-socket",
                                                                   *h.vx_ports().values()])
        for m, port in h.vx_ports().items():
            assert h.ovs.ofport(port) > 0
            details = nsl.run(h.host, ["ip", "-d", "link", "show", port]).stdout
            assert f"mtu {VXLAN_MTU}" in details
            assert f"vxlan id {lab.vni(h.index, m)} remote {mesh_ip(m)} local {h.mesh_ip} " \
                   f"dev {NETMAKER_IF}" in details


def test_wgpeers_reads_each_hosts_netmaker_peers(lab: MeshLab):
    for h in lab.hosts:
        reading = wgpeers.read_peers(NETMAKER_IF, sock_dir=h.sock_dir)
        assert reading.source == "uapi"
        got = {(p.public_key, p.endpoint, p.allowed_ips) for p in reading.peers}
        assert got == {(lab.keys[f"h{m}"].public, f"{underlay_ip(m)}:{NETMAKER_PORT}",
                        (f"{mesh_ip(m)}/32",)) for m in h.peers()}
        assert all(not p.is_stale() and p.rx_bytes > 0 for p in reading.peers)
        # the same through `wg show dump` in the host's mount namespace
        shown = wgpeers.peers_from_wg_show(NETMAKER_IF, h.wg_cmd())
        assert {(p.public_key, p.endpoint, p.allowed_ips) for p in shown} == got


# ------------------------------------------------------------------ services across hosts

def test_icmp_between_service_containers_on_two_hosts(lab: MeshLab):
    c = lab.containers
    assert ping(c[200].ns, c[210].ip)
    assert ping(c[211].ns, c[201].ip)
    # full-size packets for the mesh MTU, don't fragment
    res = nsl.run(c[201].ns, ["ping", "-c", "1", "-W", "2", "-M", "do", "-s",
                              str(VXLAN_MTU - 28), c[210].ip])
    assert res.returncode == 0, res.stdout


def test_tcp_between_service_containers_on_two_hosts(lab: MeshLab):
    c = lab.containers
    server = serve(c[210].ns, (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{c[210].ip}', 8080)); s.listen(); print('ready')\n"
        "a, peer = s.accept(); data = b''\n"
        "while (chunk := a.recv(65536)): data += chunk\n"
        "a.sendall(peer[0].encode() + b' ' + str(len(data)).encode()); a.close()\n"
    ))
    try:
        res = nsl.run(c[200].ns, [sys.executable, "-c", (
            "import socket\n"
            f"s = socket.create_connection(('{c[210].ip}', 8080), timeout=5)\n"
            "s.sendall(b'x' * 300000); s.shutdown(socket.SHUT_WR)\n"
            "print(s.recv(100).decode())\n"
        )], timeout=20)
        assert res.stdout.strip() == f"{c[200].ip} 300000", res.stderr
    finally:
        server.kill()
        server.wait()


def test_udp_between_service_containers_on_two_hosts(lab: MeshLab):
    c = lab.containers
    server = serve(c[211].ns, (
        "import socket\n"
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{c[211].ip}', 5353))\n"
        "print('ready')\n"
        "d, peer = s.recvfrom(2000); s.sendto(d.upper(), peer)\n"
    ))
    try:
        res = nsl.run(c[201].ns, [sys.executable, "-c", (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
            f"s.sendto(b'hello mesh', ('{c[211].ip}', 5353)); print(s.recvfrom(2000)[0].decode())\n"
        )], timeout=10)
        assert res.stdout.strip() == "HELLO MESH", res.stderr
    finally:
        server.kill()
        server.wait()


def test_cross_host_traffic_is_encrypted_on_the_underlay(lab: MeshLab):
    c = lab.containers
    marker = b"SOCKNET-MESH-" + secrets.token_hex(4).encode()
    with Sniffer(lab.underlay_ns, "h1", 2.0) as s:
        res = nsl.run(c[200].ns, [sys.executable, "-c", (
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(5): s.sendto({marker!r}, ('{c[210].ip}', 9)); time.sleep(0.05)\n"
        )])
        assert res.returncode == 0, res.stderr
        frames = s.result()["frames"]
    assert not any(marker.hex() in f for f in frames)
    wg = wg_frames_only(frames)
    hosts = {underlay_ip(1), underlay_ip(2)}
    mesh = [w for w in wg if {w[0], w[1]} == hosts and w[2] == w[3] == NETMAKER_PORT]
    assert sum(1 for w in mesh if w[0] == underlay_ip(1)) >= 5
    # anything else is the WARP tunnel's own traffic (a keepalive, say) to or from the exit
    assert all(EXIT_WG_PORT in (w[2], w[3]) for w in wg if w not in mesh)


def test_service_container_cannot_reach_a_privacy_container_on_another_host(lab: MeshLab):
    c = lab.containers
    assert not ping(c[210].ns, c[100].ip, count=1)
    assert not ping(c[100].ns, c[210].ip, count=1)


# ------------------------------------------------------------------ WARP

def _privacy_udp(lab: MeshLab, vmid: int, marker: bytes, count: int = 5) -> None:
    c = lab.containers[vmid]
    res = nsl.run(c.ns, [sys.executable, "-c", (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({count}): s.sendto({marker!r}, ('{INTERNET_IP}', 9)); time.sleep(0.05)\n"
    )])
    assert res.returncode == 0, res.stderr


def test_privacy_container_reaches_the_internet_only_through_warp(lab: MeshLab):
    c100 = lab.containers[100]
    marker = b"SOCKNET-PRIVACY-" + secrets.token_hex(4).encode()
    exit_side = Sniffer(lab.exit_ns, "up0", 2.5, f"udp and host {INTERNET_IP}").start()
    underlay = {port: Sniffer(lab.underlay_ns, port, 2.5).start() for port in ("h1", "h2", "x")}
    try:
        _privacy_udp(lab, 100, marker)
        arrived = [Ether(bytes.fromhex(f)) for f in exit_side.result()["frames"]]
        captured = {port: s.result()["frames"] for port, s in underlay.items()}
    finally:
        for s in (exit_side, *underlay.values()):
            s.close()
    # at the exit, in clear, from the container's own address
    assert sum(1 for p in arrived if marker in bytes(p[UDP].payload)
               and p[IP].src == c100.ip) == 5
    # on the underlay: never in clear, only WireGuard to the exit
    for port, frames in captured.items():
        assert not any(marker.hex() in f or c100.mac.replace(":", "") in f for f in frames), port
    to_exit = [w for w in wg_frames_only(captured["h1"]) if w[1] == EXIT_UNDERLAY_IP]
    assert len(to_exit) >= 5 and {w[3] for w in to_exit} == {EXIT_WG_PORT}
    wg_frames_only(captured["h2"])
    assert len(wg_frames_only(captured["x"])) >= 5


def test_privacy_replies_come_back_through_warp(lab: MeshLab):
    c = lab.containers
    server = serve(lab.inet_ns, (
        "import socket\n"
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{INTERNET_IP}', 7))\n"
        "print('ready')\n"
        "for _ in range(2):\n"
        "    d, peer = s.recvfrom(2000); s.sendto(peer[0].encode() + b' ' + d, peer)\n"
    ))
    try:
        for vmid in (100, 110):
            res = nsl.run(c[vmid].ns, [sys.executable, "-c", (
                "import socket\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
                f"s.sendto(b'hi', ('{INTERNET_IP}', 7)); print(s.recvfrom(2000)[0].decode())\n"
            )], timeout=10)
            assert res.stdout.strip() == f"{c[vmid].ip} hi", res.stderr
    finally:
        server.kill()
        server.wait()
    # TCP too: through the privacy pipeline's conntrack (valid checksums needed) and back
    server = serve(lab.inet_ns, (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{INTERNET_IP}', 443)); s.listen(); print('ready')\n"
        "a, peer = s.accept(); a.sendall(peer[0].encode() + b' ' + a.recv(100)); a.close()\n"
    ))
    try:
        res = nsl.run(c[100].ns, [sys.executable, "-c", (
            "import socket\n"
            f"s = socket.create_connection(('{INTERNET_IP}', 443), timeout=5)\n"
            "s.sendall(b'tls?'); print(s.recv(100).decode())\n"
        )], timeout=15)
        assert res.stdout.strip() == f"{c[100].ip} tls?", res.stderr
    finally:
        server.kill()
        server.wait()
    assert not ping(c[200].ns, INTERNET_IP, count=1)  # services have no way out to WARP


def test_warp_router_kill_switch(lab: MeshLab):
    c100 = lab.containers[100]
    h1 = lab.host(1)
    marker = b"SOCKNET-KILL-" + secrets.token_hex(4).encode()
    lab.warp_down(1)
    try:
        sniffers = [Sniffer(lab.underlay_ns, "h1", 2.0).start(),
                    Sniffer(h1.router_ns, "wan0", 2.0).start(),
                    Sniffer(lab.exit_ns, "up0", 2.0, "udp").start()]
        try:
            _privacy_udp(lab, 100, marker)
            results = [s.result()["frames"] for s in sniffers]
        finally:
            for s in sniffers:
                s.close()
        for frames in results:
            assert not any(marker.hex() in f or c100.mac.replace(":", "") in f
                           for f in frames)
        assert not ping(c100.ns, INTERNET_IP, count=1)
    finally:
        lab.warp_up(1)
    deadline = time.monotonic() + 5
    while not ping(c100.ns, INTERNET_IP, count=1):
        assert time.monotonic() < deadline, "WARP did not come back"
