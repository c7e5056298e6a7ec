"""network-plan.json: the reviewed, deterministic description of one host's network.

``socknet plan -c host.yaml [--policy policy.yaml]`` writes it (seed 000's
"network-plan.json" artefact): the bridges bootstrap creates and how, the port
roles and the names that select them, the controller and metrics addresses,
the tiers (CIDRs, internal flags), externals and tailnet CIDRs of the policy,
and the mesh peers when the WireGuard device can be read. Keys are sorted,
there are no timestamps or counters: the same inputs give the same bytes, so
the file can be reviewed and diffed like code.

``socknet bootstrap -c host.yaml --plan network-plan.json`` rebuilds the plan
from host.yaml (and the policy it names) and refuses to touch anything if the
two differ: what was reviewed is what gets applied. ``mesh_peers`` is live
state (peers join and leave) and is not compared.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from controller.bootstrap import BRIDGE_OTHER_CONFIG, CONNECTION_MODE, FAIL_MODE, PROTOCOLS
from controller.tls import is_loopback, ovs_ssl
from topology.config import HostConfig
from topology.policy import Policy

PLAN_FORMAT = "socknet-network-plan/1"
# Port names that give a container port its vmid (topology.roles._CONTAINER_PORT):
# seed style, Proxmox containers, Proxmox VMs, Proxmox with the PVE firewall on.
CONTAINER_PORT_PATTERNS = ("veth{vmid}", "veth{vmid}i{n}", "tap{vmid}i{n}", "fwln{vmid}o{n}")
TAILNET = ipaddress.IPv4Network("100.64.0.0/10")  # Tailscale's CGNAT range (seed 000)
NOT_COMPARED = ("mesh_peers",)


class PlanError(Exception):
    """The plan file cannot be used: unreadable, not a plan, or not matching host.yaml."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- build


def _ids(r: Any) -> str:
    return f"{r.first}-{r.last}"


def _bridges(cfg: HostConfig) -> dict[str, Any]:
    mesh, sock = cfg.bridges.mesh, cfg.bridges.socket
    common = {
        "datapath_type": cfg.datapath_type,
        "fail_mode": FAIL_MODE,
        "protocols": list(PROTOCOLS),
        "other_config": dict(BRIDGE_OTHER_CONFIG),
        "controller": {
            "target": cfg.controller.ovs_target,
            "connection_mode": CONNECTION_MODE,
            "max_backoff_ms": cfg.controller.max_backoff_ms,
            "inactivity_probe_ms": cfg.controller.inactivity_probe_ms,
        },
    }
    unknown = {"role": "unknown", "match": "any other port", "traffic": "dropped at ingress"}
    mesh_ports = [
        {"role": "mesh-uplink", "names": list(mesh.uplinks),
         "traffic": f"forwarded to {mesh.to_socket} only"},
        {"role": "to-socket", "names": [mesh.to_socket], "created_by": "bootstrap",
         "traffic": "forwarded to the mesh uplinks only"},
        unknown,
    ]
    sock_ports = [
        {"role": "from-mesh", "names": [sock.from_mesh], "created_by": "bootstrap"},
        {"role": "warp", "names": [sock.warp]},
        {"role": "privacy", "vmids": _ids(sock.privacy_ids),
         "names": list(CONTAINER_PORT_PATTERNS), "traffic": f"to {sock.warp} only"},
        {"role": "service", "vmids": _ids(sock.service_ids),
         "names": list(CONTAINER_PORT_PATTERNS), "traffic": "tier policy"},
        unknown,
    ]
    if sock.gateway is not None:
        sock_ports.insert(2, {"role": "gateway", "names": [sock.gateway]})
    return {
        mesh.name: {**common, "role": "mesh", "ports": mesh_ports},
        sock.name: {**common, "role": "socket", "ports": sock_ports},
    }


def _policy(policy: Policy, source: str) -> dict[str, Any]:
    def cidrs(nets: Any) -> list[str]:
        return [str(n) for n in nets]

    externals = {name: {"cidrs": cidrs(s.nets)} for name, s in policy.externals.items()}
    tailnet = sorted({str(n) for name, s in policy.externals.items() for n in s.nets
                      if "tailnet" in name or n.subnet_of(TAILNET)})
    return {
        "source": source,
        "default": policy.default,
        "tiers": {name: {"cidrs": cidrs(s.nets), "internal": name in policy.internal}
                  for name, s in policy.tiers.items()},
        "externals": externals,
        "tailnet_cidrs": tailnet,
        "rules": [
            {"name": r.name, "action": r.action, "log": r.log, "from": list(r.src.names),
             "to": list(r.dst.names), "services": [str(s) for s in r.services] or ["any"]}
            for r in policy.rules if not r.implicit
        ],
        "tests": len(policy.tests),
    }


