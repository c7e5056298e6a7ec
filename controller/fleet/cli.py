"""``socknet fleet ...`` and ``socknet policy push``. Exit status: 0 ok, 1 failed, 2 bad input.

Registered on the main command group by controller/cli.py. Heavy imports (the
IDL, cryptography) happen inside the commands.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml

from topology.config import ConfigError, FleetCfg, HostConfig, load_host_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _fail(lines: list[str], code: int) -> NoReturn:
    for line in lines:
        click.echo(f"socknet: {line}", err=True)
    sys.exit(code)


def _directory(path: str) -> Path:
    """A directory argument: exit 2 if it names something else."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        _fail([f"{path} is not a directory"], EXIT_BAD_INPUT)
    return p


def _fleet_cfg(config_path: str) -> tuple[HostConfig, FleetCfg]:
    try:
        cfg = load_host_config(config_path)
    except ConfigError as exc:
        _fail(exc.problems, EXIT_BAD_INPUT)
    if cfg.fleet is None:
        _fail([f"{config_path}: no fleet: section (see docs/fleet.md)"], EXIT_BAD_INPUT)
    return cfg, cfg.fleet


def _member_spec(fleet_cfg: FleetCfg) -> Any:
    from controller.fleet.cluster import FleetClusterError, member_spec

    try:
        return member_spec(fleet_cfg)
    except FleetClusterError as exc:
        _fail([str(exc)], EXIT_BAD_INPUT)


def _admin_target(config_path: str | None, db: str | None
                  ) -> tuple[str, tuple[Path, Path, Path] | None]:
    """Where ``status``/``push`` connect: ``--db``, else this member's admin socket, else
    the members over TLS with this host's certificate (reads only: RBAC refuses a
    host's policy writes)."""
    if config_path is None:
        if db is None:
            _fail(["give -c host.yaml or --db REMOTE"], EXIT_BAD_INPUT)
        if db.startswith("ssl:"):
            _fail(["--db ssl:... needs -c host.yaml (its fleet.tls certificate)"],
                  EXIT_BAD_INPUT)
        return db, None
    from controller.fleet.cluster import client_remotes

    _, fleet_cfg = _fleet_cfg(config_path)
    tls = (Path(fleet_cfg.tls.key), Path(fleet_cfg.tls.cert), Path(fleet_cfg.tls.ca_cert))
    if db is not None:
        return db, tls if db.startswith("ssl:") else None
    if fleet_cfg.member is not None:
        return _member_spec(fleet_cfg).admin_remote, None
    return client_remotes(fleet_cfg.members, fleet_cfg.client_port), tls


def _connect(remote: str, tls: tuple[Path, Path, Path] | None, timeout: float) -> Any:
    from controller.fleet.admin import FleetAdmin, FleetAdminError

    try:
        return FleetAdmin(remote, tls=tls).connect(timeout)
    except (FleetAdminError, FileNotFoundError) as exc:
        _fail([str(exc)], EXIT_FAILED)


_config = click.option("-c", "--config", "config_path", type=click.Path(),
                       help="host.yaml with a fleet: section")
_db = click.option("--db", help="fleet database remote (default from host.yaml: this member's "
                   "admin socket, or the members over TLS)")


@click.group("fleet")
def fleet() -> None:
    """The fleet database: a Raft cluster of ovsdb-server members (docs/fleet.md)."""


@fleet.command("ca")
@click.option("--dir", "ca_dir", required=True, type=click.Path(),
              help="directory for ca-key.pem and ca-cert.pem (keep the key offline)")
@click.option("--name", default="socknet fleet CA", show_default=True)
def ca(ca_dir: str, name: str) -> None:
    """Create the fleet CA."""
    from controller.fleet.pki import PkiError, create_ca

    try:
        files = create_ca(_directory(ca_dir), name)
    except (PkiError, OSError) as exc:
        _fail([str(exc)], EXIT_FAILED)
    click.echo(f"wrote {files.key} (keep it secret) and {files.cert}")


