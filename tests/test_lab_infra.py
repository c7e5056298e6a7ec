"""The lab infrastructure itself: namespaces, private OVS, packet helpers, cleanup."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from labs import netns as nsl
from labs.ovs_instance import OvsInstance, OvsStartError
from labs.pkt import Sniffer, ping, send_frame

pytestmark = pytest.mark.ovs

BRIDGE = "br0"
H1_IP, H2_IP = "10.99.0.1", "10.99.0.2"

# What earlier tests created, checked by test_zz_fixture_teardown_cleaned_up.
_LEFTOVERS: dict[str, list] = {"netns": [], "pids": [], "rundirs": []}


@dataclass
class Lab:
    ovs: OvsInstance
    switch: str
    h1: str
    h2: str
    ports: list[str]


def _record(lab: Lab) -> None:
    _LEFTOVERS["netns"] += [lab.switch, lab.h1, lab.h2]
    _LEFTOVERS["pids"] += [lab.ovs.ovsdb_pid, lab.ovs.vswitchd_pid]
    _LEFTOVERS["rundirs"].append(lab.ovs.rundir)


@pytest.fixture
def lab(
    uid: str,
    netns_factory: Callable[..., str],
    ovs_factory: Callable[..., OvsInstance],
) -> Lab:
    """OVS in namespace ``switch``; hosts h1/h2 (10.99.0.1-2/24) on a secure netdev bridge."""
    switch, h1, h2 = netns_factory("s"), netns_factory("a"), netns_factory("b")
    ovs = ovs_factory(switch)
    ovs.vsctl(
        "add-br", BRIDGE, "--", "set", "bridge", BRIDGE,
        "datapath_type=netdev", "fail_mode=secure",
    )  # fmt: skip
    ports = [f"sn{uid}p1", f"sn{uid}p2"]
    for i, host, port in ((1, h1, ports[0]), (2, h2, ports[1])):
        nsl.disable_ipv6(host)
        nsl.add_veth(port, "eth0", switch, host)
        nsl.add_addr(host, "eth0", f"10.99.0.{i}/24")
        nsl.tx_off(host, "eth0")
        assert ovs.add_port(BRIDGE, port, ofport=i) == i
    lab = Lab(ovs, switch, h1, h2, ports)
    _record(lab)
    return lab


def test_ping_follows_flows(lab: Lab) -> None:
    assert lab.ovs.dump_flows(BRIDGE) == []
    lab.ovs.ofctl("add-flow", lab.ovs.mgmt(BRIDGE), "actions=NORMAL")
    assert lab.ovs.dump_flows(BRIDGE) == ["actions=NORMAL"]
    assert ping(lab.h1, H2_IP, count=2)

    lab.ovs.ofctl("del-flows", lab.ovs.mgmt(BRIDGE))
    assert lab.ovs.dump_flows(BRIDGE) == []
    assert not ping(lab.h1, H2_IP, count=2, timeout_s=0.5)  # fail_mode=secure: drop


def test_sniff_counts_sent_frames(lab: Lab) -> None:
    lab.ovs.ofctl("add-flow", lab.ovs.mgmt(BRIDGE), "actions=NORMAL")
    frame = (
        Ether(src=nsl.get_mac(lab.h1, "eth0"), dst=nsl.get_mac(lab.h2, "eth0"))
        / IP(src=H1_IP, dst=H2_IP)
        / UDP(sport=40000, dport=9999)
        / b"socknet"
    )
    sniffer = Sniffer(lab.h2, "eth0", seconds=1.5, bpf="udp and dst port 9999").start()
    try:
        send_frame(lab.h1, "eth0", bytes(frame), count=5, interval=0.01)
        result = sniffer.result()
    finally:
        sniffer.close()
    assert result["count"] == 5
    assert all("UDP" in s and H2_IP in s for s in result["packets"])
    assert bytes.fromhex(result["frames"][0]) == bytes(frame)


def test_tx_offload_off(lab: Lab) -> None:
    out = nsl.run(lab.h1, ["ethtool", "-k", "eth0"], check=True).stdout
    assert "tx-checksumming: off" in out


def test_restart_vswitchd_keeps_db(lab: Lab) -> None:
    old = lab.ovs.vswitchd_pid
    lab.ovs.restart_vswitchd()
    assert lab.ovs.vswitchd_pid not in (None, old)
    assert lab.ovs.ovsdb_pid is not None
    assert lab.ovs.ofport(lab.ports[0]) == 1
    assert lab.ovs.appctl("version").startswith("ovs-vswitchd")
    _LEFTOVERS["pids"].append(lab.ovs.vswitchd_pid)


def test_stop_kills_daemons_and_removes_rundir(
    netns_factory: Callable[..., str], ovs_factory: Callable[..., OvsInstance]
) -> None:
    ovs = ovs_factory(netns_factory("s"))
    assert ovs.running and ovs.rundir.is_dir()
    pids = [ovs.ovsdb_pid, ovs.vswitchd_pid]
    assert all(pid is not None for pid in pids)
    ovs.stop()
    assert not any(nsl.pid_alive(pid) for pid in pids if pid is not None)
    assert not ovs.rundir.exists() and not ovs.running
    ovs.stop()  # idempotent


def test_context_manager(tmp_path: Path, netns_factory: Callable[..., str]) -> None:
    with OvsInstance("cm", tmp_path / "cm", netns=netns_factory("s")) as ovs:
        pid = ovs.vswitchd_pid
        assert pid is not None and "ovs-vswitchd" in ovs.vswitchd_log.read_text()
        assert ovs.db_remote == f"unix:{tmp_path / 'cm' / 'db.sock'}"
        assert ovs.mgmt("br1") == f"unix:{tmp_path / 'cm' / 'br1.mgmt'}"
    assert not nsl.pid_alive(pid) and not (tmp_path / "cm").exists()


def test_failed_start_raises_with_log_and_stop_is_safe(tmp_path: Path, uid: str) -> None:
    ovs = OvsInstance("bad", tmp_path / "bad", netns=f"sn{uid}missing")
    with pytest.raises(OvsStartError, match="ovsdb-server failed to start") as info:
        ovs.start(timeout_s=5)
    assert "sn" + uid + "missing" in str(info.value)
    ovs.stop()
    ovs.stop()
    assert not (tmp_path / "bad").exists()


def test_netns_helpers(uid: str, procs: list[subprocess.Popen]) -> None:
    ns = f"sn{uid}x"
    root_end = f"sn{uid}r"
    try:
        nsl.create_netns(ns)
        assert ns in nsl.list_netns()
        nsl.add_veth(root_end, "eth0", None, ns, mtu=1400)
        nsl.set_mac(ns, "eth0", "02:00:00:99:00:01")
        nsl.set_mtu(ns, "eth0", 1370)
        nsl.add_addr(ns, "eth0", "10.99.1.1/24")
        nsl.add_default_route(ns, "10.99.1.254")
        assert nsl.get_mac(ns, "eth0") == "02:00:00:99:00:01"
        link = nsl.run(ns, ["ip", "-o", "link", "show", "eth0"], check=True).stdout
        assert "mtu 1370" in link and "LOWER_UP" in link
        routes = nsl.run(ns, ["ip", "route"], check=True).stdout
        assert "default via 10.99.1.254 dev eth0" in routes
        assert nsl.link_exists(None, root_end)
        sleeper = nsl.popen(ns, ["sleep", "30"])
        procs.append(sleeper)
        assert sleeper.pid in nsl.netns_pids(ns)
    finally:
        nsl.delete_netns(ns, kill_procs=True)
    assert sleeper.wait(timeout=5) != 0
    assert not nsl.netns_exists(ns)
    assert not nsl.link_exists(None, root_end)  # the root end died with its peer
    nsl.delete_netns(ns)  # idempotent


def test_zz_fixture_teardown_cleaned_up() -> None:
    """Runs after the tests above: their fixtures must have removed everything."""
    if not _LEFTOVERS["netns"]:
        pytest.skip("run together with the lab tests")
    existing = set(nsl.list_netns())
    assert not existing & set(_LEFTOVERS["netns"])
    assert not [p for p in _LEFTOVERS["pids"] if p is not None and nsl.pid_alive(p)]
    assert not [d for d in _LEFTOVERS["rundirs"] if Path(d).exists()]
