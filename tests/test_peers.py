"""topology.peers (pure): names, VNIs, which peers get a device, and the changes that
make the devices and mesh ports match.

The devices and ports themselves are exercised on the real mesh lab
(tests/test_mesh_lab.py, tests/test_mesh_learning.py).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topology import peers as peers_mod
from topology.peers import (
    DEVICE_RE,
    LinkState,
    PortState,
    VxDevice,
    WgPeer,
    decide_peers,
    device_name,
    diff_devices,
    pair_vni,
    wanted_devices,
)

NOW = 1_800_000_000.0


def key(n: int) -> str:
    return base64.b64encode(hashlib.sha256(str(n).encode()).digest()).decode()


LOCAL = key(0)


def peer(n: int, *, age: float | None = 10.0, allowed: tuple[str, ...] | None = None) -> WgPeer:
    return WgPeer(
        public_key=key(n),
        endpoint=f"192.0.2.{n}:51821",
        allowed_ips=(f"100.100.0.{n}/32",) if allowed is None else allowed,
        last_handshake=None if age is None else int(NOW - age),
    )


def devices(*peers: WgPeer, local_ip: str | None = "100.100.0.254", stale: float = 180,
         local_key: str | None = LOCAL) -> frozenset[VxDevice]:
    return wanted_devices(peers, local_ip, NOW, local_key=local_key, stale_after_s=stale)


# ------------------------------------------------------------------ names and numbers

def test_device_name_is_short_stable_and_from_the_raw_key():
    name = device_name(key(1))
    assert DEVICE_RE.match(name) and len(name) <= 15
    assert name == "vx-" + hashlib.sha256(base64.b64decode(key(1))).hexdigest()[:8]
    assert device_name(key(1)) == name and device_name(key(2)) != name
    with pytest.raises(ValueError):
        device_name("not a key")


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_vni_is_the_same_from_both_ends_and_24_bits(a: bytes, b: bytes):
    ka, kb = base64.b64encode(a).decode(), base64.b64encode(b).decode()
    assert pair_vni(ka, kb) == pair_vni(kb, ka)
    assert 1 <= pair_vni(ka, kb) < 2**24


def test_vni_differs_per_peer():
    assert len({pair_vni(LOCAL, key(n)) for n in range(1, 200)}) == 199


# ------------------------------------------------------------------ which devices

def test_one_device_per_live_peer():
    got = devices(peer(1), peer(2))
    assert got == {
        VxDevice(device_name(key(n)), pair_vni(LOCAL, key(n)), f"100.100.0.{n}",
                 "100.100.0.254", "netmaker", key(n)) for n in (1, 2)
    }
    d = next(iter(got))
    assert (d.port, d.mtu) == (4789, 1370)


def test_stale_and_never_handshaken_peers_get_no_device():
    assert devices(peer(1, age=181)) == frozenset()
    assert devices(peer(1, age=None)) == frozenset()
    assert len(devices(peer(1, age=179))) == 1
    assert len(devices(peer(1, age=500), stale=600)) == 1
    reasons = {p.peer.public_key: p.reason for p in decide_peers(
        [peer(1, age=None), peer(2, age=400)], "100.100.0.254", NOW, local_key=LOCAL)}
    assert reasons[key(1)] == "no handshake yet"
    assert reasons[key(2)].startswith("stale: last handshake 400 s ago")


def test_remote_is_the_first_ipv4_host_route():
    p = peer(1, allowed=("10.0.0.0/24", "fd00::1/128", "100.100.0.7/32", "100.100.0.8/32"))
    (d,) = devices(p)
    assert d.remote == "100.100.0.7"
    assert devices(peer(2, allowed=("10.0.0.0/24", "fd00::1/128"))) == frozenset()
    assert devices(peer(3, allowed=())) == frozenset()


def test_nothing_without_a_local_address_or_key():
    assert devices(peer(1), local_ip=None) == frozenset()
    assert devices(peer(1), local_key=None) == frozenset()


def test_this_host_itself_is_never_a_peer():
    assert devices(peer(1, allowed=("100.100.0.254/32",))) == frozenset()
    me = WgPeer(public_key=LOCAL, allowed_ips=("100.100.0.9/32",), last_handshake=int(NOW))
    assert devices(me) == frozenset()


def test_vni_collision_keeps_the_first_peer_by_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(peers_mod, "pair_vni", lambda a, b: 42)
    decisions = decide_peers([peer(2), peer(1)], "100.100.0.254", NOW, local_key=LOCAL)
    first, second = sorted(decisions, key=lambda p: p.peer.public_key)
    assert first.device is not None and second.device is None
    assert second.reason == f"VNI 42 collides with peer {first.peer.public_key}"


def test_devices_are_deterministic_whatever_the_order():
    peers = [peer(n) for n in range(1, 8)]
    assert devices(*peers) == devices(*reversed(peers))




# ------------------------------------------------------------------ the changes

WG_INDEX = 7


def live(*ns: int) -> list[peers_mod.PeerDecision]:
    return decide_peers([peer(n) for n in ns], "100.100.0.254", NOW, local_key=LOCAL)


def device_state(n: int, *, index: int = 0, **changed: Any) -> LinkState:
    """The kernel's view of the device peer ``n`` should have, with ``changed`` fields."""
    (d,) = devices(peer(n))
    right = LinkState(d.name, index or 100 + n, "vxlan", vni=d.vni, remote=d.remote,
                      local=d.local, link=WG_INDEX, port=d.port, learning=0, mtu=d.mtu, up=True)
    return replace(right, **changed)


