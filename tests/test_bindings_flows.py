"""Container addresses and MAC learning on vmbr0's flows (issue 11 parts 1 and 2), in the
flow-table simulator, and the controller's run-time refusals (issue 13 item 3).

Part 2: nothing is learned before spoof_guard has passed a frame; multicast, broadcast
and zero source MACs are dropped and never learned (vmbr0 and the mesh bridge); a
container port teaches only its bound MAC; from-mesh and the gateway never teach a local
container's MAC. Part 1: a MAC-only declaration allows no IP source; `addresses:
declared` sends nothing to the controller. Packets on real OVS: tests/test_policy_lab.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from controller.metrics import ControllerCollector
from controller.runtime import Controller
from topology.addresses import Binding
from topology.config import parse_host_config
from topology.flows import desired_state
from topology.model import Learn, ToController
from topology.pipeline import MESH_PIPELINE, METER_LEARN, SOCKET_PIPELINE
from topology.policy import parse_policy
from topology.pve import Guests, parse_pve
from topology.simulate import BROADCAST, ZERO_MAC, Switch, arp_request, ethernet, ipv4

HOST = """
addresses: {mode}
bridges:
  mesh: {{name: mesh, uplinks: [nm-privacy], to_socket: to-socket}}
  socket: {{name: vmbr0, from_mesh: from-mesh, warp: warp0, gateway: svcgw0}}
containers:
  100: {{mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}}
  200: {{mac: "02:00:00:00:02:00", ip: 10.10.0.10/24}}
  201: {{mac: "02:00:00:00:02:01", ip: 10.20.0.10/24}}
  202: {{mac: "02:00:00:00:02:02", ip: 10.30.0.10/24}}
  203: {{mac: "02:00:00:00:02:03"}}
