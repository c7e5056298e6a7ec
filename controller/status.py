"""`socknet status`: OVSDB view (bridges, ports, roles, controller) + flows per table."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from topology.config import HostConfig
from topology.model import Owner, cookie_owner
from topology.pipeline import PIPELINES

_FLOW_RE = re.compile(r"cookie=0x(?P<cookie>[0-9a-f]+).*?table=(?P<table>\d+)")
_STATS_RE = re.compile(r"n_packets=(?P<pkts>\d+), n_bytes=(?P<bytes>\d+)")
_RULE_RE = re.compile(r"load:(?P<id>0x[0-9a-f]+|\d+)->NXM_NX_REG2\[\]")


def _ofctl(cfg: HostConfig, *args: str) -> subprocess.CompletedProcess[str] | None:
    ofctl = shutil.which("ovs-ofctl")
    if ofctl is None:
        return None
    return subprocess.run([ofctl, "-O", "OpenFlow14", *args], capture_output=True, text=True,
                          timeout=10)


def rule_counters(cfg: HostConfig, policy: Any) -> list[dict[str, Any]]:
    """Packets/bytes per policy rule, from the switch's policy_rules flow statistics."""
    t = PIPELINES["socket"].by_name("policy_rules").number
    res = _ofctl(cfg, "dump-flows", mgmt_target(cfg, cfg.bridges.socket.name), f"table={t}")
    if res is None or res.returncode != 0:
        return []
    pkts: Counter[int] = Counter()
    nbytes: Counter[int] = Counter()
    for line in res.stdout.splitlines():
        rule, stats = _RULE_RE.search(line), _STATS_RE.search(line)
        if rule and stats:
            rule_id = int(rule.group("id"), 0)
            pkts[rule_id] += int(stats.group("pkts"))
            nbytes[rule_id] += int(stats.group("bytes"))
    out = []
    for r in policy.rules:
        out.append({"rule": r.name, "action": r.action, "packets": pkts.get(r.rule_id, 0),
                    "bytes": nbytes.get(r.rule_id, 0)})
    out.append({"rule": "default", "action": policy.default, "packets": pkts.get(0, 0),
                "bytes": nbytes.get(0, 0)})
    return out


def mgmt_target(cfg: HostConfig, bridge: str) -> str:
    """The bridge's OpenFlow management socket, next to the OVSDB socket it uses."""
    if cfg.ovsdb.startswith("unix:"):
        candidate = Path(cfg.ovsdb[5:]).parent / f"{bridge}.mgmt"
        if candidate.exists():
            return f"unix:{candidate}"
    return bridge  # ovs-ofctl finds the system instance's socket by bridge name


def flow_counts(cfg: HostConfig, bridge: str) -> dict[str, Any]:
    """Flows per table (and learned ones apart), read with ovs-ofctl over the mgmt socket."""
    res = _ofctl(cfg, "dump-flows", mgmt_target(cfg, bridge))
    if res is None:
        return {"error": "ovs-ofctl not installed"}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    per_table: Counter[int] = Counter()
    learned: Counter[int] = Counter()
    foreign = 0
    for m in _FLOW_RE.finditer(res.stdout):
        cookie, table = int(m.group("cookie"), 16), int(m.group("table"))
        owner = cookie_owner(cookie)
        if owner is Owner.LEARNED:
            learned[table] += 1
        else:
            per_table[table] += 1
            foreign += owner is None
    return {"tables": dict(sorted(per_table.items())), "learned": dict(sorted(learned.items())),
            "foreign": foreign}


def collect_status(cfg: HostConfig, policy_path: Path | None = None) -> dict[str, Any]:
    from controller.ovsdb import OvsdbError, OvsdbView, status_data

    try:
        with OvsdbView(cfg.ovsdb) as view:
            view.wait_connected(5.0)
            snap = view.snapshot()
    except (OvsdbError, OSError, TimeoutError) as exc:
        return {"bridges": {}, "problems": [f"cannot read OVSDB at {cfg.ovsdb}: {exc}"]}
    data = status_data(cfg, snap)
    for name, bridge in data["bridges"].items():
        if bridge.get("present"):
            bridge["flows"] = flow_counts(cfg, name)
    if policy_path is not None:
        from topology.policy import PolicyError, load_policy

        try:
            data["rules"] = rule_counters(cfg, load_policy(policy_path))
        except PolicyError as exc:
            data["problems"].append(f"policy file: {exc.problems[0]}")
    peers = _mesh_peers(cfg, snap.ports.get(cfg.bridges.mesh.name, {}))
    if peers is not None:
        from controller.peersync import status_problems

        data["mesh_peers"] = peers
        data["problems"].extend(status_problems(peers))
    return data


def _mesh_peers(cfg: HostConfig, mesh_ports: dict[str, int]) -> dict[str, Any] | None:
    """The mesh interface's WireGuard peers and their ports; None where there is no such
    interface and socknet does not manage the per-peer ports (nothing to say)."""
    from controller import links, wgpeers
    from controller.peersync import peer_status

    mesh = cfg.bridges.mesh
    if not (mesh.vxlan or links.link_exists(mesh.wg_interface)
            or wgpeers.uapi_socket(mesh.wg_interface, mesh.wg_sock_dir).exists()):
        return None
    return peer_status(cfg, mesh_ports)


def format_status(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, b in data.get("bridges", {}).items():
        if not b.get("present"):
            lines.append(f"bridge {name}: missing")
            continue
        ctrls = ", ".join(
            f"{c['target']} ({'connected' if c['connected'] else 'NOT connected'})"
            for c in b.get("controllers", [])
        ) or "none"
        lines.append(f"bridge {name} ({b.get('kind')}): dpid {b.get('dpid_hex')}, "
                     f"{b.get('datapath_type')}, fail_mode={b.get('fail_mode')}")
        lines.append(f"  controller: {ctrls}")
        for pname, p in sorted(b.get("ports", {}).items(), key=lambda kv: kv[1]["ofport"]):
            vmid = f" (container {p['vmid']})" if p.get("vmid") else ""
            lines.append(f"  port {p['ofport']:>4} {pname:<16} {p['role']}{vmid}")
        flows = b.get("flows", {})
        if "error" in flows:
            lines.append(f"  flows: unavailable: {flows['error']}")
        else:
            pipeline = PIPELINES["mesh" if b.get("kind") == "mesh" else "socket"]
            for t in pipeline.tables:
                n = flows.get("tables", {}).get(t.number, 0)
                learned = flows.get("learned", {}).get(t.number, 0)
                extra = f" (+{learned} learned)" if learned else ""
                lines.append(f"  table {t.number:>3} {t.name:<16} {n:>6} flows{extra}")
            if flows.get("foreign"):
                lines.append(f"  foreign flows (not socknet's): {flows['foreign']}")
    if data.get("rules"):
        lines.append("policy rules (packets / bytes decided, from the switch's counters):")
        for r in data["rules"]:
            lines.append(f"  {r['rule']:<24} {r['action']:<5} {r['packets']:>10} "
                         f"{r['bytes']:>12}")
    if data.get("mesh_peers"):
        from controller.peersync import format_peers

        lines.extend(format_peers(data["mesh_peers"]))
    for problem in data.get("problems", []):
        lines.append(f"problem: {problem}")
    return "\n".join(lines) + "\n"
