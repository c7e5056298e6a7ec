"""labs/containerlab/*.clab.yml: structure only (no Docker engine runs in CI).

Schema-level checks of the containerlab topology (the keys containerlab's
clab.schema.json allows, kinds, images, links), then that it is the socket
network socknet expects: every bridge port name gets the intended role from
``topology.roles.classify_port`` under a HostConfig equivalent to labs/lab.py's,
the containers' addresses are the ones host.yaml declares, and the helper script
that creates the bridges and starts the controller is consistent with the file.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from labs.lab import SocketLab
from topology.config import HostConfig, load_host_config, parse_host_config
from topology.roles import Role, classify_port

CLAB_DIR = Path(__file__).resolve().parent.parent / "labs" / "containerlab"
TOPOLOGIES = sorted(CLAB_DIR.glob("*.clab.yml"))
SCRIPT = CLAB_DIR / "socket-host.sh"
HOST_YAML = CLAB_DIR / "host.yaml"

# From containerlab's clab.schema.json (additionalProperties: false at these levels).
TOP_KEYS = {"name", "prefix", "mgmt", "topology", "settings", "debug"}
TOPOLOGY_KEYS = {"nodes", "kinds", "defaults", "links", "groups"}
NODE_KEYS = {
    "kind", "image", "image-pull-policy", "type", "group", "license", "startup-config",
    "startup-delay", "enforce-startup-config", "auto-remove", "exec", "binds", "ports", "env",
    "user", "entrypoint", "cmd", "publish", "labels", "runtime", "mgmt-ipv4", "mgmt-ipv6",
    "network-mode", "cpu", "memory", "cpu-set", "extras", "config", "stages", "dns",
    "certificate", "healthcheck", "wait-for",
}
LINK_KEYS = {"endpoints", "vars", "type", "mtu", "labels"}
CONTAINER_KINDS = {"linux"}
BRIDGE_KINDS = {"ovs-bridge"}
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ: 15 characters at most
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9][A-Za-z0-9._-]*$")
ROLE_LABEL = "socknet.role"
VMID_LABEL = "socknet.vmid"


def lab_config() -> HostConfig:
    """The host.yaml labs/lab.py generates for its one-host lab (nothing is started)."""
    lab = SocketLab("clab", Path("/nonexistent/clab"))
    return parse_host_config(lab.host_config(), "<labs.lab host.yaml>")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def resolved(topo: dict[str, Any], name: str) -> dict[str, Any]:
    """A node's settings as containerlab resolves them: defaults < kinds.<kind> < node."""
    t = topo["topology"]
    node = t["nodes"][name] or {}
    kind = node.get("kind") or (t.get("defaults") or {}).get("kind")
    out = dict(t.get("defaults") or {})
    out.update((t.get("kinds") or {}).get(kind) or {})
    out.update(node)
    out["kind"] = kind
    return out