"""
LEARN = parse_host_config(HOST.format(mode="learn-first-packet"))
DECLARED = parse_host_config(HOST.format(mode="declared"))
PORTS = {
    "mesh": {"nm-privacy": 1, "to-socket": 2},
    "vmbr0": {"from-mesh": 1, "warp0": 2, "svcgw0": 3, "veth100i0": 4, "veth200i0": 5,
              "veth201i0": 6, "veth202i0": 7, "veth102i0": 8, "veth203i0": 9},
}
MESH, WARP, GW, P100, EDGE, APP, DB, P102, MAC_ONLY = 1, 2, 3, 4, 5, 6, 7, 8, 9
GW_MAC, MESH_MAC = "02:00:00:00:fe:01", "02:00:00:00:ee:01"
P100_MAC, EDGE_MAC, APP_MAC, DB_MAC = ("02:00:00:00:01:00", "02:00:00:00:02:00",
                                       "02:00:00:00:02:01", "02:00:00:00:02:02")
P102_MAC, P102_IP = "02:00:00:00:01:02", "10.0.0.102"
MAC_ONLY_MAC = "02:00:00:00:02:03"
EDGE_IP, APP_IP, DB_IP = "10.10.0.10", "10.20.0.10", "10.30.0.10"
INTERNET = "198.18.1.1"
LEARNED = {"veth102i0": Binding(P102_MAC, P102_IP)}
L2, HOSTS = SOCKET_PIPELINE["service_l2"], SOCKET_PIPELINE["privacy_hosts"]
INVALID_SOURCES = [BROADCAST, "01:00:5e:00:00:fb", "33:33:00:00:00:01", ZERO_MAC]


def vmbr0(cfg: Any = LEARN) -> Switch:
    flows = desired_state(cfg, PORTS, learned=LEARNED)["vmbr0"]
    return Switch(flows, ports=PORTS["vmbr0"].values())


def learned_to(sw: Switch, table: int) -> dict[str, Any]:
    """eth_dst -> what the learned flow does, of ``table``."""
    return {f.match_dict["eth_dst"]: f.actions for f in sw.learned() if f.table == table}


# ------------------------------------------------------------------ part 2: learning


def test_nothing_is_learned_before_spoof_guard():
    """Every learn action sits in a spoof_guard flow that passed the frame: a container's
    own-addresses flows (in_port + its bound MAC) or from-mesh's and the gateway's."""
    flows = desired_state(LEARN, PORTS, learned=LEARNED)["vmbr0"]
    learning = [f for f in flows if any(isinstance(a, Learn) and a.table in (L2, HOSTS)
                                        for a in f.actions)]
    assert learning and all(f.table == SOCKET_PIPELINE["spoof_guard"] for f in learning)
    for f in learning:
        m = f.match_dict
        assert m["in_port"] in (MESH, GW) or ("eth_src" in m and f.goto is not None), f


def test_a_container_sending_with_the_gateways_mac_hijacks_nothing():
    sw = vmbr0()
    sw.process(ipv4(GW, GW_MAC, EDGE_MAC, INTERNET, EDGE_IP))  # the gateway speaks
    assert learned_to(sw, L2)[GW_MAC][0].port == GW
    for pkt in (ipv4(DB, GW_MAC, EDGE_MAC, DB_IP, EDGE_IP),  # db forges the gateway's MAC
                ipv4(DB, GW_MAC, BROADCAST, "10.255.255.254", "10.255.255.255", "udp"),
                arp_request(DB, GW_MAC, "10.255.255.254", EDGE_IP)):
        assert sw.process(pkt).ports == set()
    assert learned_to(sw, L2)[GW_MAC][0].port == GW  # not re-pointed at db
    assert sw.process(ipv4(EDGE, EDGE_MAC, GW_MAC, EDGE_IP, INTERNET)).ports == {GW}


@pytest.mark.parametrize("src", INVALID_SOURCES)
@pytest.mark.parametrize("port", [DB, MESH, GW, WARP, P100])
def test_invalid_source_macs_are_dropped_and_never_learned(port: int, src: str):
    sw = vmbr0()
    frames = [ethernet(port, src), ipv4(port, src, EDGE_MAC, DB_IP, EDGE_IP),
              arp_request(port, src, DB_IP, EDGE_IP)]
    for pkt in frames:
        assert sw.process(pkt).ports == set()
    assert sw.learned() == []
    # broadcasts from edge still reach every service port, the gateway and the mesh
    assert sw.process(ipv4(EDGE, EDGE_MAC, BROADCAST, EDGE_IP, "10.255.255.255", "udp")
                      ).ports == {APP, DB, MAC_ONLY, GW, MESH}


@pytest.mark.parametrize("src", INVALID_SOURCES)
def test_the_mesh_bridge_never_learns_an_invalid_source(src: str):
    flows = desired_state(LEARN, PORTS)["mesh"]
    sw = Switch(flows, ports=PORTS["mesh"].values())
    assert sw.process(ethernet(1, src)).ports == set()
    assert sw.learned() == []
    assert sw.process(ethernet(2, MESH_MAC)).ports == {1}  # host broadcasts reach the peer
    assert sw.process(ethernet(1, MESH_MAC)).ports == {2}  # control: a real peer MAC
    assert [f.match_dict["eth_dst"] for f in sw.learned()
            if f.table == MESH_PIPELINE["mesh_l2"]] == [MESH_MAC]


@pytest.mark.parametrize("port", [MESH, GW])
@pytest.mark.parametrize("local", [APP_MAC, P100_MAC, P102_MAC, MAC_ONLY_MAC])
def test_mesh_and_gateway_never_learn_a_local_containers_mac(port: int, local: str):
    sw = vmbr0()
    sw.process(ipv4(P102, P102_MAC, GW_MAC, P102_IP, "1.1.1.1"))  # 102 taught its MAC
    before = {f for f in sw.learned() if f.match_dict["eth_dst"] == local}
    sw.process(ipv4(port, local, EDGE_MAC, APP_IP, EDGE_IP, "udp"))
    sw.process(arp_request(port, local, APP_IP, EDGE_IP))
    assert {f for f in sw.learned() if f.match_dict["eth_dst"] == local} == before
    assert sw.process(ipv4(EDGE, EDGE_MAC, APP_MAC, EDGE_IP, APP_IP, "udp")).ports == {APP}
    # control: any other MAC from there is learned
    sw.process(ipv4(port, "02:00:00:00:99:99", EDGE_MAC, APP_IP, EDGE_IP, "udp"))
    assert learned_to(sw, L2)["02:00:00:00:99:99"][0].port == port


def test_a_privacy_container_teaches_only_its_bound_mac():
    sw = vmbr0()
    sw.process(ipv4(P102, "02:00:00:00:01:77", GW_MAC, P102_IP, "1.1.1.1"))  # not its MAC
    sw.process(ipv4(P102, P100_MAC, GW_MAC, "10.0.0.100", "1.1.1.1"))  # 100's addresses
    assert learned_to(sw, HOSTS) == {}
    sw.process(ipv4(P102, P102_MAC, GW_MAC, P102_IP, "1.1.1.1"))
    assert list(learned_to(sw, HOSTS)) == [P102_MAC]
    assert learned_to(sw, L2) == {}  # and nothing into service switching


# ------------------------------------------------------------------ part 1: no IP rights


@pytest.mark.parametrize("cfg", [LEARN, DECLARED], ids=["learn", "declared"])
def test_a_mac_only_container_has_no_ip_source(cfg: Any):
    sw = vmbr0(cfg)
    for src in (APP_IP, "100.64.0.77", "198.51.100.3", "0.0.0.0"):
        result = sw.process(ipv4(MAC_ONLY, MAC_ONLY_MAC, DB_MAC, src, DB_IP, "tcp", 40000,
                                 5432))
        assert result.ports == set(), src
        # learning mode: the packet goes up to learn from (and is refused for a tier
        # address, tests/test_pve.py); declared: it does not even do that
        # (declared mode: the one copy up is the drop log's, metered apart from learning)
        learn_copies = [a for step in result.trace for a in step.flow.actions
                        if isinstance(a, ToController) and a.meter == METER_LEARN]
        assert len(learn_copies) == (1 if cfg is LEARN else 0)
    assert sw.process(arp_request(MAC_ONLY, MAC_ONLY_MAC, APP_IP, DB_IP)).ports == set()
    # it is still reachable at its MAC
    assert sw.process(ipv4(EDGE, EDGE_MAC, MAC_ONLY_MAC, EDGE_IP, "198.51.100.3")).ports == {
        MAC_ONLY}


def test_declared_mode_sends_nothing_up_to_learn_from():
    flows = desired_state(DECLARED, {**PORTS, "vmbr0": {**PORTS["vmbr0"], "veth204i0": 10}}
                          )["vmbr0"]
    ups = [f for f in flows if any(isinstance(a, ToController) for a in f.actions)]
    # (copies up through the drop-log meters only: a `dropped` event, never learning)
    assert not [f for f in ups if f.table in (SOCKET_PIPELINE["classify"],
                                              SOCKET_PIPELINE["spoof_guard"])
                and ToController(meter=METER_LEARN) in f.actions]
    sw = Switch(flows, ports=[*PORTS["vmbr0"].values(), 10])
    for port in (10, 11):  # an undeclared container; a port without flows
        result = sw.process(ipv4(port, f"02:00:00:00:02:0{port - 6}", EDGE_MAC,
                                 f"198.51.100.{port - 6}", EDGE_IP))
        learn_copies = [a for step in result.trace for a in step.flow.actions
                        if isinstance(a, ToController) and a.meter == METER_LEARN]
        assert result.ports == set() and learn_copies == []


# ------------------------------------------------------------------ controller (issue 13.3)

POLICY = parse_policy("""\
tiers:
  edge: {cidrs: [10.10.0.0/24]}
  app:  {cidrs: [10.20.0.0/24], internal: true}
  db:   {cidrs: [10.30.0.0/24], internal: true}
