"""The controller on real OVS (netdev), real namespaces, real packets.

One lab per module (bringing it up costs a few seconds); tests that change
the lab put it back as they found it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from labs import netns as nsl
from labs.lab import INTERNET_IP, MESH_SERVICE_IP, MESH_USER_IP, SocketLab
from labs.pkt import Sniffer, send_frame
from topology.model import Owner, cookie_owner
from topology.pipeline import METER_RATES

pytestmark = pytest.mark.ovs

BROADCAST = "ff:ff:ff:ff:ff:ff"


def ping(ns: str, dst: str, src: str | None = None, count: int = 2) -> bool:
    argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "1", dst]
    if src:
        argv[1:1] = ["-I", src]
    return nsl.run(ns, argv).returncode == 0


def wait_for(pred, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketLab]:
    import secrets

    lab = SocketLab(f"s{secrets.token_hex(2)}", tmp_path_factory.mktemp("lab"))
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def _socknet_flows(lab: SocketLab, bridge: str) -> str:
    snap = {}
    for line in lab.ovs.vsctl("--format=csv", "--no-headings", "--columns=name,ofport",
                              "list", "Interface").splitlines():
        name, ofport = line.split(",")
        snap[name.strip('"')] = int(ofport)
    ports = [n for n in lab.ovs.vsctl("list-ports", bridge).split()]
    args = [f"--port={bridge}:{p}={snap[p]}" for p in ports if snap.get(p, -1) > 0]
    res = subprocess.run([sys.executable, "-m", "controller.cli", "flows", "-c",
                          str(lab.config_path), "--bridge", bridge, *args],
                         capture_output=True, text=True, check=True)
    return res.stdout


def _normalised(lines: list[str]) -> list[str]:
    """Drop flows from run-time learning (OVS learn, controller discoveries) and the
    volatile fields; sort. `socknet flows` prints what config and ports determine."""
    out = []
    for line in lines:
        cookie = int(line.split("cookie=0x", 1)[1].split(",", 1)[0], 16)
        if cookie_owner(cookie) in (Owner.LEARNED, Owner.DISCOVERED):
            continue
        line = re.sub(r"(duration|n_packets|n_bytes|idle_age|hard_age)=[^,]+, ?", "", line)
        out.append(line.strip())
    return sorted(out)


# ------------------------------------------------------------------ mesh bridge

def test_mesh_uplink_and_to_socket_forwarded_other_ports_dropped(lab: SocketLab):
    # uplink -> to-socket -> vmbr0 -> service container: a broadcast reaches service 200
    c = lab.containers
    frame = bytes(Ether(src="02:00:00:00:ee:01", dst=BROADCAST) /
                  IP(src=MESH_SERVICE_IP, dst="10.0.0.255") / UDP(sport=1000, dport=9))
    with Sniffer(c[200].ns, "eth0", 1.5, "udp port 9") as s200:
        send_frame(lab.mesh_ns, "eth0", frame, count=3, interval=0.05)
        assert s200.result()["count"] == 3
    # and back: service 200 -> mesh peer works both ways
    assert ping(c[200].ns, MESH_SERVICE_IP)
    # a rogue port on the mesh bridge: its frames go nowhere
    rogue = f"{lab.prefix}r"
    nsl.create_netns(rogue)
    try:
        nsl.add_veth("rogue0", "eth0", lab.host, rogue)
        nsl.add_addr(rogue, "eth0", "10.0.0.99/24")
        lab.ovs.add_port("mesh", "rogue0")
        with Sniffer(lab.host, "to-socket", 1.5) as s_sock, \
                Sniffer(lab.mesh_ns, "eth0", 1.5, "udp port 9") as s_mesh:
            send_frame(rogue, "eth0", bytes(Ether(src="02:00:00:00:99:99", dst=BROADCAST) /
                       IP(src="10.0.0.99", dst="10.0.0.255") / UDP(dport=9)), count=3)
            assert s_sock.result()["count"] == 0
            assert s_mesh.result()["count"] == 0
        # and nothing from the mesh or the socket side reaches the rogue port
        with Sniffer(rogue, "eth0", 1.5, "udp port 9") as s_rogue:
            send_frame(lab.mesh_ns, "eth0", frame, count=2)
            send_frame(c[200].ns, "eth0", bytes(Ether(src=c[200].mac, dst=BROADCAST) /
                       IP(src=c[200].ip, dst="10.0.0.255") / UDP(dport=9)), count=2)
            assert s_rogue.result()["count"] == 0
    finally:
        lab.ovs.vsctl("--if-exists", "del-port", "mesh", "rogue0")
        nsl.delete_netns(rogue, kill_procs=True)


# ------------------------------------------------------------------ vmbr0

def test_privacy_packets_only_on_warp(lab: SocketLab):
    c = lab.containers
    frames = [
        Ether(src=c[100].mac, dst=BROADCAST) / ARP(op=1, psrc=c[100].ip, hwsrc=c[100].mac,
                                                   pdst=c[200].ip),
        Ether(src=c[100].mac, dst=c[200].mac) / IP(src=c[100].ip, dst=c[200].ip) / ICMP(),
        Ether(src=c[100].mac, dst="02:00:00:00:ee:01") / IP(src=c[100].ip, dst=MESH_SERVICE_IP)
        / UDP(dport=9),
        Ether(src=c[100].mac, dst=BROADCAST) / IP(src=c[100].ip, dst="10.0.0.255") / UDP(dport=9),
        Ether(src=c[100].mac, dst="02:00:00:00:ff:01") / IP(src=c[100].ip, dst=INTERNET_IP)
        / UDP(dport=9),
    ]
    bpf = "ether src " + c[100].mac
    others = [(c[v].ns, "eth0") for v in (102, 200, 201)] + [(lab.mesh_ns, "eth0"),
                                                            (lab.host, "from-mesh")]
    sniffers = [Sniffer(ns, iface, 2.0, bpf).start() for ns, iface in others]
    # the container itself may answer the exit router's ARP: count only what we sent
    warp = Sniffer(lab.exit_ns, "eth0", 2.0, f"{bpf} and not (arp and arp[6:2] = 2)").start()
    try:
        for f in frames:
            send_frame(c[100].ns, "eth0", bytes(f))
        counts = {
            f"{ns}/{iface}": s.result()["count"]
            for (ns, iface), s in zip(others, sniffers, strict=True)
        }
        assert counts == {k: 0 for k in counts}
        assert warp.result()["count"] == len(frames)
    finally:
        for s in (*sniffers, warp):
            s.close()
    # and real traffic through WARP works
    assert ping(c[100].ns, INTERNET_IP)
    assert not ping(c[100].ns, c[200].ip)
    assert not ping(c[100].ns, c[102].ip)


def test_warp_return_only_to_its_container(lab: SocketLab):
    c = lab.containers
    assert ping(c[102].ns, INTERNET_IP)  # 102 talks: its MAC is learned behind its port
    reply = bytes(Ether(src="02:00:00:00:ff:01", dst=c[102].mac) /
                  IP(src=INTERNET_IP, dst=c[102].ip) / UDP(sport=9, dport=7777))
    sniffers = {
        v: Sniffer(c[v].ns, "eth0", 1.5, "udp port 7777").start() for v in (100, 102, 200)
    }
    mesh = Sniffer(lab.mesh_ns, "eth0", 1.5, "udp port 7777").start()
    send_frame(lab.exit_ns, "eth0", reply, count=2)
    got = {v: s.result()["count"] for v, s in sniffers.items()}
    assert got == {100: 0, 102: 2, 200: 0}
    assert mesh.result()["count"] == 0
    # an unknown MAC from WARP goes nowhere
    stray = bytes(Ether(src="02:00:00:00:ff:01", dst="02:00:00:00:77:77") /
                  IP(src=INTERNET_IP, dst="10.0.0.77") / UDP(dport=7777))
    sniffers = {v: Sniffer(c[v].ns, "eth0", 1.0, "udp port 7777").start() for v in (100, 102, 200)}
    send_frame(lab.exit_ns, "eth0", stray, count=2)
    assert {v: s.result()["count"] for v, s in sniffers.items()} == {100: 0, 102: 0, 200: 0}


def test_mesh_user_reaches_privacy_router(lab: SocketLab):
    """Seed flow 1: external user over the mesh -> privacy container, replies back."""
    c = lab.containers
    assert ping(lab.mesh_ns, c[100].ip, src=MESH_USER_IP)
    # real TCP: a listener in the privacy container, a client on the mesh side
    server = nsl.popen(c[100].ns, [sys.executable, "-c", (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('{c[100].ip}',8443));s.listen();a,_=s.accept();a.sendall(a.recv(64).upper())"
    )])
    try:
        time.sleep(0.3)
        res = nsl.run(lab.mesh_ns, [sys.executable, "-c", (
            "import socket;s=socket.create_connection("
            f"('{c[100].ip}',8443),timeout=5,source_address=('{MESH_USER_IP}',0));"
            "s.sendall(b'hello');print(s.recv(64).decode())"
        )])
        assert res.stdout.strip() == "HELLO", res.stderr
    finally:
        server.kill()
        server.wait()


def test_service_containers_switch_locally_and_via_mesh(lab: SocketLab):
    c = lab.containers
    assert ping(c[200].ns, c[201].ip)
    assert ping(c[201].ns, MESH_SERVICE_IP)
    assert ping(lab.mesh_ns, c[200].ip, src=MESH_SERVICE_IP)
    assert not ping(c[200].ns, c[100].ip)
    assert not ping(c[200].ns, INTERNET_IP)


def test_port_added_and_removed_while_running(lab: SocketLab):
    c203 = lab.add_container(203)
    try:
        def has_flow() -> bool:
            ofport = lab.ovs.ofport(c203.port)
            return any(f"in_port={ofport} " in line or f"in_port={ofport}," in line
                       for line in lab.flows("vmbr0"))
        wait_for(has_flow, 5.0, "flows for the new port")
        assert ping(c203.ns, lab.containers[200].ip)
        ofport = lab.ovs.ofport(c203.port)
    finally:
        lab.remove_container(203)

    def gone() -> bool:
        return not any(
            re.search(rf"in_port={ofport}\b|output:{ofport}\b|load:0x{ofport:x}->NXM_NX_REG1", line)
            for line in lab.flows("vmbr0")
        )
    wait_for(gone, 5.0, "flows of the removed port to go")
    nsl.delete_netns(c203.ns, kill_procs=True)
    lab.containers.pop(203, None)


def test_switch_flows_equal_socknet_flows(lab: SocketLab):
    for bridge in ("mesh", "vmbr0"):
        text = _socknet_flows(lab, bridge)
        scratch = f"chk{bridge}"[:15]
        lab.ovs.vsctl("add-br", scratch, "--", "set", "bridge", scratch,
                      "datapath_type=netdev", "fail_mode=secure")
        try:
            for meter_id, rate in METER_RATES.items():  # flows may rate-limit through them
                lab.ovs.ofctl("add-meter", lab.ovs.mgmt(scratch),
                              f"meter={meter_id},pktps,burst,band=type=drop,rate={rate},"
                              f"burst_size={rate}")
            flows_file = lab.workdir / f"{bridge}.flows"
            flows_file.write_text(text)
            lab.ovs.ofctl("add-flows", lab.ovs.mgmt(scratch), str(flows_file))
            # port numbers are the real bridge's: the scratch bridge only parses them
            expected = _normalised(lab.ovs.dump_flows(scratch))
            actual = _normalised(lab.flows(bridge))
            assert actual == expected
        finally:
            lab.ovs.vsctl("--if-exists", "del-br", scratch)


def _received_flow_mods(lab: SocketLab, since: int) -> int:
    text = lab.ovs.vswitchd_log.read_text()[since:]
    return len(re.findall(r"received: OFPT_FLOW_MOD|received: OFPT_BUNDLE", text))


def test_restart_sends_no_flow_mods_and_keeps_forwarding(lab: SocketLab):
    c = lab.containers
    lab.ovs.appctl("vlog/set", "vconn:file:dbg")
    try:
        mark = lab.ovs.vswitchd_log.stat().st_size
        lab.stop_controller(signal.SIGKILL)
        # controller dead: forwarding intact, kill switch intact
        assert ping(c[200].ns, c[201].ip)
        assert ping(c[100].ns, INTERNET_IP)
        assert not ping(c[100].ns, c[200].ip)
        before = len(lab.log_events())
        lab.start_controller(wait=False)
        lab.wait_reconciled(after=before)
        events = [e for e in lab.log_events()[before:] if e.get("event") == "reconciled"]
        assert {e["bridge"] for e in events} == {"mesh", "vmbr0"}
        assert all(e["flow_mods"] == 0 and e["read_from_switch"] for e in events)
        time.sleep(0.3)
        # OVS's own log of what it received: no flow-mod, no bundle
        assert _received_flow_mods(lab, mark) == 0
        assert "received: OFPST_FLOW request" in lab.ovs.vswitchd_log.read_text()[mark:] or \
            "OFPMP_FLOW" in lab.ovs.vswitchd_log.read_text()[mark:]
        assert ping(c[200].ns, c[201].ip)
    finally:
        lab.ovs.appctl("vlog/set", "vconn:file:info")


def test_kill_switch_holds_with_controller_down(lab: SocketLab):
    c = lab.containers
    lab.stop_controller(signal.SIGKILL)
    try:
        lab.ovs.vsctl("del-port", "vmbr0", "warp0")
        with Sniffer(lab.mesh_ns, "eth0", 2.0, f"ether src {c[100].mac}") as mesh, \
                Sniffer(c[200].ns, "eth0", 2.0, f"ether src {c[100].mac}") as svc:
            assert not ping(c[100].ns, INTERNET_IP)
            assert mesh.result()["count"] == 0
            assert svc.result()["count"] == 0
    finally:
        lab.ovs.vsctl("--may-exist", "add-port", "vmbr0", "warp0")
        before = len(lab.log_events())
        lab.start_controller(wait=False)
        lab.wait_reconciled(after=before)
    assert ping(c[100].ns, INTERNET_IP)


def test_status_shows_roles_and_flow_counts(lab: SocketLab):
    # OVS refreshes Controller.is_connected in OVSDB every few seconds
    wait_for(lambda: lab.socknet("status", check=False).returncode == 0, 15.0,
             "status to report both controllers connected")
    out = lab.socknet("status").stdout
    assert "veth100i0" in out and "privacy (container 100)" in out
    assert "veth200i0" in out and "service (container 200)" in out
    assert "connected" in out and "NOT connected" not in out
    assert re.search(r"table\s+0 classify\s+\d+ flows", out)


def test_bootstrap_is_idempotent_in_the_lab(lab: SocketLab):
    res = lab.socknet("bootstrap")
    assert "nothing to do" in res.stdout, res.stdout


_ = Path  # keep import for type hints in helpers
