"""Tier policy on real OVS: real TCP, UDP and ICMP between container namespaces,
hot reload, refused reloads, spoofing; container addresses from an authority (Proxmox
guest configs, host.yaml) and what learning may not bind; MAC learning that no container
can hijack (issue 11 parts 1 and 2)."""

from __future__ import annotations

import contextlib
import secrets
import signal
import sys
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from bench import hostile
from labs import conn
from labs import netns as nsl
from labs.lab import Container, container_mac
from labs.pkt import Sniffer, send_frame
from labs.policy_lab import SERVICE_INTERNET_IP, TAILNET_USER_IP, PolicyLab
from labs.waiting import eventually

pytestmark = pytest.mark.ovs

EDGE, APP, DB = 200, 201, 202
SERVICES = {EDGE: "10.10.0.10", APP: "10.20.0.10", DB: "10.30.0.10"}
# containers the tests of issue 11 start: undeclared (learned, if allowed), declared in
# host.yaml with a MAC alone, declared by a Proxmox guest config only
CLAIMS_APP, CLAIMS_TAILNET, MAC_ONLY, FROM_PVE = 203, 204, 205, 206
GATEWAY_MAC = "02:00:00:00:fe:01"  # labs.policy_lab: the service gateway's eth0

POLICY = """\
tiers:
  edge: {cidrs: [10.10.0.0/24]}
  app:  {cidrs: [10.20.0.0/24], internal: true}
  db:   {cidrs: [10.30.0.0/24], internal: true}
externals:
  tailnet: {cidrs: [100.64.0.0/10]}
policy:
  default: deny
  rules:
    - {name: web-in,    from: internet, to: edge, tcp: [443, 80]}
    - {name: edge-out,  from: edge,     to: internet, tcp: [443]}
    - {name: edge-app,  from: edge,     to: app,  tcp: [3000, 8080]}
    - {name: app-db,    from: app,      to: db,   tcp: [5432], udp: [53, 5353]}
    - {name: ping-edge, from: any,      to: edge, icmp: true}
    - {name: admin,     from: tailnet,  to: [edge, app], tcp: ["22", "9000-9010"]}
    - {name: no-ssh-db, from: any,      to: db,   tcp: [22], action: deny, log: true}
tests:
  - {from: 10.20.0.5, to: 10.30.0.9, tcp: 5432, expect: allow, rule: app-db}
  - {from: 10.30.0.9, to: 10.20.0.5, tcp: 3000, expect: deny}
"""


def without_rule(text: str, name: str) -> str:
    return "\n".join(line for line in text.splitlines() if f"name: {name}," not in line) + "\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyLab]:
    lab = PolicyLab(f"p{secrets.token_hex(2)}", tmp_path_factory.mktemp("plab"), POLICY,
                    SERVICES)
    lab.mac_only = {MAC_ONLY}
    lab.up()
    servers = []
    try:
        for vmid, ip in SERVICES.items():
            for proto, port in (("tcp", 3000), ("tcp", 5432), ("tcp", 22), ("tcp", 443),
                                ("udp", 53)):
                servers.append(conn.server(lab.containers[vmid].ns, proto, ip, port))
        servers.append(conn.server(lab.gw_ns, "tcp", SERVICE_INTERNET_IP, 443))
        yield lab
    finally:
        for s in servers:
            s.kill()
            s.wait()
        lab.down()


def ip(vmid: int) -> str:
    return SERVICES[vmid]


def ns(lab: PolicyLab, vmid: int) -> str:
    return lab.containers[vmid].ns


def tcp(lab: PolicyLab, src: int, dst: int, port: int) -> bool:
    return conn.connect(ns(lab, src), "tcp", ip(src), ip(dst), port)


