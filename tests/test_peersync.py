"""controller.peersync's surroundings without I/O: the host.yaml fields and the status
text of the mesh peers (controller.status).

The pure decisions (names, VNIs, which peers get a device, what changes) are tested
in tests/test_peers.py; the devices and ports themselves on the real mesh lab
(tests/test_mesh_lab.py, tests/test_mesh_learning.py).
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from controller.status import format_peers
from controller.status import peer_problems as status_problems
from topology.config import ConfigError, parse_host_config
from topology.peers import device_name

NOW = 1_800_000_000.0


def key(n: int) -> str:
    return base64.b64encode(hashlib.sha256(str(n).encode()).digest()).decode()


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
