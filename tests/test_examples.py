"""The example policies (from the seeds) pass `socknet check`, test both verdicts and
every rule they write, and draw; examples/host.yaml is valid and points at one."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli import main
from topology.config import load_host_config
from topology.graph import dot_available, to_mermaid
from topology.policy import load_policy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
POLICIES = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "host.yaml")


def test_the_seed_examples_are_there():
    assert {p.name for p in POLICIES} >= {"pmoves-tiers.yaml", "production-reference.yaml",
                                          "tailnet-admin.yaml"}


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_example_passes_socknet_check(path: Path):
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    policy = load_policy(path)
    assert f"{len(policy.tests)}/{len(policy.tests)} tests passed" in result.output
    assert "FAIL" not in result.output


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_example_tests_cover_both_verdicts_and_every_rule(path: Path):
    policy = load_policy(path)
    assert {t.expect for t in policy.tests} == {"allow", "deny"}
    named = {t.rule for t in policy.tests}
    written = {r.name for r in policy.rules if not r.implicit}
    assert written <= named, f"rules no test names: {sorted(written - named)}"
    implicit = {r.name for r in policy.rules if r.implicit}
    assert implicit <= named, f"internal tiers no test checks: {sorted(implicit - named)}"


def test_pmoves_tiers_follow_seed_001():
    p = load_policy(EXAMPLES / "pmoves-tiers.yaml")
    assert {name: [str(n) for n in s.nets] for name, s in p.tiers.items()} == {
        "api": ["172.30.1.0/24"], "app": ["172.30.2.0/24"], "bus": ["172.30.3.0/24"],
        "data": ["172.30.4.0/24"], "monitoring": ["172.30.5.0/24"]}
    assert p.internal == {"app", "bus", "data"}
    gateway, worker = "172.30.1.10", "172.30.3.130"
    # only the LLM gateway reaches the internet, and only on 443
    for host in ("172.30.1.11", "172.30.2.1", "172.30.3.1", worker, "172.30.4.1", "172.30.5.1"):
        assert p.verdict(host, "93.184.216.34", "tcp", 443).verdict == "deny", host
    assert p.verdict(gateway, "93.184.216.34", "tcp", 443).verdict == "allow"
    assert p.verdict(gateway, "93.184.216.34", "udp", 443).verdict == "deny"
    # data stores: api and worker services only (and monitoring's metrics scrape)
    for host, verdict in ((gateway, "allow"), ("172.30.1.200", "allow"), (worker, "allow"),
                          ("172.30.3.1", "deny"), ("172.30.2.1", "deny"),
                          ("172.30.5.1", "deny"), ("100.64.0.1", "deny")):
        assert p.verdict(host, "172.30.4.9", "tcp", 5432).verdict == verdict, host
    # monitoring scrapes every tier
    for tier in ("172.30.1.9", "172.30.2.9", "172.30.3.9", "172.30.4.9"):
        assert p.verdict("172.30.5.1", tier, "tcp", 9100).verdict == "allow", tier


def test_production_reference_follows_seed_002():
    p = load_policy(EXAMPLES / "production-reference.yaml")
    internet = "198.51.100.1"
    ip = {"edge": "10.10.10.9", "app": "10.10.20.9", "db": "10.10.30.9", "nas": "10.10.30.200",
          "mgmt": "10.10.99.9"}
    allowed = {("internet", "edge", 443), ("internet", "edge", 80), ("edge", "app", 3000),
               ("edge", "app", 8080), ("app", "db", 5432), ("app", "nas", 2049),
               ("app", "nas", 873), ("db", "nas", 2049), ("db", "nas", 873)}
    names = ["internet", *ip]
    for a in names:
        for b in ip:
            for port in (22, 80, 443, 873, 2049, 3000, 5432, 8006, 8080):
                src = internet if a == "internet" else ip[a]
                want = "allow" if (a, b, port) in allowed else "deny"
                assert p.verdict(src, ip[b], "tcp", port).verdict == want, (a, b, port)
    assert p.verdict("100.100.1.1", ip["mgmt"], "tcp", 22).verdict == "allow"
    assert p.verdict("100.100.1.1", ip["mgmt"], "tcp", 8006).verdict == "allow"
    assert p.verdict("100.100.1.1", ip["app"], "tcp", 22).verdict == "deny"


def test_tailnet_admin_follows_seeds_000_003():
    p = load_policy(EXAMPLES / "tailnet-admin.yaml")
    admin_ports = (22, 4000, 5985, 5986, 8006, 19999)
    for port in admin_ports:
        assert p.verdict("100.64.0.0", "172.31.10.1", "tcp", port).verdict == "allow"
        assert p.verdict("100.127.255.255", "172.31.20.1", "tcp", port).verdict == "allow"
        for outside in ("100.63.255.255", "100.128.0.0", "8.8.8.8", "172.31.10.2"):
            assert p.verdict(outside, "172.31.10.1", "tcp", port).verdict == "deny"
    assert p.verdict("8.8.8.8", "172.31.10.1", "tcp", 443).verdict == "allow"


def test_host_example_points_at_a_valid_policy():
    host = EXAMPLES / "host.yaml"
    result = CliRunner().invoke(main, ["validate", "-c", str(host)])
    assert result.exit_code == 0, result.output
    cfg = load_host_config(host)
    assert cfg.policy == "pmoves-tiers.yaml"
    assert (host.parent / cfg.policy).is_file()
    result = CliRunner().invoke(main, ["flows", "-c", str(host), "--port", "from-mesh=1",
                                       "--port", "veth200i0=2", "--bridge", "vmbr0"])
    assert result.exit_code == 0, result.output
    assert "conjunction(" in result.output and "ct(commit" in result.output


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_example_graphs(path: Path, tmp_path: Path):
    policy = load_policy(path)
    text = to_mermaid(policy)
    assert text.startswith("flowchart LR")
    for rule in policy.rules:
        if not rule.implicit:
            assert f"{rule.name}" in text
    if not dot_available():
        pytest.skip("Graphviz `dot` not installed (make deps)")
    out = tmp_path / "g.svg"
    result = CliRunner().invoke(main, ["graph", str(path), "--format", "svg", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()