def ping(from_ns: str, dst: str) -> bool:
    return nsl.run(from_ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", dst]).returncode == 0



def events(lab: PolicyLab, name: str, after: int = 0) -> list[dict[str, object]]:
    return [e for e in lab.log_events()[after:] if e.get("event") == name]


@pytest.mark.parametrize(
    "src,dst,port,allowed",
    [
        (EDGE, APP, 3000, True),   # edge-app
        (APP, DB, 5432, True),     # app-db
        (DB, APP, 3000, False),    # no rule: default deny (replies only the other way)
        (EDGE, DB, 5432, False),   # edge may not reach db
        (APP, EDGE, 3000, False),  # not the reverse of edge-app
        (DB, DB, 22, True),        # same container: never leaves it, not policed
    ],
)
def test_tcp_between_tiers(lab: PolicyLab, src: int, dst: int, port: int, allowed: bool):
    assert tcp(lab, src, dst, port) is allowed


def test_udp_and_icmp(lab: PolicyLab):
    assert conn.connect(ns(lab, APP), "udp", ip(APP), ip(DB), 53)
    assert not conn.connect(ns(lab, EDGE), "udp", ip(EDGE), ip(DB), 53)
    assert ping(ns(lab, DB), ip(EDGE))  # ping-edge: anyone may ping edge
    assert not ping(ns(lab, EDGE), ip(DB))


def test_internet_behind_the_host(lab: PolicyLab):
    assert conn.connect(ns(lab, EDGE), "tcp", ip(EDGE), SERVICE_INTERNET_IP, 443)  # edge-out
    assert not conn.connect(ns(lab, APP), "tcp", ip(APP), SERVICE_INTERNET_IP, 443)  # internal
    assert not conn.connect(ns(lab, DB), "tcp", ip(DB), SERVICE_INTERNET_IP, 443)
    assert conn.connect(lab.gw_ns, "tcp", SERVICE_INTERNET_IP, ip(EDGE), 443)  # web-in
    assert not conn.connect(lab.gw_ns, "tcp", SERVICE_INTERNET_IP, ip(APP), 3000)


def test_tailnet_admin_and_logged_deny(lab: PolicyLab):
    before = len(lab.log_events())
    assert conn.connect(lab.mesh_ns, "tcp", TAILNET_USER_IP, ip(APP), 22)  # admin
    assert not conn.connect(lab.mesh_ns, "tcp", TAILNET_USER_IP, ip(DB), 22)  # no-ssh-db
    assert eventually(lambda: any(
        e.get("rule") == "no-ssh-db" and e.get("dst") == ip(DB) and e.get("port") == 22
        for e in events(lab, "denied", before)), 5.0)


def test_spoofed_source_is_dropped(lab: PolicyLab):
    """db forges edge's address to use edge's rights (edge -> app tcp/3000)."""
    db, app, edge = lab.containers[DB], lab.containers[APP], lab.containers[EDGE]
    forged = [
        Ether(src=db.mac, dst=app.mac) / IP(src=ip(EDGE), dst=ip(APP))
        / TCP(dport=3000, flags="S"),
        Ether(src=edge.mac, dst=app.mac) / IP(src=ip(EDGE), dst=ip(APP))
        / TCP(dport=3000, flags="S"),
        Ether(src=db.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, psrc=ip(EDGE), hwsrc=db.mac,
                                                          pdst=ip(APP)),
    ]
    genuine = Ether(src=edge.mac, dst=app.mac) / IP(src=ip(EDGE), dst=ip(APP)) / TCP(
        sport=41000, dport=3000, flags="S")
    # the forged ARP reply, not the switch's answers to app's own ARP (legit, any time)
    bpf = (f"not ether src {app.mac} and ((tcp dst port 3000 and tcp[tcpflags] == tcp-syn)"
           f" or (arp and arp[6:2] = 2 and ether src {db.mac}))")
    with Sniffer(app.ns, "eth0", 6.0, bpf) as s:  # 4 sender processes: slow under load
        for f in forged:
            send_frame(db.ns, "eth0", bytes(f), count=2)
        send_frame(edge.ns, "eth0", bytes(genuine))
        seen = s.result()
    assert seen["count"] == 1, seen["packets"]  # only the genuine SYN from edge arrived


def test_reload_flips_verdict_and_cuts_live_sessions(lab: PolicyLab):
    session = conn.Session(ns(lab, EDGE), ip(EDGE), ip(APP), 3000)
    try:
        assert session.exchange("before")
        before = len(lab.log_events())
        lab.write_policy(without_rule(POLICY, "edge-app"))
        assert eventually(lambda: bool(events(lab, "policy_reloaded", before)), 10.0)
        assert eventually(lambda: not tcp(lab, EDGE, APP, 3000), 5.0)
        assert not session.exchange("after")  # the established session is cut
    finally:
        session.close()
        mark = len(lab.log_events())
        lab.write_policy(POLICY)
        assert eventually(lambda: bool(events(lab, "policy_reloaded", mark)), 10.0)
    assert eventually(lambda: tcp(lab, EDGE, APP, 3000), 5.0)


def test_bad_reload_changes_nothing(lab: PolicyLab):
    flows_before = sorted(lab.flows("vmbr0"))
    for bad in (
        POLICY.replace("to: app,  tcp: [3000, 8080]", "to: appp, tcp: [3000, 8080]"),
        POLICY + "  - {from: 10.10.0.5, to: 10.20.0.5, tcp: 3000, expect: deny}\n",
        "tiers: [not, a, mapping\n",
    ):
        before = len(lab.log_events())
        lab.write_policy(bad)
        assert eventually(lambda b=before: bool(events(lab, "policy_refused", b)), 10.0)
        assert tcp(lab, EDGE, APP, 3000)
        assert not tcp(lab, EDGE, DB, 5432)
    lab.write_policy(POLICY)
    time.sleep(0.5)
    assert sorted(lab.flows("vmbr0")) == flows_before


def test_hostile_reload_keeps_the_controller_and_its_policy(lab: PolicyLab):
    """Issue 11.5: the controller died (SIGSEGV) reloading 25,000 nested brackets and
    logged a traceback, not policy_refused, for a non-UTF-8 byte."""
    flows_before = sorted(lab.flows("vmbr0"))
    for data in (hostile.bracket_bomb(25_000), hostile.block_bomb(25_000),
                 hostile.non_utf8_policy(), hostile.alias_bomb(), hostile.nul_policy(),
                 hostile.many_tiers(1_000, internal=True, stride=2)):
        before = len(lab.log_events())
        lab.write_policy(data)
        assert eventually(lambda b=before: bool(events(lab, "policy_refused", b)), 10.0)
        assert lab.controller is not None and lab.controller.poll() is None
        assert tcp(lab, EDGE, APP, 3000)
        assert not tcp(lab, EDGE, DB, 5432)
    lab.write_policy(POLICY)
    time.sleep(0.5)
    assert sorted(lab.flows("vmbr0")) == flows_before


def test_sighup_reload_and_no_loss_on_allowed_traffic(lab: PolicyLab):
    """Continuous allowed UDP (app -> db) through three reloads that change other rules."""
    stream = conn.UdpStream(ns(lab, APP), ip(APP), ns(lab, DB), ip(DB), 5353, rate=200,
                            seconds=4.0)
    try:
        for text in (without_rule(POLICY, "ping-edge"), without_rule(POLICY, "edge-out"),
                     POLICY):
            before = len(lab.log_events())
            lab.write_policy(text)
            assert eventually(lambda b=before: bool(events(lab, "policy_reloaded", b)), 10.0)
            time.sleep(0.3)
        before = len(lab.log_events())
        assert lab.controller is not None
        lab.controller.send_signal(1)  # SIGHUP: same file, nothing to change
        assert eventually(lambda: bool(events(lab, "policy_unchanged", before)), 10.0)
        sent, received = stream.result()
    finally:
        stream.close()
    assert sent > 500
    assert received == sent


def _scrape(lab: PolicyLab) -> str:
    code = ("import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=10)"
            ".read().decode())")
    res = nsl.run(lab.host, [sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    return res.stdout


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in metrics")


def test_rule_counters_in_status_and_metrics(lab: PolicyLab):
    before = _metric(_scrape(lab), "socknet_rule_packets_total", rule="app-db")
    for _ in range(3):
        assert tcp(lab, APP, DB, 5432)
    assert not tcp(lab, EDGE, DB, 5432)
    text = _scrape(lab)
    assert _metric(text, "socknet_rule_packets_total", rule="app-db") >= before + 3
    assert _metric(text, "socknet_rule_packets_total", rule="default") >= 1
    assert _metric(text, "socknet_switch_connected", bridge="vmbr0") == 1
    assert _metric(text, "socknet_policy_generation") >= 1
    assert _metric(text, "socknet_mesh_peers_up") == 1  # the lab's one mesh uplink
    assert _metric(text, "socknet_flows", bridge="vmbr0", table="22", owner="socknet") > 10
    out = lab.socknet("status", check=False).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("app-db"))
    assert int(line.split()[2]) >= 3


@pytest.mark.parametrize("restore_flows", [False, True], ids=["plain", "ovs-ctl"])
def test_ovs_restart_never_opens_a_hole(lab: PolicyLab, restore_flows: bool):
    """ovs-vswitchd restarts: plain (flows gone, fail_mode=secure), or as ``ovs-ctl
    restart`` does (ovs-save's script restores the flows under flow-restore-wait; OVS
    flushes them when the controller comes back). Denied traffic never passes at any
    moment, and allowed traffic resumes once the controller has reinstalled."""
    allowed = conn.UdpStream(ns(lab, APP), ip(APP), ns(lab, DB), ip(DB), 5353, rate=200,
                             seconds=8.0)
    denied = conn.UdpStream(ns(lab, EDGE), ip(EDGE), ns(lab, DB), ip(DB), 5354, rate=200,
                            seconds=8.0)
    try:
        time.sleep(1.0)
        before = len(lab.log_events())
        if restore_flows:
            lab.ovs.restart_vswitchd_restoring_flows()
        else:
            lab.ovs.restart_vswitchd()
        assert eventually(lambda: any(e.get("bridge") == "vmbr0" and e.get("read_from_switch")
                                      for e in events(lab, "reconciled", before)), 15.0)
        sent_ok, got_ok = allowed.result()
        sent_denied, got_denied = denied.result()
    finally:
        allowed.close()
        denied.close()
    assert sent_denied > 1000 and got_denied == 0  # not one denied packet got through
    assert got_ok > 0 and sent_ok > 1000
    # after the restart the allowed path works again, with the full policy
    assert tcp(lab, APP, DB, 5432)
    assert not tcp(lab, EDGE, DB, 5432)


# ------------------------------------------------------------------ issue 11: addresses


@contextlib.contextmanager
def started(lab: PolicyLab, vmid: int, address: str) -> Iterator[Container]:
    """Container ``vmid`` with ``address`` (routes as the tier containers'), port on vmbr0;
    stopped and removed after."""
    lab.service_ips[vmid] = address
    c = lab.add_container(vmid)
    try:
        yield c
    finally:
        lab.remove_container(vmid)
        nsl.delete_netns(c.ns, kill_procs=True)
        lab.containers.pop(vmid, None)
        lab.service_ips.pop(vmid, None)


def garp(c: Container) -> bytes:
    """What a container's network says when it comes up: "I am <ip> at <mac>"."""
    return bytes(Ether(src=c.mac, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=c.mac, psrc=c.ip, hwdst="00:00:00:00:00:00", pdst=c.ip))


def first_packet_outcome(lab: PolicyLab, c: Container, mark: int) -> dict[str, object]:
    """Send the container's first packet; the controller's verdict on it (the event:
    learned or refused; none if the packet never came up to it)."""
    send_frame(c.ns, "eth0", garp(c))
    found: list[dict[str, object]] = []

    def decided() -> bool:
        found[:] = [e for e in lab.log_events()[mark:]
                    if e.get("event") in ("binding_learned", "binding_refused")
                    and e.get("port") == c.port]
        return bool(found)
    eventually(decided, 8.0)
    time.sleep(0.3)  # a learned binding's flows: one bundle away
    return found[0] if found else {"event": None}


def syns_at(lab: PolicyLab, vmid: int, port: int, seconds: float) -> Sniffer:
    c = lab.containers[vmid]
    return Sniffer(c.ns, "eth0", seconds, f"tcp dst port {port} and tcp[tcpflags] == tcp-syn"
                   f" and not ether src {c.mac}").start()


@pytest.mark.parametrize("vmid,address,target,port", [
    (CLAIMS_APP, "10.20.0.77", DB, 5432),  # app-db: app -> db tcp/5432
    (CLAIMS_TAILNET, "100.64.0.77", APP, 22),  # admin: tailnet -> app tcp/22
], ids=["app-address-to-db", "tailnet-address-to-app-ssh"])
def test_an_undeclared_container_cannot_choose_its_tier(lab: PolicyLab, vmid: int,
                                                        address: str, target: int, port: int):
    """learn-first-packet (the lab says so) never binds an address the policy names: the
    container that speaks first as an app (tailnet) address gets no rights of app
    (tailnet). Before: it was bound to it and connected."""
    mark = len(lab.log_events())
    with started(lab, vmid, address) as c:
        verdict = first_packet_outcome(lab, c, mark)
        sniff = syns_at(lab, target, port, 8.0)
        try:
            assert not conn.connect(c.ns, "tcp", address, ip(target), port, timeout_s=3.0)
            assert sniff.result()["count"] == 0  # not one SYN reached the target
        finally:
            sniff.close()
        assert verdict["event"] == "binding_refused", verdict
        assert verdict["kind"] == "policy-named" and verdict["ip"] == address
    text = _scrape(lab)
    assert _metric(text, "socknet_bindings_refused_total", kind="policy-named") >= 1


def test_an_undeclared_container_outside_every_tier_is_learned(lab: PolicyLab):
    """Control for the test above: the same path binds an address no tier names."""
    mark = len(lab.log_events())
    with started(lab, CLAIMS_APP, "10.99.0.7") as c:
        verdict = first_packet_outcome(lab, c, mark)
        assert verdict["event"] == "binding_learned" and verdict["ip"] == "10.99.0.7"


def test_a_mac_only_container_has_no_ip_rights(lab: PolicyLab):
    """host.yaml declares 205 with a MAC and no ip: it may not use an app address."""
    mark = len(lab.log_events())
    with started(lab, MAC_ONLY, "10.20.0.55") as c:
        assert c.mac == container_mac(MAC_ONLY)
        verdict = first_packet_outcome(lab, c, mark)
        sniff = syns_at(lab, DB, 5432, 8.0)
        try:
            assert not conn.connect(c.ns, "tcp", c.ip, ip(DB), 5432, timeout_s=3.0)
            assert sniff.result()["count"] == 0
        finally:
            sniff.close()
        assert verdict["event"] == "binding_refused" and verdict["kind"] == "policy-named"


PVE_CT = """\
#declared by Proxmox only: not in host.yaml
arch: amd64
hostname: from-pve
net0: name=eth0,bridge=vmbr0,hwaddr={mac},ip={ip},type=veth
ostype: debian
rootfs: local-lvm:vm-206-disk-0,size=2G

[before-change]
net0: name=eth0,bridge=vmbr0,hwaddr={mac},ip=10.30.0.66/24,type=veth
"""


def test_proxmox_guest_configs_declare_addresses_and_are_followed(lab: PolicyLab):
    """206 exists only in lxc/206.conf: its static app address gives it app's rights; edited
    to ip=dhcp (no lease known) it has none; SIGHUP re-reads at once."""
    mac = container_mac(FROM_PVE).upper()  # Proxmox writes MACs in upper case
    conf = "lxc/206.conf"
    lab.write_guest_config(conf, PVE_CT.format(mac=mac, ip="10.20.0.66/24"))
    mark = len(lab.log_events())
    try:
        with started(lab, FROM_PVE, "10.20.0.66") as c:
            assert eventually(lambda: conn.connect(c.ns, "tcp", c.ip, ip(DB), 5432), 15.0)
            assert not events(lab, "binding_learned", mark)  # declared, nothing learned
            lab.write_guest_config(conf, PVE_CT.format(mac=mac, ip="dhcp"))
            assert eventually(lambda: not conn.connect(c.ns, "tcp", c.ip, ip(DB), 5432), 15.0)
            before = len(lab.log_events())
            lab.write_guest_config(conf, PVE_CT.format(mac=mac, ip="10.20.0.66/24"))
            assert lab.controller is not None
            lab.controller.send_signal(signal.SIGHUP)
            assert eventually(lambda: any(e.get("reason") == "SIGHUP"
                                          for e in events(lab, "pve_read", before)), 10.0)
            assert eventually(lambda: conn.connect(c.ns, "tcp", c.ip, ip(DB), 5432), 15.0)
            # a restarted controller reads the guest configs before its first reconcile:
            # it finds 206's flows on the switch as it wants them (nothing deleted)
            lab.stop_controller()
            restart = len(lab.log_events())
            lab.start_controller(wait=False)
            lab.wait_reconciled(after=restart)
            first = next(e for e in events(lab, "reconciled", restart)
                         if e.get("bridge") == "vmbr0")
            assert first["read_from_switch"] and first["deleted"] == 0, first
            assert conn.connect(c.ns, "tcp", c.ip, ip(DB), 5432)
    finally:
        (lab.pve_dir / conf).unlink(missing_ok=True)


# ------------------------------------------------------------------ issue 11: MAC learning


def learned_l2_to(lab: PolicyLab, mac: str) -> list[str]:
    return [f for f in lab.flows("vmbr0") + lab.flows("mesh")
            if "cookie=0x5c04" in f and f"dl_dst={mac}" in f]


def test_a_container_sending_with_the_gateways_mac_hijacks_nothing(lab: PolicyLab):
    """db sends frames with the gateway's MAC as source: before, table 50 learned it behind
    db's port and edge's connections to the internet went to db."""
    db, edge = lab.containers[DB], lab.containers[EDGE]
    assert conn.connect(edge.ns, "tcp", edge.ip, SERVICE_INTERNET_IP, 443)  # gateway learned
    forged = [Ether(src=GATEWAY_MAC, dst="ff:ff:ff:ff:ff:ff")
              / ARP(op=2, hwsrc=GATEWAY_MAC, psrc="10.255.255.254", pdst=edge.ip),
              Ether(src=GATEWAY_MAC, dst=edge.mac) / IP(src=SERVICE_INTERNET_IP, dst=edge.ip)
              / TCP(sport=443, dport=40000, flags="A")]
    sniff = Sniffer(db.ns, "eth0", 20.0, f"tcp dst port 443 and host {SERVICE_INTERNET_IP}"
                    ).start()
    results = []
    try:
        for _ in range(3):  # db keeps at it: before each of edge's connections
            for frame in forged:
                send_frame(db.ns, "eth0", bytes(frame), count=3, interval=0.05)
            results.append(conn.connect(edge.ns, "tcp", edge.ip, SERVICE_INTERNET_IP, 443))
        seen = sniff.result()
    finally:
        sniff.close()
    assert results == [True, True, True]
    assert seen["count"] == 0, seen["packets"]  # not one of edge's SYNs arrived at db
    assert not [f for f in learned_l2_to(lab, GATEWAY_MAC) if f"output:{lab.ovs.ofport(db.port)}"
                in f]


@pytest.mark.parametrize("source", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:fb"],
                         ids=["broadcast", "multicast"])
def test_broadcast_and_multicast_sources_are_never_learned(lab: PolicyLab, source: str):
    """db (and, for broadcast, a mesh peer) send frames with a group MAC as source. Before,
    vmbr0 learned it behind the sender and frames to that group went there alone."""
    db, app, edge = lab.containers[DB], lab.containers[APP], lab.containers[EDGE]
    bogus = bytes(Ether(src=source, dst="ff:ff:ff:ff:ff:ff") / IP(src=db.ip, dst=app.ip)
                  / TCP(dport=9))
    send_frame(db.ns, "eth0", bogus, count=3, interval=0.05)
    if source == "ff:ff:ff:ff:ff:ff":
        send_frame(lab.mesh_ns, "eth0", bytes(Ether(src=source, dst=edge.mac)
                                              / IP(src=TAILNET_USER_IP, dst=edge.ip)
                                              / TCP(dport=9)), count=3, interval=0.05)
    # edge's ARP for an address nobody has, sent to that group: every service port gets it
    ask = bytes(Ether(src=edge.mac, dst=source)
                / ARP(op=1, hwsrc=edge.mac, psrc=edge.ip, pdst="10.10.0.99"))
    with Sniffer(app.ns, "eth0", 6.0, f"arp and ether dst {source}") as s:
        send_frame(edge.ns, "eth0", ask, count=2, interval=0.05)
        seen = s.result()
    assert seen["count"] == 2, seen
    assert learned_l2_to(lab, source) == []
