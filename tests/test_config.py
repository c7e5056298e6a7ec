"""host.yaml validation: each kind of bad input gives its own clear error, exit 2."""

import subprocess
import sys
import textwrap

import pytest

from topology.config import ConfigError, load_host_config, parse_host_config

GOOD = textwrap.dedent(
    """\
    host: node1
    datapath_type: netdev
    bridges:
      mesh:
        name: mesh
        uplinks: [nm-privacy, "vx-*"]
        to_socket: to-socket
      socket:
        name: vmbr0
        from_mesh: from-mesh
        warp: warp0
        privacy_ids: 100-199
        service_ids: {first: 200, last: 299}
    containers:
      100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
    """
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_host_config(text, "host.yaml")
    return info.value.problems


def test_good_config_and_defaults():
    cfg = parse_host_config(GOOD)
    assert cfg.controller.listen == "ssl:127.0.0.1:6653"  # loopback (and TLS) by default
    assert cfg.controller.ovs_target == "ssl:127.0.0.1:6653"
    assert 150 in cfg.bridges.socket.privacy_ids and 250 in cfg.bridges.socket.service_ids
    assert str(cfg.containers[100].ip.ip) == "10.0.0.100"


def test_minimal_config_uses_seed_names():
    cfg = parse_host_config("bridges: {mesh: {}, socket: {}}\n")
    assert cfg.bridges.mesh.name == "mesh" and cfg.bridges.socket.name == "vmbr0"
    assert cfg.bridges.mesh.uplinks == ["nm-privacy"]
    assert (cfg.bridges.socket.privacy_ids.first, cfg.bridges.socket.privacy_ids.last) == (100, 199)


def test_unknown_key_names_file_line_and_field():
    text = GOOD.replace("    warp: warp0\n", "    warp: warp0\n    wrap: warp1\n")
    (p,) = problems(text)
    assert p == "host.yaml:12: bridges.socket.wrap: unknown key"


def test_bad_cidr_names_the_container():
    (p,) = problems(GOOD.replace("10.0.0.100/24", "10.0.0.300/24"))
    assert p.startswith("host.yaml:15: containers.100.ip:")
    assert "not an IPv4 address or CIDR" in p


def test_overlapping_id_ranges():
    (p,) = problems(GOOD.replace("privacy_ids: 100-199", "privacy_ids: 100-250"))
    assert p.startswith("host.yaml:8: bridges.socket:")
    assert "overlap" in p


def test_missing_bridge():
    text = "bridges:\n  mesh: {name: mesh}\n"
    (p,) = problems(text)
    assert p == "host.yaml:1: bridges.socket: required field is missing"


def test_missing_bridges_section():
    (p,) = problems("host: x\n")
    assert p == "host.yaml:1: bridges: required field is missing"


def test_bad_listen_address_and_mac_and_range_reported_together():
    text = GOOD.replace("host: node1", "host: node1\ncontroller: {listen: 'tcp:localhost'}")
    text = text.replace('"02:00:00:00:01:00"', '"01:00:00:00:01:00"')
    found = problems(text)
    assert any("controller.listen" in p and "tcp:ADDRESS:PORT" in p for p in found)
    assert any("containers.100.mac" in p and "multicast" in p for p in found)


def test_container_outside_ranges():
    (p,) = problems(GOOD + "  450: {mac: '02:00:00:00:04:50'}\n")
    assert "container 450 is in neither" in p


def test_reversed_range_and_bad_interface_name():
    found = problems(GOOD.replace("100-199", "199-100").replace("warp: warp0", "warp: 'a b'"))
    assert any("greater than last" in p for p in found)
    assert any("bridges.socket.warp" in p and "interface name" in p for p in found)


def test_same_bridge_names():
    (p,) = problems(GOOD.replace("name: vmbr0", "name: mesh"))
    assert "same name" in p


def test_yaml_syntax_error_has_line():
    (p,) = problems("bridges:\n  mesh: {name: mesh\n")
    assert p.startswith("host.yaml:") and "YAML syntax error" in p


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_host_config(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.problems[0]


def test_cli_exit_status_2_on_bad_config(tmp_path):
    bad = tmp_path / "host.yaml"
    bad.write_text(GOOD.replace("warp: warp0", "warp: warp0\n    bogus: 1"))
    res = subprocess.run([sys.executable, "-m", "controller.cli", "validate", "-c", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{bad}:12: bridges.socket.bogus: unknown key" in res.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    res = subprocess.run([sys.executable, "-m", "controller.cli", "validate", "-c", str(good)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