def endpoints(topo: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for link in topo["topology"].get("links") or []:
        for ep in link["endpoints"]:
            node, _, iface = ep.partition(":")
            out.append((node, iface))
    return out


def bridge_ports(topo: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(bridge, port name) -> the node on the other end of the link."""
    nodes = topo["topology"]["nodes"]
    out = {}
    for link in topo["topology"]["links"]:
        (a, ai), (b, bi) = (ep.partition(":")[::2] for ep in link["endpoints"])
        for (br, port), other in (((a, ai), b), ((b, bi), a)):
            if resolved(topo, br)["kind"] in BRIDGE_KINDS and br in nodes:
                out[(br, port)] = other
    return out


def exec_args(node: dict[str, Any]) -> list[list[str]]:
    return [shlex.split(cmd) for cmd in node.get("exec") or []]


@pytest.fixture(params=TOPOLOGIES, ids=lambda p: p.name)
def topo(request) -> dict[str, Any]:
    return load(request.param)


def test_there_is_a_socket_host_topology():
    assert CLAB_DIR / "socket-host.clab.yml" in TOPOLOGIES


# --------------------------------------------------------------------------- schema level


def test_top_level_and_topology_keys(topo):
    assert set(topo) <= TOP_KEYS, set(topo) - TOP_KEYS
    assert isinstance(topo.get("name"), str) and NAME_RE.match(topo["name"])
    t = topo["topology"]
    assert isinstance(t, dict) and set(t) <= TOPOLOGY_KEYS, set(t) - TOPOLOGY_KEYS
    assert isinstance(t["nodes"], dict) and t["nodes"]
    assert isinstance(t["links"], list) and t["links"]
    for kind, settings in (t.get("kinds") or {}).items():
        assert kind in CONTAINER_KINDS | BRIDGE_KINDS, kind
        assert set(settings) <= NODE_KEYS, set(settings) - NODE_KEYS


def test_nodes_kinds_and_images(topo):
    for name in topo["topology"]["nodes"]:
        assert NAME_RE.match(name), name
        node = topo["topology"]["nodes"][name] or {}
        assert set(node) <= NODE_KEYS, f"{name}: {set(node) - NODE_KEYS}"
        r = resolved(topo, name)
        assert r["kind"] in CONTAINER_KINDS | BRIDGE_KINDS, f"{name}: kind {r['kind']!r}"
        if r["kind"] in BRIDGE_KINDS:
            assert "image" not in node and "exec" not in node, f"{name}: a bridge has no image"
            continue
        image = r.get("image")
        assert isinstance(image, str) and IMAGE_RE.match(image), f"{name}: image {image!r}"
        assert not image.endswith(":latest"), f"{name}: pin the image, not {image}"
        # no management interface: the socket bridges are the containers' only network
        assert r.get("network-mode") == "none", f"{name}: network-mode {r.get('network-mode')}"
        assert all(isinstance(c, str) and c for c in r.get("exec") or []), name
        for key, value in (r.get("labels") or {}).items():
            assert isinstance(key, str) and isinstance(value, str), f"{name}: label {key}"


def test_links_refer_to_defined_nodes_and_valid_interface_names(topo):
    nodes = topo["topology"]["nodes"]
    seen: set[tuple[str, str]] = set()
    for link in topo["topology"]["links"]:
        assert set(link) <= LINK_KEYS, set(link) - LINK_KEYS
        eps = link["endpoints"]
        assert isinstance(eps, list) and len(eps) == 2, link
        for ep in eps:
            assert isinstance(ep, str) and re.fullmatch(r"\S+:\S+", ep), ep
            node, _, iface = ep.partition(":")
            assert node in nodes, f"{ep}: node {node!r} is not defined"
            assert IFNAME_RE.match(iface), f"{ep}: {iface!r} is not a valid interface name"
            assert (node, iface) not in seen, f"{ep} is used twice"
            seen.add((node, iface))
        (a, _), (b, _) = (ep.partition(":")[::2] for ep in eps)
        assert a != b, f"{eps}: a link from a node to itself"
    # eth0 is containerlab's management interface
    assert all(iface != "eth0" for _, iface in seen)
    # every node is wired
    assert {n for n, _ in seen} == set(nodes)


def test_bridges_are_exactly_socknets_and_all_are_referenced(topo):
    cfg = lab_config()
    nodes = topo["topology"]["nodes"]
    bridges = {n for n in nodes if resolved(topo, n)["kind"] in BRIDGE_KINDS}
    assert bridges == {cfg.bridges.mesh.name, cfg.bridges.socket.name}
    used = {n for n, _ in endpoints(topo)}
    assert bridges <= used, f"bridges never linked: {bridges - used}"
    # the bridge ports' devices live in the host namespace: their names must be unique
    ports = [iface for n, iface in endpoints(topo) if n in bridges]
    assert len(ports) == len(set(ports))
    assert not bridges & set(ports)


# --------------------------------------------------------------------------- socknet's view


def test_every_bridge_port_gets_its_role_from_socknet(topo):
    cfg = lab_config()
    nodes = topo["topology"]["nodes"]
    roles: dict[Role, list[str]] = {}
    for (bridge, port), peer in bridge_ports(topo).items():
        role = classify_port(cfg, bridge, port)
        assert role.role is not Role.UNKNOWN, f"{bridge}:{port} has no role (would be dropped)"
        roles.setdefault(role.role, []).append(port)
        labels = (nodes[peer] or {}).get("labels") or {}
        assert labels.get(ROLE_LABEL) == role.role.value, (
            f"{peer} is labelled {labels.get(ROLE_LABEL)!r} but socknet sees {bridge}:{port} "
            f"as {role.role.value}")
        if role.vmid is not None:
            assert labels.get(VMID_LABEL) == str(role.vmid), f"{peer}: vmid label"
    assert sorted(roles.get(Role.PRIVACY, [])) == ["veth100i0", "veth102i0"]
    assert sorted(roles.get(Role.SERVICE, [])) == ["veth200i0", "veth201i0"]
    assert roles.get(Role.MESH_UPLINK) == ["nm-privacy"]
    assert roles.get(Role.WARP) == ["warp0"]
    # to-socket/from-mesh are made by `socknet bootstrap` before deploy: containerlab
    # refuses to create an interface that already exists
    assert Role.TO_SOCKET not in roles and Role.FROM_MESH not in roles


def test_container_addresses_match_the_declared_ones(topo):
    """socknet's anti-spoofing guard drops a container sending with another MAC or IP."""
    cfg = lab_config()
    nodes = topo["topology"]["nodes"]
    for (bridge, port), peer in bridge_ports(topo).items():
        role = classify_port(cfg, bridge, port)
        if role.vmid is None:
            continue
        node_iface = next(i for n, i in endpoints(topo) if n == peer)
        cmds = exec_args(nodes[peer])
        macs = [c[-1] for c in cmds if c[:3] == ["ip", "link", "set"] and "address" in c
                and node_iface in c]
        addrs = [c[3] for c in cmds if c[:3] == ["ip", "addr", "add"] and c[-1] == node_iface]
        declared = cfg.container(role.vmid)
        assert macs == [declared.mac], f"{peer}: MAC {macs} != {declared.mac}"
        assert [ipaddress.IPv4Interface(a) for a in addrs] == [declared.ip], f"{peer}: {addrs}"


def test_privacy_containers_route_through_warp(topo):
    cfg = lab_config()
    nodes = topo["topology"]["nodes"]
    ports = bridge_ports(topo)
    warp_node = ports[(cfg.bridges.socket.name, cfg.bridges.socket.warp)]
    warp_ips = {c[3].split("/")[0] for c in exec_args(nodes[warp_node])
                if c[:3] == ["ip", "addr", "add"]}
    for (bridge, port), peer in ports.items():
        if classify_port(cfg, bridge, port).role is Role.PRIVACY:
            gws = [c[-1] for c in exec_args(nodes[peer]) if c[:4] == ["ip", "route", "add",
                                                                   "default"]]
            assert gws and set(gws) <= warp_ips, f"{peer}: default route {gws}"


# --------------------------------------------------------------------------- bridges + controller


def test_helper_host_yaml_is_the_labs_config():
    cfg = load_host_config(HOST_YAML)
    lab = lab_config()
    assert cfg.bridges == lab.bridges
    assert cfg.containers == lab.containers
    assert cfg.datapath_type == "netdev"
    assert cfg.ovsdb == "unix:/var/run/openvswitch/db.sock"  # the system OVS containerlab uses
    assert cfg.controller.ovs_target.startswith("tcp:127.0.0.1:")


def test_helper_script_creates_bridges_and_points_them_at_socknet():
    text = SCRIPT.read_text()
    assert SCRIPT.stat().st_mode & 0o111, "socket-host.sh is not executable"
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert 'TOPO="$HERE/socket-host.clab.yml"' in text
    assert 'CONFIG="${CONFIG:-$HERE/host.yaml}"' in text
    for needed in ("bootstrap -c", "controller.cli run -c", "containerlab deploy -t",
                   "containerlab destroy -t"):
        assert needed in text, needed
    res = subprocess.run([str(SCRIPT), "help"], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0 and "socket-host.sh up" in res.stdout
    # the topology file tells how the controller is attached
    clab_text = (CLAB_DIR / "socket-host.clab.yml").read_text()
    assert "socket-host.sh up" in clab_text and "set-controller" in clab_text
