"""Tier policy on real OVS: real TCP, UDP and ICMP between container namespaces,
hot reload, refused reloads, spoofing."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from bench import hostile
from labs import conn
from labs import netns as nsl
from labs.pkt import Sniffer, send_frame
from labs.policy_lab import SERVICE_INTERNET_IP, TAILNET_USER_IP, PolicyLab
from labs.waiting import eventually

pytestmark = pytest.mark.ovs

EDGE, APP, DB = 200, 201, 202
SERVICES = {EDGE: "10.10.0.10", APP: "10.20.0.10", DB: "10.30.0.10"}

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
    bpf = (f"not ether src {app.mac} and ((tcp dst port 3000 and tcp[tcpflags] == tcp-syn)"
           " or (arp and arp[6:2] = 2))")
    with Sniffer(app.ns, "eth0", 2.0, bpf) as s:
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
