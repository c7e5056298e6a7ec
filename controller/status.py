"""`socknet status`: OVSDB view (bridges, ports, roles, controller) + flows per table, the
policy's per-rule counters and the drop counters (both from the switch's flow statistics,
counted by topology.counters as the metrics endpoint does)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from topology.config import HostConfig
from topology.counters import FlowCount, drop_counters, rule_counters
from topology.drops import REASONS_BY_NAME
from topology.model import Owner, cookie_owner
from topology.pipeline import PIPELINES

_COOKIE_RE = re.compile(r"\bcookie=0x(?P<v>[0-9a-f]+)")
_TABLE_RE = re.compile(r"\btable=(?P<v>\d+)")
_PRIORITY_RE = re.compile(r"\bpriority=(?P<v>\d+)")
_PACKETS_RE = re.compile(r"\bn_packets=(?P<v>\d+)")
_BYTES_RE = re.compile(r"\bn_bytes=(?P<v>\d+)")
_RULE_RE = re.compile(r"(?:load:(?P<a>0x[0-9a-f]+|\d+)->NXM_NX_REG2\[\]"
                      r"|set_field:(?P<b>0x[0-9a-f]+|\d+)->reg2\b)")
OFP_DEFAULT_PRIORITY = 32768  # what ovs-ofctl leaves out


def _int(rx: re.Pattern[str], text: str, default: int = 0) -> int:
    m = rx.search(text)
    return int(m.group("v")) if m else default


def parse_dump_flows(text: str) -> list[tuple[int, FlowCount]]:
    """``ovs-ofctl dump-flows`` output -> (cookie, FlowCount) per flow. The match part and
    the actions are read apart: actions may carry their own ``priority=`` (learn)."""
    out = []
    for line in text.splitlines():
        head, _, actions = line.partition(" actions=")
        m = _COOKIE_RE.search(head)
        if m is None:
            continue
        rule = _RULE_RE.search(actions)
        rule_id = int(rule.group("a") or rule.group("b"), 0) if rule else None
        out.append((int(m.group("v"), 16), FlowCount(
            _int(_TABLE_RE, head), _int(_PRIORITY_RE, head, OFP_DEFAULT_PRIORITY),
            _int(_PACKETS_RE, head), _int(_BYTES_RE, head), rule_id)))
    return out


def _ofctl(cfg: HostConfig, *args: str) -> subprocess.CompletedProcess[str] | None:
    ofctl = shutil.which("ovs-ofctl")
    if ofctl is None:
        return None
    return subprocess.run([ofctl, "-O", "OpenFlow14", *args], capture_output=True, text=True,
                          timeout=10)


def mgmt_target(cfg: HostConfig, bridge: str) -> str:
    """The bridge's OpenFlow management socket, next to the OVSDB socket it uses."""
    if cfg.ovsdb.startswith("unix:"):
        candidate = Path(cfg.ovsdb[5:]).parent / f"{bridge}.mgmt"
        if candidate.exists():
            return f"unix:{candidate}"
    return bridge  # ovs-ofctl finds the system instance's socket by bridge name


def read_flows(cfg: HostConfig, bridge: str) -> list[tuple[int, FlowCount]] | str:
    """The bridge's flows with their counters, read with ovs-ofctl over the mgmt socket;
    a string says why they could not be read."""
    res = _ofctl(cfg, "dump-flows", mgmt_target(cfg, bridge))
    if res is None:
        return "ovs-ofctl not installed"
    if res.returncode != 0:
        return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
    return parse_dump_flows(res.stdout)


def flow_counts(flows: list[tuple[int, FlowCount]]) -> dict[str, Any]:
    """Flows per table, learned ones apart, and how many are not socknet's."""
    per_table: Counter[int] = Counter()
    learned: Counter[int] = Counter()
    foreign = 0
    for cookie, f in flows:
        owner = cookie_owner(cookie)
        if owner is Owner.LEARNED:
            learned[f.table] += 1
        else:
            per_table[f.table] += 1
            foreign += owner is None
    return {"tables": dict(sorted(per_table.items())), "learned": dict(sorted(learned.items())),
            "foreign": foreign}


def _rules(policy: Any, counts: list[FlowCount]) -> list[dict[str, Any]]:
    decided = rule_counters(counts)
    out = [{"rule": r.name, "action": r.action, "packets": decided.get(r.rule_id, (0, 0))[0],
            "bytes": decided.get(r.rule_id, (0, 0))[1]} for r in policy.rules]
    out.append({"rule": "default", "action": policy.default,
                "packets": decided.get(0, (0, 0))[0], "bytes": decided.get(0, (0, 0))[1]})
    return out