policy:
  default: deny
  rules:
    - {name: app-db, from: app, to: db, tcp: [5432]}
""")
DPIDS = {"mesh": 0x10, "vmbr0": 0x20}


def _controller(cfg: Any = LEARN, pve: dict[str, str] | None = None,
                ports: dict[str, int] | None = None) -> Controller:
    c = Controller(cfg, policy=POLICY, guests=parse_pve(pve or {}))
    c.ovsdb_changed({**PORTS, "vmbr0": {**PORTS["vmbr0"], **(ports or {})}}, DPIDS)
    return c


def _metric(c: Controller, name: str, **labels: str) -> float:
    for family in ControllerCollector(c).collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not collected")


def _spoof_guard_passes(c: Controller, ofport: int) -> list[Any]:
    assert c._desired is not None
    return [f for f in c._desired["vmbr0"] if f.table == SOCKET_PIPELINE["spoof_guard"]
            and f.match_dict.get("in_port") == ofport and f.goto is not None]


def _lxc(mac: str, ip: str) -> str:
    return f"net0: name=eth0,bridge=vmbr0,hwaddr={mac},ip={ip},type=veth\n"


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def test_a_mac_two_guests_declare_is_refused_to_both_with_a_log_and_a_metric(logs):
    pve = {"lxc/210.conf": _lxc("02:00:00:00:aa:10", "10.20.0.21/24"),
           "lxc/211.conf": _lxc("02:00:00:00:aa:10", "10.20.0.22/24"),
           "lxc/212.conf": _lxc("02:00:00:00:aa:12", "10.20.0.23/24")}
    c = _controller(pve={}, ports={"veth210i0": 20, "veth211i0": 21, "veth212i0": 22})
    c.set_guests(parse_pve(pve), "poll")
    assert _spoof_guard_passes(c, 20) == [] and _spoof_guard_passes(c, 21) == []
    assert len(_spoof_guard_passes(c, 22)) == 2  # control: the third is declared
    (event,) = [e for e in logs if e["event"] == "address_conflict"]
    assert (event["field"], event["value"]) == ("mac", "02:00:00:00:aa:10")
    assert event["sources"] == ["pve lxc/210.conf:1 net0", "pve lxc/211.conf:1 net0"]
    assert _metric(c, "socknet_address_conflicts") == 1
    assert _metric(c, "socknet_declared_interfaces") == 3 + 5  # and host.yaml's five
    # neither can learn it either
    assert not c.learn_binding("veth210i0", Binding("02:00:00:00:aa:10", "198.51.100.1"))


def test_a_learned_duplicate_is_refused_with_one_log_line_and_counted(logs):
    c = _controller(ports={"veth220i0": 20, "veth221i0": 21})
    assert c.learn_binding("veth220i0", Binding("02:00:00:00:bb:20", "198.51.100.20"))
    for _ in range(3):  # the container keeps sending: each packet comes up again
        assert not c.learn_binding("veth221i0", Binding("02:00:00:00:bb:21", "198.51.100.20"))
    assert not c.learn_binding("veth221i0", Binding(DB_MAC, "198.51.100.21"))  # declared MAC
    refused = [e for e in logs if e["event"] == "binding_refused"]
    assert [(e["port"], e["kind"]) for e in refused] == [("veth221i0", "duplicate")] * 2
    assert _metric(c, "socknet_bindings_refused_total", kind="duplicate") == 4
    assert "veth221i0" not in c.bindings and _spoof_guard_passes(c, 21) == []


def test_learning_refuses_tier_addresses_and_a_new_policy_revokes_them(logs):
    c = _controller(ports={"veth230i0": 20, "veth231i0": 21})
    assert not c.learn_binding("veth230i0", Binding("02:00:00:00:cc:30", "10.20.0.77"))
    assert _metric(c, "socknet_bindings_refused_total", kind="policy-named") == 1
    assert c.learn_binding("veth231i0", Binding("02:00:00:00:cc:31", "10.40.0.31"))
    wider = parse_policy("""\
