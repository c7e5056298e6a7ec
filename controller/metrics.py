"""Prometheus metrics (prometheus-client), read from the running controller at scrape time.

Per-rule and per-drop-reason counters come from the switch's own flow statistics
(topology.counters): the packets and bytes of the policy_rules flows of each rule
(their reg2 load names the rule) and of the drop flows of each reason (topology.drops).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller import encode
from controller.logs import get_logger
from controller.runtime import Controller
from controller.switch import SwitchError
from topology.counters import FlowCount, drop_counters, rule_counters
from topology.model import LEARNED_COOKIE, OWNED_COOKIE_MASK
from topology.pipeline import REG_RULE, SOCKET_PIPELINE

log = get_logger("socknet.metrics")


def flow_counts(flows: list[Any]) -> list[FlowCount]:
    """The switch's flow statistics (os-ken) as `FlowCount` values, the form
    topology.counters counts from (`socknet status` makes the same from ovs-ofctl)."""
    rules = SOCKET_PIPELINE["policy_rules"]
    return [FlowCount(f.table, f.priority, f.packets, f.bytes,
                      encode.loaded_value(f.flow_stats, REG_RULE) if f.table == rules else None)
            for f in flows]


def drop_metrics() -> tuple[CounterMetricFamily, CounterMetricFamily]:
    return (CounterMetricFamily("socknet_dropped_packets",
                                "Packets dropped, by bridge and reason (switch flow statistics)",
                                labels=["bridge", "reason"]),
            CounterMetricFamily("socknet_dropped_bytes",
                                "Bytes dropped, by bridge and reason (switch flow statistics)",
                                labels=["bridge", "reason"]))


def add_drop_counters(families: tuple[CounterMetricFamily, CounterMetricFamily], bridge: str,
                      pipeline: str, counts: list[FlowCount]) -> None:
    pkts, nbytes = families
    for reason, (p, b) in drop_counters(pipeline, counts).items():
        pkts.add_metric([bridge, reason], p)
        nbytes.add_metric([bridge, reason], b)


class ControllerCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Any]:
        c = self.controller
        s = c.stats
        simple = [
            ("socknet_flow_mods_total", "Flow-mods sent", s.flow_mods),
            ("socknet_bundles_total", "OpenFlow bundles committed", s.bundles),
            ("socknet_reconciles_total", "Reconcile passes", s.reconciles),
            ("socknet_noop_reconciles_total", "Reconcile passes that sent nothing",
             s.noop_reconciles),
            ("socknet_errors_total", "Reconcile errors", s.errors),
            ("socknet_port_events_total", "OVSDB changes handled", s.port_events),
            ("socknet_packet_ins_total", "Packet-ins received", s.packet_ins),
            ("socknet_denied_logged_total", "Denied packets logged (rate-limited by meter)",
             s.denied_logged),
            ("socknet_remote_hosts_learned_total",
             "Remote hosts learned or moved (mesh ARP); every one counted, logs rate-limited",
             s.remote_learned),
            ("socknet_dropped_logged_total",
             "Dropped packets logged as `dropped` events (copies rate-limited by a meter)",
             s.dropped_logged),
        ]
        for name, doc, value in simple:
            yield CounterMetricFamily(name.removesuffix("_total"), doc, value=value)
        reloads = CounterMetricFamily("socknet_policy_reloads", "Policy reloads by outcome",
                                      labels=["outcome"])
        reloads.add_metric(["ok"], s.reloads_ok)
        reloads.add_metric(["refused"], s.reloads_refused)
        yield reloads
        yield GaugeMetricFamily("socknet_policy_generation", "Policy generation in force",
                                value=s.policy_generation)
        yield GaugeMetricFamily("socknet_policy_reload_check_seconds",
                                "Parse+validate+test time of the last accepted reload",
                                value=s.last_reload_ms / 1000)
        yield GaugeMetricFamily("socknet_learned_bindings", "Container addresses learned",
                                value=len(c.bindings))
        refused = CounterMetricFamily(
            "socknet_bindings_refused",
            "Learned container addresses refused, by kind (duplicate: another container's; "
            "policy-named: a tier/external/rule address; not-declared: differs from the "
            "declaration; invalid; refused: the declaration itself was refused)",
            labels=["kind"])
        for kind in ("duplicate", "policy-named", "not-declared", "invalid", "refused"):
            refused.add_metric([kind], s.bindings_refused.get(kind, 0))
        yield refused
        declared = c.declared
        yield GaugeMetricFamily("socknet_declared_interfaces",
                                "Guest interfaces with declared addresses (Proxmox, host.yaml)",
                                value=len(declared.nics))
        yield GaugeMetricFamily("socknet_address_conflicts",
                                "MACs/IPs declared for more than one interface (refused to all)",
                                value=len(declared.conflicts))
        yield GaugeMetricFamily("socknet_remote_hosts", "Remote hosts learned across the mesh",
                                value=len(c.remote))
        yield GaugeMetricFamily("socknet_mesh_peers_up",
                                "Mesh uplink ports (one per live peer with vxlan: true)",
                                value=c.mesh_uplinks())
        connected = GaugeMetricFamily("socknet_switch_connected", "Switch connected",
                                      labels=["bridge"])
        tables = GaugeMetricFamily("socknet_flows", "Flows installed per table",
                                   labels=["bridge", "table", "owner"])
        rules_pkts = CounterMetricFamily("socknet_rule_packets", "Packets decided per rule",
                                         labels=["rule", "action"])
        rules_bytes = CounterMetricFamily("socknet_rule_bytes", "Bytes decided per rule",
                                          labels=["rule", "action"])
        drops = drop_metrics()
        for bridge, pipeline in ((c.cfg.bridges.mesh.name, "mesh"),
                                 (c.cfg.bridges.socket.name, "socket")):
            session = c.session_for(bridge)
            connected.add_metric([bridge], 1 if session is not None else 0)
            if session is None:
                continue
            try:
                flows = session.flows()
            except SwitchError as exc:
                log.warning("metrics_flow_stats_failed", bridge=bridge, error=str(exc))
                continue
            per: Counter[tuple[int, str]] = Counter()
            for f in flows:
                learned = (f.cookie & OWNED_COOKIE_MASK) == LEARNED_COOKIE
                per[(f.table, "learned" if learned else "socknet")] += 1
            for (table, owner), n in sorted(per.items()):
                tables.add_metric([bridge, str(table), owner], n)
            counts = flow_counts(flows)
            add_drop_counters(drops, bridge, pipeline, counts)
            if bridge == c.cfg.bridges.socket.name and c.policy is not None:
                for rule_id, (pkts, nbytes) in rule_counters(counts).items():
                    rule = c.policy.rule_by_id(rule_id)
                    name = rule.name if rule else "default"
                    action = rule.action if rule else c.policy.default
                    rules_pkts.add_metric([name, action], pkts)
                    rules_bytes.add_metric([name, action], nbytes)
        yield connected
        yield tables
        yield rules_pkts
        yield rules_bytes
        yield from drops


def serve_metrics(controller: Controller, host: str, port: int) -> None:
    REGISTRY.register(ControllerCollector(controller))
    start_http_server(port, addr=host)
    log.info("metrics_listening", address=f"{host}:{port}")