def port_state(state: LinkState, ofport: int = 3) -> PortState:
    return PortState(state.name, ofport, state.index, None)


def test_missing_devices_are_made_and_plugged():
    ch = diff_devices(live(1, 2), {}, {}, WG_INDEX)
    names = sorted(device_name(key(n)) for n in (1, 2))
    assert list(ch.create) == names and not (ch.unplug or ch.delete or ch.recreate or ch.fixes)
    assert ch.ports_to_add(names) == names
    # a device that could not be made gets no port
    assert ch.ports_to_add(names[:1]) == names[:1]


def test_nothing_to_do_when_devices_and_ports_match():
    s = device_state(1)
    ch = diff_devices(live(1), {s.name: s}, {s.name: port_state(s)}, WG_INDEX)
    assert not (ch.unplug or ch.gone or ch.delete or ch.recreate or ch.create or ch.rebind
                or ch.fixes or ch.problems)
    assert ch.ports_to_add([s.name]) == []


def test_a_gone_peer_loses_port_and_device():
    s = device_state(1)
    ch = diff_devices(live(2), {s.name: s}, {s.name: port_state(s)}, WG_INDEX)
    assert ch.unplug == (s.name,) and ch.delete == (s.name,) and ch.gone == (s.name,)
    assert ch.removed == (f"{s.name} (port and device: peer gone or stale)",)
    # only a port left (its device vanished): the port goes
    ch = diff_devices(live(2), {}, {s.name: port_state(s)}, WG_INDEX)
    assert ch.unplug == (s.name,) and ch.delete == ()
    assert ch.removed == (f"{s.name} (port: peer gone or stale)",)


def test_a_wrong_device_is_made_again_and_its_port_re_added():
    for wrong in ({"vni": 1}, {"remote": "100.100.0.99"}, {"local": "100.100.0.9"},
                  {"link": WG_INDEX + 1}, {"port": 8472}, {"learning": 1}):
        s = device_state(1, **wrong)
        ch = diff_devices(live(1), {s.name: s}, {s.name: port_state(s)}, WG_INDEX)
        assert ch.recreate == (s.name,) and ch.create == (), wrong
        assert ch.rebind == (s.name,) and ch.unplug == (s.name,) and ch.delete == ()
        assert ch.ports_to_add([s.name]) == [s.name]


def test_a_port_bound_to_an_older_device_is_re_added():
    """netdev datapath: the port of a deleted device keeps its stale ifindex."""
    s = device_state(1, index=150)
    stale = PortState(s.name, 3, 149, None)
    ch = diff_devices(live(1), {s.name: s}, {s.name: stale}, WG_INDEX)
    assert ch.recreate == () and ch.rebind == (s.name,) and ch.unplug == (s.name,)
    assert ch.ports_to_add([s.name]) == [s.name]
    # no ifindex known (yet): left alone
    unknown = PortState(s.name, 3, None, None)
    assert diff_devices(live(1), {s.name: s}, {s.name: unknown}, WG_INDEX).rebind == ()


def test_mtu_and_up_are_fixed_in_place():
    s = device_state(1, mtu=1500, up=False)
    ch = diff_devices(live(1), {s.name: s}, {s.name: port_state(s)}, WG_INDEX)
    (fix,) = ch.fixes
    assert (fix.index, fix.mtu, fix.up) == (s.index, 1370, True)
    assert fix.describe == (f"{s.name}: MTU 1500 -> 1370", f"{s.name}: set up")
    assert ch.recreate == () and ch.unplug == ()


def test_a_non_vxlan_device_with_our_name_is_left_alone():
    name = device_name(key(1))
    veth = LinkState(name, 40, "veth")
    ch = diff_devices(live(1), {name: veth}, {}, WG_INDEX)
    assert ch.problems == (f"{name} exists but is a veth device, not VXLAN: left alone",)
    assert not (ch.create or ch.recreate or ch.delete) and ch.ports_to_add([name]) == []


def test_devices_made_by_someone_else_are_never_touched():
    manual = LinkState("vx-h2", 50, "vxlan", vni=9, remote="100.100.0.2", link=WG_INDEX)
    other = LinkState("vx-0123abcdef", 51, "vxlan")  # not exactly our name shape
    ports = {n: PortState(n, 5, i, None) for n, i in (("vx-h2", 50), ("vx-0123abcdef", 51))}
    ch = diff_devices(live(), {"vx-h2": manual, "vx-0123abcdef": other}, ports, WG_INDEX)
    assert not (ch.unplug or ch.gone or ch.delete or ch.recreate or ch.rebind)
    assert DEVICE_RE.match("vx-0123abcd") and not DEVICE_RE.match("vx-0123abcdef")
