"""Remote hosts learned from mesh ARP: the one-flow fast path must leave exactly the
state a full recompute gives, and send exactly that one flow. No switch needed."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from os_ken.ofproto import ofproto_v1_4, ofproto_v1_4_parser
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from controller import encode
from controller.runtime import Controller, gratuitous_arp, parse_packet
from controller.switch import SwitchSession
from topology.config import parse_host_config
from topology.flows import desired_state, service_arp_flow
from topology.model import Owner, cookie_owner
from topology.pipeline import SOCKET_PIPELINE

HOST = """
host: unit
bridges:
  mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}
  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
containers:
  100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
  200: {mac: "02:00:00:00:02:00", ip: 10.0.0.200/24}
"""
PORTS = {"mesh": {"nm-privacy": 1, "to-socket": 2},
         "vmbr0": {"from-mesh": 1, "warp0": 2, "veth100i0": 3, "veth200i0": 4}}
DPIDS = {"mesh": 0xA0, "vmbr0": 0xA1}


class FakeDatapath:
    ofproto = ofproto_v1_4
    ofproto_parser = ofproto_v1_4_parser

    def __init__(self, dpid: int) -> None:
        self.id = dpid
        self.xid = 0
        self.sent: list[Any] = []
        self.connected = True

    def set_xid(self, msg: Any) -> None:
        self.xid += 1
        msg.set_xid(self.xid)

    def send_msg(self, msg: Any) -> bool:
        if not self.connected:
            return False
        self.sent.append(msg)
        return True

    def send(self, data: bytes) -> bool:
        """A raw message: decoded with os-ken's parser, as the switch would read it."""
        if not self.connected:
            return False
        version, msg_type, msg_len, xid = struct.unpack_from("!BBHI", data)
        assert msg_len == len(data)
        self.sent.append(ofproto_v1_4_parser.msg_parser(self, version, msg_type, msg_len, xid,
                                                        data))
        return True


def _controller() -> tuple[Controller, FakeDatapath]:
    ctl = Controller(parse_host_config(HOST))
    ctl.ovsdb_changed(PORTS, DPIDS)
    dp = FakeDatapath(DPIDS["vmbr0"])
    ctl._sessions[dp.id] = SwitchSession(dp, "vmbr0")
    # as after the first reconcile: everything desired is on the switch
    ctl._sessions[dp.id].installed = {f.cookie for f in ctl._desired["vmbr0"]}
    return ctl, dp


def _mesh_arp(ip: str, mac: str) -> Any:
    data = bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=mac, psrc=ip, pdst="10.0.0.200"))
    return SimpleNamespace(match={"in_port": 1}, data=data,
                           table_id=SOCKET_PIPELINE["dispatch"])


def _full(ctl: Controller) -> frozenset[Any]:
    remote = {ip: mac for ip, (mac, _) in ctl.remote.items()}
    return desired_state(ctl.cfg, PORTS, None, ctl.bindings, remote)["vmbr0"]


def test_new_remote_hosts_take_one_flow_mod_each_and_match_a_full_recompute() -> None:
    ctl, dp = _controller()
    for k in range(1, 21):
        ctl.packet_in(dp.id, _mesh_arp(f"10.0.1.{k}", f"02:00:00:00:09:{k:02x}"))
    assert ctl._desired["vmbr0"] == _full(ctl)
    assert ctl._work.qsize() == 0  # no full reconcile was asked for
    adds = [m for m in dp.sent if isinstance(m, ofproto_v1_4_parser.OFPFlowMod)]
    assert len(adds) == len(dp.sent) == 20
    assert all(cookie_owner(m.cookie) is Owner.DISCOVERED for m in adds)
    want = {service_arp_flow(f"10.0.1.{k}", f"02:00:00:00:09:{k:02x}").cookie
            for k in range(1, 21)}
    assert {m.cookie for m in adds} == want
    assert ctl._sessions[dp.id].installed == {f.cookie for f in ctl._desired["vmbr0"]}


def test_known_host_again_sends_nothing_and_a_moved_host_replaces_its_flow() -> None:
    ctl, dp = _controller()
    ctl.packet_in(dp.id, _mesh_arp("10.0.1.7", "02:00:00:00:09:07"))
    ctl.packet_in(dp.id, _mesh_arp("10.0.1.7", "02:00:00:00:09:07"))
    assert len(dp.sent) == 1
    ctl.packet_in(dp.id, _mesh_arp("10.0.1.7", "02:00:00:00:09:77"))
    assert len(dp.sent) == 2
    assert dp.sent[1].cookie == service_arp_flow("10.0.1.7", "02:00:00:00:09:77").cookie
    assert ctl._desired["vmbr0"] == _full(ctl)
    old = service_arp_flow("10.0.1.7", "02:00:00:00:09:07")
    assert old not in ctl._desired["vmbr0"]
    assert old.cookie not in ctl._sessions[dp.id].installed


