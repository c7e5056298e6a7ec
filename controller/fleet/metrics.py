"""Prometheus metrics of the fleet database: the fleet as a whole and one host's client.

Pure functions from values to metric families (``fleet_view_metrics``,
``client_metrics``) and two collectors that call them at scrape time. Wiring
them into the running controller (and the Grafana panel) comes with the
controller's fleet integration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.fleet.client import FleetClient, FleetClientStats
from topology.fleet import FleetView

HOST_STATES = ("ok", "behind", "refused", "stale", "unknown")


def fleet_view_metrics(view: FleetView, now_ms: int) -> list[Any]:
    """What ``socknet fleet status`` shows, as metrics (per host and totals)."""
    gen = GaugeMetricFamily("socknet_fleet_policy_generation",
                            "Latest policy generation in the fleet database",
                            value=view.latest_generation)
    states = GaugeMetricFamily("socknet_fleet_hosts", "Hosts by state", labels=["state"])
    count = Counter(h.state for h in view.hosts)
    for state in HOST_STATES:
        states.add_metric([state], count.get(state, 0))
    behind = GaugeMetricFamily("socknet_fleet_hosts_behind",
                               "Live hosts not enforcing the latest generation",
                               value=len(view.behind))
    live = GaugeMetricFamily("socknet_fleet_host_live", "1 if the host's heartbeat is recent",
                             labels=["host"])
    applied = GaugeMetricFamily("socknet_fleet_host_applied_generation",
                                "Policy generation the host enforces", labels=["host"])
    refused = GaugeMetricFamily("socknet_fleet_host_refused_generation",
                                "Latest generation the host refused (0: none)", labels=["host"])
    endpoints = GaugeMetricFamily("socknet_fleet_host_endpoints",
                                  "Endpoints the host publishes", labels=["host"])
    age = GaugeMetricFamily("socknet_fleet_host_last_seen_age_seconds",
                            "Seconds since the host's last heartbeat", labels=["host"])
    info = GaugeMetricFamily("socknet_fleet_host_info", "The host's socknet version",
                             labels=["host", "version"])
    for h in view.hosts:
        live.add_metric([h.name], int(h.live))
        applied.add_metric([h.name], h.applied_generation)
        refused.add_metric([h.name], h.error_generation)
        endpoints.add_metric([h.name], h.endpoints)
        if h.last_seen is not None:
            age.add_metric([h.name], max(0.0, (now_ms - h.last_seen) / 1000))
        info.add_metric([h.name, h.version or ""], 1)
    return [gen, states, behind, live, applied, refused, endpoints, age, info]


def client_metrics(stats: FleetClientStats, remote_endpoints: int,
                   policy_generation: int) -> list[Any]:
    """One host's connection to the fleet database."""
    out: list[Any] = [
        GaugeMetricFamily("socknet_fleet_connected", "1 while connected to a member",
                          value=int(stats.connected)),
        GaugeMetricFamily("socknet_fleet_remote_endpoints",
                          "Other hosts' endpoints in the directory", value=remote_endpoints),
        GaugeMetricFamily("socknet_fleet_policy_generation_seen",
                          "Latest policy generation this host has seen",
                          value=policy_generation),
    ]
    for name, doc, value in (
        ("socknet_fleet_full_syncs", "Whole-directory dumps received", stats.full_syncs),
        ("socknet_fleet_reconnects", "Reconnects to a member", stats.reconnects),
        ("socknet_fleet_endpoint_changes", "Endpoint changes delivered",
         stats.endpoint_changes),
        ("socknet_fleet_heartbeats", "Heartbeats written", stats.heartbeats),
    ):
        out.append(CounterMetricFamily(name, doc, value=value))
    commits = CounterMetricFamily("socknet_fleet_commits", "Transactions by outcome",
                                  labels=["outcome"])
    commits.add_metric(["ok"], stats.commits_ok)
    commits.add_metric(["failed"], stats.commits_failed)
    out.append(commits)
    return out


class FleetViewCollector(Collector):
    """Scrapes ``source()`` (e.g. a FleetAdmin's view; None: database unreachable)."""

    def __init__(self, source: Callable[[], FleetView | None],
                 clock: Callable[[], int]) -> None:
        self.source = source
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        view = self.source()
        up = GaugeMetricFamily("socknet_fleet_database_up",
                               "1 if the fleet database answered", value=int(view is not None))
        yield up
        if view is not None:
            yield from fleet_view_metrics(view, self.clock())


class FleetClientCollector(Collector):
    def __init__(self, client: FleetClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Any]:
        policy = self.client.latest_policy()
        yield from client_metrics(self.client.stats, len(self.client.endpoints()),
                                  policy.generation if policy else 0)