@fleet.command("cert")
@click.argument("host")
@click.option("--ca-dir", required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path())
@click.option("--address", "addresses", multiple=True, help="the host's mesh address (repeat)")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650),
              help="validity (there is no revocation: shorter is safer)")
@click.option("--force", is_flag=True, help="replace an existing key and certificate")
def cert(host: str, ca_dir: str, out_dir: str, addresses: tuple[str, ...], days: int,
         force: bool) -> None:
    """Issue HOST's key and certificate (CN = HOST: its identity in the database)."""
    from controller.fleet.pki import PkiError, host_files, issue_cert
    from topology.fleet import FleetRecordError

    try:
        files = issue_cert(_directory(ca_dir), host, host_files(_directory(out_dir), host),
                           addresses=addresses, days=days, force=force)
    except (FleetRecordError, ValueError) as exc:
        _fail([str(exc)], EXIT_BAD_INPUT)
    except (PkiError, OSError) as exc:
        _fail([str(exc)], EXIT_FAILED)
    click.echo(f"wrote {files.key}, {files.cert}, {files.ca_cert}")


def _ensure_cert(cfg: HostConfig, fleet_cfg: FleetCfg, ca_dir: str | None) -> None:
    from controller.fleet.pki import CertFiles, PkiError, issue_cert

    tls = fleet_cfg.tls
    if Path(tls.cert).exists() or ca_dir is None:
        return
    files = CertFiles(Path(tls.key), Path(tls.cert), Path(tls.ca_cert))
    try:
        issue_cert(Path(ca_dir), cfg.host, files,
                   addresses=(fleet_cfg.member.address,) if fleet_cfg.member else ())
    except (PkiError, OSError) as exc:
        _fail([str(exc)], EXIT_FAILED)
    click.echo(f"issued {files.cert} (CN={cfg.host})")


@fleet.command("init")
@click.option("-c", "--config", "config_path", required=True, type=click.Path())
@click.option("--ca-dir", type=click.Path(),
              help="issue this host's certificate from this CA if fleet.tls.cert is missing")
def init(config_path: str, ca_dir: str | None) -> None:
    """Create the fleet database cluster with this host as its first member."""
    from controller.fleet.cluster import FleetClusterError, init_member

    cfg, fleet_cfg = _fleet_cfg(config_path)
    spec = _member_spec(fleet_cfg)
    _ensure_cert(cfg, fleet_cfg, ca_dir)
    try:
        init_member(spec)
    except FleetClusterError as exc:
        _fail([str(exc)], EXIT_FAILED)
    click.echo(f"created {spec.db}: cluster of 1 ({spec.raft_local}); start it "
               "(systemctl enable --now socknet-fleet-db), then on each other member: "
               "socknet fleet join -c host.yaml")


@fleet.command("join")
@click.option("-c", "--config", "config_path", required=True, type=click.Path())
@click.option("--ca-dir", type=click.Path(),
              help="issue this host's certificate from this CA if fleet.tls.cert is missing")
def join(config_path: str, ca_dir: str | None) -> None:
    """Join this member to the cluster (completes when its server reaches a member)."""
    from controller.fleet.cluster import FleetClusterError, join_member

    cfg, fleet_cfg = _fleet_cfg(config_path)
    spec = _member_spec(fleet_cfg)
    _ensure_cert(cfg, fleet_cfg, ca_dir)
    try:
        join_member(spec, fleet_cfg.members)
    except FleetClusterError as exc:
        _fail([str(exc)], EXIT_FAILED)
    click.echo(f"created {spec.db}: joining through the other members; start it "
               "(systemctl enable --now socknet-fleet-db)")


@fleet.command("serve")
@click.option("-c", "--config", "config_path", required=True, type=click.Path())
def serve(config_path: str) -> None:
    """Run this member's ovsdb-server in the foreground (systemd: socknet-fleet-db)."""
    from controller.fleet.cluster import FleetClusterError, exec_server

    _, fleet_cfg = _fleet_cfg(config_path)
    spec = _member_spec(fleet_cfg)
    if not spec.db.exists():  # not set up: a restart would not help (exit 2)
        _fail([f"{spec.db}: no database (run `socknet fleet init` on the first member, "
               "`socknet fleet join` on the others)"], EXIT_BAD_INPUT)
    try:
        exec_server(spec)
    except (FleetClusterError, OSError) as exc:
        _fail([str(exc)], EXIT_FAILED)