def collect_status(cfg: HostConfig, policy_path: Path | None = None) -> dict[str, Any]:
    from controller.ovsdb import OvsdbError, OvsdbView, status_data

    try:
        with OvsdbView(cfg.ovsdb) as view:
            view.wait_connected(5.0)
            snap = view.snapshot()
    except (OvsdbError, OSError, TimeoutError) as exc:
        return {"bridges": {}, "problems": [f"cannot read OVSDB at {cfg.ovsdb}: {exc}"]}
    data = status_data(cfg, snap)
    elsewhere = namespace_problem(cfg, snap.ports)
    if elsewhere is not None:
        data["problems"].insert(0, elsewhere)
    policy = None
    if policy_path is not None:
        from topology.policy import PolicyError, load_policy

        try:
            policy = load_policy(policy_path)
        except PolicyError as exc:
            data["problems"].append(f"policy file: {exc.problems[0]}")
    for name, bridge in data["bridges"].items():
        if not bridge.get("present"):
            continue
        flows = read_flows(cfg, name)
        if isinstance(flows, str):
            bridge["flows"] = {"error": flows}
            continue
        bridge["flows"] = flow_counts(flows)
        counts = [f for _, f in flows]
        pipeline = "mesh" if bridge["kind"] == "mesh" else "socket"
        bridge["drops"] = {reason: {"packets": p, "bytes": b}
                           for reason, (p, b) in drop_counters(pipeline, counts).items()}
        if pipeline == "socket" and policy is not None:
            data["rules"] = _rules(policy, counts)
    if elsewhere is None:  # in the wrong namespace every peer would look down: say nothing
        peers = _mesh_peers(cfg, snap.ports.get(cfg.bridges.mesh.name, {}))
        if peers is not None:
            from controller.peersync import status_problems

            data["mesh_peers"] = peers
            data["problems"].extend(status_problems(peers))
    return data


def namespace_problem(cfg: HostConfig, ports: dict[str, dict[str, int]]) -> str | None:
    """OVSDB lists the bridges and their ports, but not one of them is a network device
    here: this process is not in ovs-vswitchd's network namespace, and whatever it reads
    from netlink (mesh peers, addresses) is about another host. None if all is well."""
    from controller import links

    bridges = [b for b in (cfg.bridges.mesh.name, cfg.bridges.socket.name) if b in ports]
    names = [*bridges, *(p for b in bridges for p in ports[b])]
    if not names:
        return None
    try:
        here = links.link_names()
    except (OSError, links.NetlinkError):
        return None
    if here & set(names):
        return None
    shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
    enter = enter_vswitchd_netns(cfg)
    hint = (f"ovs-vswitchd runs elsewhere: {enter} socknet status -c ..." if enter
            else "run socknet status in ovs-vswitchd's network namespace")
    return (f"wrong network namespace: OVSDB at {cfg.ovsdb} lists {shown}, but none of "
            f"them is a network device here ({hint})")


def enter_vswitchd_netns(cfg: HostConfig) -> str | None:
    """The command prefix that enters ovs-vswitchd's network namespace (``ip netns exec
    NAME``, or ``nsenter`` for an unnamed one), from the pid file next to the OVSDB
    socket; None when it cannot be told or it is this process's own."""
    if not cfg.ovsdb.startswith("unix:"):
        return None
    try:
        pid = int((Path(cfg.ovsdb[5:]).parent / "ovs-vswitchd.pid").read_text().strip())
        theirs = os.stat(f"/proc/{pid}/ns/net").st_ino
        if theirs == os.stat("/proc/self/ns/net").st_ino:
            return None
    except (OSError, ValueError):
        return None
    try:
        for entry in Path("/run/netns").iterdir():
            if entry.stat().st_ino == theirs:
                return f"ip netns exec {entry.name}"
    except OSError:
        pass
    return f"nsenter --target {pid} --net"


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
        if b.get("drops"):
            lines.append("  dropped (packets / bytes, from the switch's counters):")
            for reason, d in b["drops"].items():
                what = REASONS_BY_NAME[reason].what if reason in REASONS_BY_NAME else ""
                lines.append(f"    {reason:<16} {d['packets']:>10} {d['bytes']:>12}  {what}")
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