def test_a_remote_claim_on_a_local_address_takes_the_full_path() -> None:
    """A mesh ARP claiming a local container's address must not add a responder: the
    full recompute keeps the local one (and no flow-mod is sent from the event loop)."""
    ctl, dp = _controller()
    before = ctl._desired["vmbr0"]
    ctl.packet_in(dp.id, _mesh_arp("10.0.0.200", "02:00:00:00:09:99"))
    assert dp.sent == []
    assert ctl._desired["vmbr0"] == before == _full(ctl)
    assert ctl._work.qsize() >= 1  # the worker reconciles (here: nothing to change)


def test_without_a_read_of_the_switch_the_full_path_is_taken() -> None:
    ctl, dp = _controller()
    ctl._sessions[dp.id].installed = None  # not read yet (just connected)
    ctl.packet_in(dp.id, _mesh_arp("10.0.1.9", "02:00:00:00:09:09"))
    assert dp.sent == [] and ctl._work.qsize() >= 1
    assert ctl._desired["vmbr0"] == _full(ctl)


def test_a_lost_connection_makes_the_next_reconcile_read_the_switch() -> None:
    ctl, dp = _controller()
    dp.connected = False
    ctl.packet_in(dp.id, _mesh_arp("10.0.1.9", "02:00:00:00:09:09"))
    assert ctl._sessions[dp.id].installed is None
    assert ctl._desired["vmbr0"] == _full(ctl)


def test_raw_flow_mod_is_byte_identical_to_os_ken() -> None:
    dp = FakeDatapath(1)
    for f in (service_arp_flow("10.0.1.7", "02:00:00:00:09:07"),
              *sorted(_full(_controller()[0]), key=lambda f: f.cookie)):
        assert encode.raw_flow_mod_add(dp, f, 4242) == encode.serialize(
            encode.flow_mod_add(dp, f), 4242)


@pytest.mark.parametrize(("frame", "want"), [
    (gratuitous_arp("02:00:00:00:00:01", "10.0.0.5"),
     {"eth_src": "02:00:00:00:00:01", "sender_ip": "10.0.0.5"}),
    (bytes(Ether(src="02:00:00:00:00:02") / IP(src="1.2.3.4", dst="5.6.7.8") / TCP(dport=443)),
     {"eth_src": "02:00:00:00:00:02", "ipv4_src": "1.2.3.4", "ipv4_dst": "5.6.7.8",
      "proto": "tcp", "sender_ip": "1.2.3.4", "dst_port": 443}),
    (bytes(Ether(src="02:00:00:00:00:02") / Dot1Q(vlan=5) / IP(src="1.2.3.4", dst="5.6.7.8")
           / UDP(dport=53)),
     {"eth_src": "02:00:00:00:00:02", "ipv4_src": "1.2.3.4", "ipv4_dst": "5.6.7.8",
      "proto": "udp", "sender_ip": "1.2.3.4", "dst_port": 53}),
    (bytes(Ether(src="02:00:00:00:00:02") / IP(src="0.0.0.0", dst="5.6.7.8") / ICMP()),
     {"eth_src": "02:00:00:00:00:02", "ipv4_src": "0.0.0.0", "ipv4_dst": "5.6.7.8",
      "proto": "icmp"}),
    # an ARP whose sender hardware address is not the frame's source teaches nothing
    (bytes(Ether(src="02:00:00:00:00:02") / ARP(hwsrc="02:00:00:00:00:03", psrc="1.1.1.1")),
     {"eth_src": "02:00:00:00:00:02"}),
    # a second fragment has no ports
    (bytes(Ether(src="02:00:00:00:00:02") / IP(src="1.2.3.4", dst="5.6.7.8", frag=10)
           / UDP(dport=53)),
     {"eth_src": "02:00:00:00:00:02", "ipv4_src": "1.2.3.4", "ipv4_dst": "5.6.7.8",
      "proto": "udp", "sender_ip": "1.2.3.4"}),
    (b"\x01" * 10, {}),
    (bytes(Ether(src="02:00:00:00:00:02", type=0x0806)) + b"\x00\x01", {"eth_src":
                                                                        "02:00:00:00:00:02"}),
])
def test_parse_packet(frame: bytes, want: dict[str, Any]) -> None:
    assert parse_packet(frame) == want


def test_a_flood_of_new_hosts_is_learned_whole_but_logged_within_a_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import controller.runtime as runtime

    lines: list[dict[str, Any]] = []

    class Log:
        def info(self, event: str, **kw: Any) -> None:
            if event == "remote_host_learned":
                lines.append(kw)

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **kw: None

    monkeypatch.setattr(runtime, "log", Log())
    ctl, dp = _controller()
    ctl._learn_log.per_second = 0.0  # no refill during the test: exactly the burst is logged
    for k in range(1, 201):
        ctl.packet_in(dp.id, _mesh_arp(f"10.0.2.{k}", f"02:00:00:00:0a:{k:02x}"))
    assert ctl.stats.remote_learned == len(ctl.remote) == 200 == len(dp.sent)
    assert len(lines) == int(ctl._learn_log.burst)
    ctl._learn_log._tokens = 1.0  # budget back: the next line says how many were left out
    ctl.packet_in(dp.id, _mesh_arp("10.0.3.1", "02:00:00:00:0b:01"))
    assert len(lines) == int(ctl._learn_log.burst) + 1
    assert lines[-1]["not_logged_before"] == 150
