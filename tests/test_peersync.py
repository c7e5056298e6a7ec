"""controller.peersync without I/O: names, VNIs, the per-peer device plan, status text.

The devices and ports themselves are exercised on the real mesh lab
(tests/test_mesh_lab.py, tests/test_mesh_learning.py).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller import peersync
from controller.peersync import (
    DEVICE_RE,
    VxDevice,
    device_name,
    format_peers,
    pair_vni,
    plan_devices,
    plan_peers,
    public_from_private,
    status_problems,
)
from controller.wgpeers import WgPeer
from topology.config import ConfigError, parse_host_config

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


def plan(*peers: WgPeer, local_ip: str | None = "100.100.0.254", stale: float = 180,
         local_key: str | None = LOCAL) -> frozenset[VxDevice]:
    return plan_devices(peers, local_ip, NOW, local_key=local_key, stale_after_s=stale)


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


def test_x25519_rfc7748_vector_and_fallback():
    private = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
    public = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert peersync._x25519_base(bytes.fromhex(private)).hex() == public
    assert base64.b64decode(public_from_private(private)).hex() == public


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey():
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                          check=True).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                         check=True).stdout.strip()
    raw = base64.b64decode(priv)
    assert public_from_private(raw.hex()) == pub
    assert base64.b64encode(peersync._x25519_base(raw)).decode() == pub


def test_private_key_from_uapi_device_section_only():
    text = ("private_key=aa\nlisten_port=51821\npublic_key=bb\nprivate_key=cc\n"
            "errno=0\n")
    assert peersync._uapi_private_key(text) == "aa"
    assert peersync._uapi_private_key("listen_port=1\npublic_key=bb\n") is None


# ------------------------------------------------------------------ the plan

def test_one_device_per_live_peer():
    got = plan(peer(1), peer(2))
    assert got == {
        VxDevice(device_name(key(n)), pair_vni(LOCAL, key(n)), f"100.100.0.{n}",
                 "100.100.0.254", "netmaker", key(n)) for n in (1, 2)
    }
    d = next(iter(got))
    assert (d.port, d.mtu) == (4789, 1370)


def test_stale_and_never_handshaken_peers_get_no_device():
    assert plan(peer(1, age=181)) == frozenset()
    assert plan(peer(1, age=None)) == frozenset()
    assert len(plan(peer(1, age=179))) == 1
    assert len(plan(peer(1, age=500), stale=600)) == 1
    reasons = {p.peer.public_key: p.reason for p in plan_peers(
        [peer(1, age=None), peer(2, age=400)], "100.100.0.254", NOW, local_key=LOCAL)}
    assert reasons[key(1)] == "no handshake yet"
    assert reasons[key(2)].startswith("stale: last handshake 400 s ago")


def test_remote_is_the_first_ipv4_host_route():
    p = peer(1, allowed=("10.0.0.0/24", "fd00::1/128", "100.100.0.7/32", "100.100.0.8/32"))
    (d,) = plan(p)
    assert d.remote == "100.100.0.7"
    assert plan(peer(2, allowed=("10.0.0.0/24", "fd00::1/128"))) == frozenset()
    assert plan(peer(3, allowed=())) == frozenset()


def test_nothing_without_a_local_address_or_key():
    assert plan(peer(1), local_ip=None) == frozenset()
    assert plan(peer(1), local_key=None) == frozenset()


def test_this_host_itself_is_never_a_peer():
    assert plan(peer(1, allowed=("100.100.0.254/32",))) == frozenset()
    me = WgPeer(public_key=LOCAL, allowed_ips=("100.100.0.9/32",), last_handshake=int(NOW))
    assert plan(me) == frozenset()


def test_vni_collision_keeps_the_first_peer_by_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(peersync, "pair_vni", lambda a, b: 42)
    plans = plan_peers([peer(2), peer(1)], "100.100.0.254", NOW, local_key=LOCAL)
    first, second = sorted(plans, key=lambda p: p.peer.public_key)
    assert first.device is not None and second.device is None
    assert second.reason == f"VNI 42 collides with peer {first.peer.public_key}"


def test_plan_is_deterministic_whatever_the_order():
    peers = [peer(n) for n in range(1, 8)]
    assert plan(*peers) == plan(*reversed(peers))


# ------------------------------------------------------------------ config

BASE = """\
bridges:
  mesh: {{name: mesh, uplinks: {uplinks}, to_socket: to-socket{extra}}}
  socket: {{name: vmbr0}}
"""


def test_config_defaults_and_fields():
    cfg = parse_host_config(BASE.format(uplinks='["nm-privacy"]', extra=""))
    m = cfg.bridges.mesh
    assert (m.wg_interface, m.vxlan, m.stale_after_s, m.wg_sock_dir) == \
        ("netmaker", False, 180, "/var/run/wireguard")
    cfg = parse_host_config(BASE.format(
        uplinks='["vx-*"]', extra=", vxlan: true, wg_interface: nm-mynet, stale_after_s: 60"))
    assert (cfg.bridges.mesh.vxlan, cfg.bridges.mesh.wg_interface) == (True, "nm-mynet")


def test_vxlan_needs_uplinks_that_match_its_ports():
    with pytest.raises(ConfigError, match="vxlan: true needs an uplink pattern"):
        parse_host_config(BASE.format(uplinks='["nm-privacy"]', extra=", vxlan: true"))
    with pytest.raises(ConfigError):
        parse_host_config(BASE.format(uplinks='["vx-*"]', extra=", stale_after_s: 1"))


# ------------------------------------------------------------------ status text

def _status(managed: bool, ofport: int | None) -> dict[str, object]:
    return {
        "interface": "netmaker", "source": "uapi", "managed": managed,
        "local_ip": "100.100.0.1",
        "peers": [
            {"public_key": key(1), "endpoint": "192.0.2.2:51821",
             "allowed_ips": ["100.100.0.2/32"], "last_handshake": int(NOW),
             "handshake_age_s": 12, "stale": False, "port": device_name(key(1)),
             "ofport": ofport, "vni": 7, "note": None},
            {"public_key": key(2), "endpoint": None, "allowed_ips": ["100.100.0.3/32"],
             "last_handshake": None, "handshake_age_s": None, "stale": True, "port": None,
             "ofport": None, "vni": None, "note": "no handshake yet"},
        ],
    }


def test_status_lines_and_problems():
    text = "\n".join(format_peers(_status(True, 3)))
    assert "read via uapi" in text and "socknet-managed" in text
    assert f"-> {device_name(key(1))} (ofport 3)" in text
    assert "handshake never  STALE  -> no port" in text
    assert status_problems(_status(True, 3)) == []
    assert status_problems(_status(True, None)) == [
        f"mesh peer {key(1)}: live but port {device_name(key(1))} is not on the bridge"]
    assert status_problems(_status(False, None)) == []
    err = {"interface": "netmaker", "managed": True, "error": "no UAPI socket", "peers": []}
    assert status_problems(err) == ["mesh peers: no UAPI socket"]
    assert "unavailable (no UAPI socket)" in format_peers(err)[0]