def build_plan(cfg: HostConfig, policy: Policy | None = None, policy_source: str | None = None,
               mesh_peers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan as plain JSON values (deterministic for the same inputs)."""
    ctl, metrics = cfg.controller, cfg.metrics
    ssl = ovs_ssl(cfg)
    tls = ctl.tls_files
    return {
        "format": PLAN_FORMAT,
        "host": cfg.host,
        "ovsdb": cfg.ovsdb,
        "datapath_type": cfg.datapath_type,
        "bridges": _bridges(cfg),
        "veth_pair": [cfg.bridges.mesh.to_socket, cfg.bridges.socket.from_mesh],
        "controller": {
            "listen": ctl.listen,
            "loopback": is_loopback(ctl.host),
            "tls": None if tls is None else {
                "controller_key": tls.key, "controller_cert": tls.cert,
                "switch_ca_checked_by_controller": tls.ca_cert,
                "ovs_ssl": ssl,
                "made_by_bootstrap": ctl.managed_pki,
            },
        },
        "metrics": {"enabled": metrics.enabled, "listen": metrics.listen,
                    "loopback": is_loopback(metrics.host)},
        "containers": {
            str(vmid): {"mac": c.mac, "ip": str(c.ip) if c.ip else None}
            for vmid, c in sorted(cfg.containers.items())
        },
        "policy": None if policy is None else _policy(policy, policy_source or policy.source),
        "mesh_peers": mesh_peers,
    }


def plan_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- mesh peers


def mesh_interfaces(cfg: HostConfig) -> list[str]:
    """WireGuard devices to ask for peers: literal uplink names, then Netmaker's default."""
    names = [u for u in cfg.bridges.mesh.uplinks if not any(ch in u for ch in "*?[")]
    return [*names, *(["netmaker"] if "netmaker" not in names else [])]


def read_mesh_peers(cfg: HostConfig, interface: str | None = None
                    ) -> tuple[dict[str, Any] | None, str | None]:
    """(peers section, None) or (None, why not). Never raises: peers are optional.

    Only what identifies a peer goes into the plan (public key, allowed IPs):
    endpoints roam, handshakes and byte counters change all the time.
    """
    try:
        from controller import wgpeers
    except Exception as exc:  # being written by someone else, or a missing dependency
        return None, f"controller.wgpeers not usable: {exc}"
    errors = []
    for ifname in [interface] if interface else mesh_interfaces(cfg):
        try:
            reading = wgpeers.read_peers(ifname)
        except Exception as exc:
            errors.append(f"{ifname}: {exc}")
            continue
        peers = sorted(
            ({"public_key": p.public_key, "allowed_ips": sorted(p.allowed_ips)}
             for p in reading.peers),
            key=lambda p: p["public_key"],
        )
        return {"interface": ifname, "peers": peers}, None
    return None, "; ".join(errors) or "no WireGuard interface to read"


# --------------------------------------------------------------------------- check


def load_plan(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PlanError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError([f"{path}:{exc.lineno}: not JSON: {exc.msg}"]) from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError([f"{path}: not a socknet network plan (expected \"format\": "
                         f"\"{PLAN_FORMAT}\"; write one with `socknet plan`)"])
    return data


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(planned: Any, actual: Any, where: str = "") -> list[str]:
    """``where: plan has X, host.yaml gives Y``, one line per differing leaf."""
    if isinstance(planned, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(planned) | set(actual)):
            if not where and key in NOT_COMPARED:
                continue
            sub = f"{where}.{key}" if where else key
            if key not in planned:
                out.append(f"{sub}: missing from the plan, host.yaml gives {_short(actual[key])}")
            elif key not in actual:
                out.append(f"{sub}: the plan has {_short(planned[key])}, host.yaml has nothing")
            else:
                out.extend(differences(planned[key], actual[key], sub))
        return out
    if isinstance(planned, list) and isinstance(actual, list) and len(planned) == len(actual):
        return [d for i, (a, b) in enumerate(zip(planned, actual, strict=True))
                for d in differences(a, b, f"{where}[{i}]")]
    if planned != actual:
        return [f"{where or '(top level)'}: the plan has {_short(planned)}, "
                f"host.yaml gives {_short(actual)}"]
    return []


def check_plan(path: str | Path, expected: dict[str, Any]) -> None:
    """Raise PlanError (one line per difference) unless the plan at ``path`` is ``expected``."""
    planned = load_plan(path)
    diffs = differences(planned, expected)
    if diffs:
        raise PlanError([f"{path}: does not match host.yaml (run `socknet plan` again and "
                         "review the difference)", *(f"{path}: {d}" for d in diffs)])