@fleet.command("status")
@_config
@_db
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.option("--timeout", default=10.0, show_default=True, help="seconds to reach the database")
def status(config_path: str | None, db: str | None, as_json: bool, timeout: float) -> None:
    """Per host: live, last seen, policy generation applied (or refused), endpoints,
    version. Exit 1 when a live host is behind the latest generation."""
    from controller.fleet.admin import format_view
    from controller.fleet.client import now_ms

    remote, tls = _admin_target(config_path, db)
    with _connect(remote, tls, timeout) as admin:
        now = now_ms()
        view = admin.view(now)
    if as_json:
        click.echo(json.dumps({"latest_generation": view.latest_generation,
                               "hosts": [h.as_dict(now) for h in view.hosts],
                               "behind": [h.name for h in view.behind]}, indent=2))
    else:
        click.echo(format_view(view, now), nl=False)
    sys.exit(EXIT_FAILED if view.behind else EXIT_OK)


@click.group("policy")
def policy() -> None:
    """The fleet's policy (docs/fleet.md)."""


@policy.command("push")
@click.argument("policy_file", type=click.Path())
@_config
@_db
@click.option("--wait", is_flag=True,
              help="block until every live host applied it (exit 1 naming the hosts that "
                   "refused it or did not answer)")
@click.option("--timeout", default=30.0, show_default=True,
              help="seconds to wait for the hosts (and to reach the database)")
@click.option("--by", "pushed_by", help="who pushes (default user@host)")
def push(policy_file: str, config_path: str | None, db: str | None, wait: bool,
         timeout: float, pushed_by: str | None) -> None:
    """Check POLICY_FILE and run its tests (as `socknet check`), then write it as the
    fleet's next policy generation."""
    from controller.fleet.admin import FleetAdminError
    from topology.check import failing_tests
    from topology.policy import PolicyError, parse_policy
    from topology.yamlpos import read_config, yaml_problem

    try:
        text = read_config(policy_file)  # as `socknet check` reads it: within the limits
    except OSError as exc:
        _fail([f"{policy_file}: cannot read: {exc.strerror}"], EXIT_BAD_INPUT)
    except yaml.YAMLError as exc:
        _fail([yaml_problem(policy_file, exc)], EXIT_BAD_INPUT)
    try:
        parsed = parse_policy(text, policy_file)
    except PolicyError as exc:
        _fail(exc.problems, EXIT_BAD_INPUT)
    failures = failing_tests(parsed)
    if failures:
        _fail([f"test failed: {f}" for f in failures] + ["not pushed"], EXIT_FAILED)
    remote, tls = _admin_target(config_path, db)
    who = pushed_by or f"{getpass.getuser()}@{socket.gethostname()}"
    with _connect(remote, tls, timeout) as admin:
        live = [h.name for h in admin.view().hosts if h.live]
        try:
            result = admin.push(text, who, timeout)
        except FleetAdminError as exc:
            _fail([str(exc)], EXIT_FAILED)
        what = "pushed as" if result.new else "already the latest:"
        click.echo(f"{policy_file}: {what} generation {result.generation} "
                   f"({len(parsed.rules)} rules, {len(parsed.tests)} tests passed)")
        if not wait:
            return
        if not live:
            click.echo("no live host to wait for")
            return
        state = admin.wait(result.generation, live, timeout)
    for name in state.applied:
        click.echo(f"{name}: applied")
    for name, error in state.refused:
        click.echo(f"{name}: refused: {error}")
    for name in state.pending:
        click.echo(f"{name}: no answer within {timeout:g}s")
    if not state.ok:
        bad = [f"{n} (refused)" for n, _ in state.refused] + \
              [f"{n} (no answer)" for n in state.pending]
        _fail([f"generation {result.generation} not applied by: {', '.join(bad)}"],
              EXIT_FAILED)
    click.echo(f"generation {result.generation} applied by all {len(state.applied)} live hosts")
