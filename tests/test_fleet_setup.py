"""The fleet database's setup: schema and RBAC data, command lines, host.yaml's fleet
section, the PKI, `socknet fleet ca|cert|init|join|serve`, metrics (no servers)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.core import Metric

from controller.cli import main
from controller.fleet import pki
from controller.fleet.cluster import (
    MemberSpec,
    client_remotes,
    join_cluster_argv,
    member_spec,
    parse_cluster_status,
    server_argv,
    ssl_target,
)
from controller.fleet.metrics import client_metrics, fleet_view_metrics
from controller.fleet.schema import HOST_PERMISSIONS, HOST_ROLE, bootstrap_ops, load_schema
from controller.fleet.tlsstream import remotes_with_identity
from topology.config import ConfigError, parse_host_config
from topology.fleet import HostStatus, fleet_view

needs_ovsdb_tool = pytest.mark.skipif(shutil.which("ovsdb-tool") is None,
                                      reason="ovsdb-tool not installed")
NOW = 1_800_000_000_000


# --------------------------------------------------------------------------- schema


def test_rbac_rules_never_let_a_host_change_an_identity_column_or_the_policy() -> None:
    schema = load_schema()["tables"]
    by_table = {p.table: p for p in HOST_PERMISSIONS}
    assert set(by_table) == {"Host", "Host_Status", "Endpoint"}  # no Policy, no config tables
    for p in HOST_PERMISSIONS:
        assert p.owner not in p.update, p.table
        assert set(p.update) <= set(schema[p.table]["columns"]), p.table
        assert schema[p.table]["columns"][p.owner]["type"] == "string"
    assert "mac" not in by_table["Endpoint"].update  # rows are keyed by (host, mac)


def test_bootstrap_rows_give_the_hosts_listener_the_host_role() -> None:
    ops = bootstrap_ops("pssl:6641")
    conn = next(o for o in ops if o["table"] == "Connection")
    assert conn["row"]["target"] == "pssl:6641" and conn["row"]["role"] == HOST_ROLE
    role = next(o for o in ops if o["table"] == "RBAC_Role")
    assert role["row"]["name"] == HOST_ROLE
    perms = {o["row"]["table"]: o["row"] for o in ops if o["table"] == "RBAC_Permission"}
    assert perms["Endpoint"]["authorization"] == ["set", ["host"]]
    assert perms["Host"]["authorization"] == ["set", ["name"]]


@needs_ovsdb_tool
def test_schema_and_bootstrap_rows_load(tmp_path: Path) -> None:
    from controller.fleet.schema import SCHEMA_PATH, bootstrap_txn

    db = tmp_path / "s.db"
    subprocess.run(["ovsdb-tool", "create", str(db), str(SCHEMA_PATH)], check=True)
    out = subprocess.run(["ovsdb-tool", "transact", str(db), bootstrap_txn("pssl:6641")],
                         check=True, capture_output=True, text=True).stdout
    assert "error" not in out
    assert subprocess.run(["ovsdb-tool", "db-name", str(db)], capture_output=True,
                          text=True).stdout.strip() == "Fleet"


# --------------------------------------------------------------------------- command lines


def _spec(tmp: Path, address: str = "100.100.0.1") -> MemberSpec:
    return MemberSpec(db=tmp / "fleet.db", run_dir=tmp / "run", address=address,
                      raft_port=6643, client_port=6641, key=tmp / "k.pem",
                      cert=tmp / "c.pem", ca_cert=tmp / "ca.pem")


def test_server_argv_listens_for_hosts_with_their_role_and_for_root_on_a_socket(
        tmp_path: Path) -> None:
    argv = server_argv(_spec(tmp_path))
    assert argv[:2] == ["ovsdb-server", str(tmp_path / "fleet.db")]
    assert "--remote=db:Fleet,Fleet_Global,connections" in argv
    assert f"--remote=punix:{tmp_path / 'run' / 'admin.sock'}" in argv
    assert "--ssl-protocols=TLSv1.2" in argv and "--detach" not in argv
    assert f"--ca-cert={tmp_path / 'ca.pem'}" in argv
    assert not any(a.startswith(("--remote=ptcp", "--remote=pssl")) for a in argv)
    assert "--detach" in server_argv(_spec(tmp_path), detach=True)


def test_join_goes_through_the_other_members_and_ipv6_is_bracketed(tmp_path: Path) -> None:
    argv = join_cluster_argv(_spec(tmp_path, "fd00::2"), ["fd00::1", "fd00::2", "fd00::3"])
    assert argv[:5] == ["ovsdb-tool", "join-cluster", str(tmp_path / "fleet.db"), "Fleet",
                        "ssl:[fd00::2]:6643"]
    assert argv[5:] == ["ssl:[fd00::1]:6643", "ssl:[fd00::3]:6643"]
    assert client_remotes(["10.0.0.1", "fd00::1"], 6641) == "ssl:10.0.0.1:6641,ssl:[fd00::1]:6641"
    assert ssl_target("10.0.0.1", 1, "pssl") == "pssl:10.0.0.1:1"


def test_parse_cluster_status() -> None:
    text = ("ac72\nName: Fleet\nCluster ID: ac72 (ac72...)\nStatus: cluster member\n"
            "Role: leader\nTerm: 3\nLeader: self\nServers:\n    a417 (a417 at ssl:x:6643)\n")
    st = parse_cluster_status(text)
    assert st["role"] == "leader" and st["status"] == "cluster member" and st["term"] == "3"


# --------------------------------------------------------------------------- host.yaml


FLEET_YAML = """\
host: {host}
bridges: {{mesh: {{}}, socket: {{}}}}
fleet:
  members: [{members}]
  tls: {{key: {d}/k.pem, cert: {d}/c.pem, ca_cert: {d}/ca-cert.pem}}
{member}"""


def _cfg(d: Path, host: str = "pve1", members: str = "10.9.0.1, 10.9.0.2, 10.9.0.3",
         member: str = "") -> str:
    return FLEET_YAML.format(host=host, members=members, d=d, member=member)


def test_fleet_config(tmp_path: Path) -> None:
    cfg = parse_host_config(_cfg(tmp_path, member="  member: {address: 10.9.0.2}\n"))
    assert cfg.fleet is not None and cfg.fleet.member is not None
    spec = member_spec(cfg.fleet)
    assert spec.raft_local == "ssl:10.9.0.2:6643"
    assert spec.admin_remote == "unix:/run/socknet-fleet/admin.sock"
    assert parse_host_config("bridges: {mesh: {}, socket: {}}\n").fleet is None


@pytest.mark.parametrize("text, why", [
    ({"members": "10.9.0.1, 10.9.0.2, 10.9.0.3, 10.9.0.4"}, "3 or 5"),
    ({"members": "10.9.0.1, 10.9.0.1, 10.9.0.3"}, "twice"),
    ({"member": "  member: {address: 10.9.0.7}\n"}, "not one of members"),
    ({"host": "not a name"}, "host name"),
])
def test_fleet_config_refuses(tmp_path: Path, text: dict[str, str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_host_config(_cfg(tmp_path, **text))


def test_fleet_config_needs_an_explicit_host_name(tmp_path: Path) -> None:
    text = "\n".join(line for line in _cfg(tmp_path).splitlines() if not line.startswith("host:"))
    with pytest.raises(ConfigError, match="needs host"):
        parse_host_config(text)


# --------------------------------------------------------------------------- PKI


def test_ca_and_host_certificate(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca")
    files = pki.issue_cert(tmp_path / "ca", "pve1", pki.host_files(tmp_path / "out", "pve1"),
                           addresses=("100.100.0.1",))
    assert pki.cert_common_name(files.cert) == "pve1"
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca.key).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    pub = ca_cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["100.100.0.1"]
    assert files.ca_cert.read_bytes() == ca.cert.read_bytes()
    with pytest.raises(pki.PkiError, match="exists"):
        pki.issue_cert(tmp_path / "ca", "pve1", pki.host_files(tmp_path / "out", "pve1"))
    with pytest.raises(pki.PkiError, match="exists"):
        pki.create_ca(tmp_path / "ca")


def test_certificate_names_must_be_host_names(tmp_path: Path) -> None:
    from topology.fleet import FleetRecordError

    pki.create_ca(tmp_path / "ca")
    with pytest.raises(FleetRecordError):
        pki.issue_cert(tmp_path / "ca", "", pki.host_files(tmp_path, "x"))


# --------------------------------------------------------------------------- CLI


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@needs_ovsdb_tool
def test_cli_ca_cert_init_join(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert _run("fleet", "ca", "--dir", str(ca_dir)).exit_code == 0
    res = _run("fleet", "cert", "pve2", "--ca-dir", str(ca_dir), "--out", str(tmp_path / "p2"),
               "--address", "10.9.0.2")
    assert res.exit_code == 0, res.output
    assert _run("fleet", "cert", "bad/name", "--ca-dir", str(ca_dir), "--out",
                str(tmp_path)).exit_code == 2
    for n in (1, 2):
        d = tmp_path / f"h{n}"
        member = f"  member: {{address: 10.9.0.{n}, db: {d}/db/fleet.db, run_dir: {d}/run}}\n"
        (tmp_path / f"host{n}.yaml").write_text(
            _cfg(d, host=f"pve{n}", member=member).replace(f"{d}/ca-cert.pem",
                                                          f"{d}/ca-cert.pem"))
    res = _run("fleet", "init", "-c", str(tmp_path / "host1.yaml"), "--ca-dir", str(ca_dir))
    assert res.exit_code == 0, res.output
    db1 = tmp_path / "h1" / "db" / "fleet.db"
    assert pki.cert_common_name(tmp_path / "h1" / "c.pem") == "pve1"
    tool = subprocess.run(["ovsdb-tool", "db-is-clustered", str(db1)])
    assert tool.returncode == 0
    addr = subprocess.run(["ovsdb-tool", "db-local-address", str(db1)], capture_output=True,
                          text=True).stdout.strip()
    assert addr == "ssl:10.9.0.1:6643"
    assert not (tmp_path / "h1" / "db" / "fleet.db.seed").exists()
    res = _run("fleet", "init", "-c", str(tmp_path / "host1.yaml"))
    assert res.exit_code == 1 and "already is a member" in res.output

    res = _run("fleet", "join", "-c", str(tmp_path / "host2.yaml"), "--ca-dir", str(ca_dir))
    assert res.exit_code == 0, res.output
    db2 = tmp_path / "h2" / "db" / "fleet.db"
    out = subprocess.run(["ovsdb-tool", "show-log", str(db2)], capture_output=True,
                         text=True).stdout
    assert "ssl:10.9.0.2:6643" in out and "ssl:10.9.0.1:6643" in out


def test_cli_serve_execs_the_member_server(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path
    (d / "host.yaml").write_text(_cfg(d, member=f"  member: {{address: 10.9.0.1, db: "
                                                f"{d}/fleet.db, run_dir: {d}/run}}\n"))
    res = _run("fleet", "serve", "-c", str(d / "host.yaml"))
    assert res.exit_code == 2 and "no database" in res.output
    (d / "fleet.db").write_text("")
    called: list[list[str]] = []
    monkeypatch.setattr(os, "execvp", lambda f, argv: called.append(argv))
    assert _run("fleet", "serve", "-c", str(d / "host.yaml")).exit_code == 0
    assert called and called[0][:2] == ["ovsdb-server", str(d / "fleet.db")]
    assert "-vconsole:info" in called[0]


def test_cli_serve_refuses_a_host_that_is_no_member(tmp_path: Path) -> None:
    (tmp_path / "host.yaml").write_text(_cfg(tmp_path))
    res = _run("fleet", "serve", "-c", str(tmp_path / "host.yaml"))
    assert res.exit_code == 2 and "no fleet database member" in res.output


def test_cli_push_refuses_a_policy_whose_tests_fail_before_connecting(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("tiers: {a: {cidrs: [10.1.0.0/24]}, b: {cidrs: [10.2.0.0/24]}}\n"
                 "policy: {default: deny, rules: []}\n"
                 "tests: [{from: 10.1.0.1, to: 10.2.0.1, tcp: 80, expect: allow}]\n")
    res = _run("policy", "push", str(p), "--db", f"unix:{tmp_path}/nothing.sock")
    assert res.exit_code == 1 and "not pushed" in res.output
    p.write_text("tiers: [\n")
    assert _run("policy", "push", str(p), "--db", "unix:/x").exit_code == 2


# --------------------------------------------------------------------------- TLS, metrics


def test_remotes_with_identity_rewrites_only_ssl(tmp_path: Path) -> None:
    for name in ("k", "c", "ca"):
        (tmp_path / name).write_text("x")
    out = remotes_with_identity("ssl:10.0.0.1:6641,unix:/x,ssl:[fd00::1]:6641",
                                tmp_path / "k", tmp_path / "c", tmp_path / "ca")
    parts = out.split(",")
    scheme = parts[0].split(":")[0]
    assert scheme.startswith("sslid") and parts[1] == "unix:/x"
    assert parts == [f"{scheme}:10.0.0.1:6641", "unix:/x", f"{scheme}:[fd00::1]:6641"]
    again = remotes_with_identity("ssl:a:1", tmp_path / "k", tmp_path / "c", tmp_path / "ca")
    assert again == f"{scheme}:a:1"  # one scheme per identity


def _samples(families: list[Metric]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.name, tuple(sorted(s.labels.values()))): s.value
            for f in families for s in f.samples}


def test_fleet_metrics() -> None:
    live = {"last_seen": NOW - 1000, "heartbeat_interval": 1000}
    view = fleet_view([], [HostStatus("a", applied_generation=3, **live),  # type: ignore[arg-type]
                           HostStatus("b", applied_generation=2, **live)],  # type: ignore[arg-type]
                      {"a": 4}, 3, NOW)
    s = _samples(fleet_view_metrics(view, NOW))
    assert s[("socknet_fleet_policy_generation", ())] == 3
    assert s[("socknet_fleet_hosts_behind", ())] == 1
    assert s[("socknet_fleet_hosts", ("ok",))] == 1 and s[("socknet_fleet_hosts", ("behind",))] == 1
    assert s[("socknet_fleet_host_applied_generation", ("b",))] == 2
    assert s[("socknet_fleet_host_endpoints", ("a",))] == 4
    assert s[("socknet_fleet_host_last_seen_age_seconds", ("a",))] == 1.0


def test_client_metrics() -> None:
    from controller.fleet.client import FleetClientStats

    st = FleetClientStats(connected=True, full_syncs=1, reconnects=2, commits_ok=5,
                          commits_failed=1)
    s = _samples(client_metrics(st, 12, 7))
    assert s[("socknet_fleet_connected", ())] == 1
    assert s[("socknet_fleet_full_syncs_total", ())] == 1
    assert s[("socknet_fleet_reconnects_total", ())] == 2
    assert s[("socknet_fleet_commits_total", ("failed",))] == 1
    assert s[("socknet_fleet_remote_endpoints", ())] == 12


# --------------------------------------------------------------------------- systemd


UNIT = Path(__file__).resolve().parent.parent / "deploy" / "socknet-fleet-db.service"


def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_fleet_unit_matches_the_member_defaults() -> None:
    from topology.config import FleetMemberCfg

    u = _unit(UNIT)
    assert u["ExecStart"] == ["/usr/local/bin/socknet fleet serve -c /etc/socknet/host.yaml"]
    assert u["RestartPreventExitStatus"] == ["2"] and u["Restart"] == ["always"]
    assert u["CapabilityBoundingSet"] == [""]
    defaults = FleetMemberCfg(address="10.0.0.1")
    assert f"/run/{u['RuntimeDirectory'][0]}" == defaults.run_dir
    assert f"/var/lib/{u['StateDirectory'][0]}" == str(Path(defaults.db).parent)
    assert set(u["ReadWritePaths"][0].split()) == {str(Path(defaults.db).parent),
                                                   defaults.run_dir}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_fleet_unit_verifies(tmp_path: Path) -> None:
    import sys

    socknet = shutil.which("socknet", path=str(Path(sys.executable).parent)) or "/bin/true"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/socknet", socknet))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stderr