tiers:
  app: {cidrs: [10.20.0.0/24]}
  db:  {cidrs: [10.30.0.0/24]}
  new: {cidrs: [10.40.0.0/24]}
policy: {default: deny, rules: []}
""")
    c.set_policy(wider)
    assert "veth231i0" not in c.bindings
    assert [e["port"] for e in logs if e["event"] == "binding_revoked"] == ["veth231i0"]


def test_declared_mode_never_learns():
    c = _controller(DECLARED, ports={"veth240i0": 20})
    assert not c.learn_binding("veth240i0", Binding("02:00:00:00:dd:40", "198.51.100.40"))
    assert c.bindings == {}


def test_a_new_declaration_replaces_what_was_learned(logs):
    c = _controller(ports={"veth250i0": 20})
    assert c.learn_binding("veth250i0", Binding("02:00:00:00:ee:50", "198.51.100.50"))
    c.set_guests(parse_pve({"lxc/250.conf": _lxc("02:00:00:00:ee:50", "10.20.0.50/24")}),
                 "poll")
    assert c.bindings == {}
    assert [e["kind"] for e in logs if e["event"] == "binding_revoked"] == ["not-declared"]
    (own, arp) = sorted(_spoof_guard_passes(c, 20), key=lambda f: f.match)
    assert {own.match_dict.get("arp_spa"), arp.match_dict.get("ipv4_src")} == {"10.20.0.50"}


class Untouchable:
    """A switch session nobody may use yet."""

    bridge = "vmbr0"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the switch was used ({name}) before the guest configs were read")


def test_nothing_is_reconciled_before_the_guest_configs_were_read():
    c = Controller(LEARN, guests_pending=True)
    c.ovsdb_changed(PORTS, DPIDS)
    c._sessions[DPIDS["vmbr0"]] = Untouchable()  # type: ignore[assignment]
    assert c.reconcile(DPIDS["vmbr0"]) == 0
    c.set_guests(Guests(), "start")
    assert not c.guests_pending and c._work.qsize() >= 1  # and now it is reconciled
