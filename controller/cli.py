"""The `socknet` command. Exit status: 0 ok, 1 check failed, 2 bad input."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from topology.addresses import Declarations
from topology.config import ConfigError, HostConfig, load_host_config
from topology.policy import Policy, PolicyError, load_policy
from topology.roles import Role, classify_port, configured_ports, no_role_reason

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _fail(lines: list[str], code: int) -> None:
    for line in lines:
        click.echo(f"socknet: {line}", err=True)
    sys.exit(code)


def _load(path: str) -> HostConfig:
    try:
        return load_host_config(path)
    except ConfigError as exc:
        _fail(exc.problems, EXIT_BAD_INPUT)
        raise  # unreachable


def _config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("-c", "--config", "config_path", required=True, type=click.Path(),
                  help="host.yaml of this Proxmox host")
    @wraps(f)
    def wrapper(config_path: str, **kw: Any) -> Any:
        cfg = _load(config_path)
        click.get_current_context().meta["config_path"] = Path(config_path)
        return f(cfg, **kw)

    return wrapper


def _policy_path(cfg: HostConfig) -> Path | None:
    """host.yaml's `policy:`, relative to host.yaml itself."""
    if cfg.policy is None:
        return None
    base = click.get_current_context().meta["config_path"].parent
    return (base / cfg.policy).resolve()


def _load_policy(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        _fail(exc.problems, EXIT_BAD_INPUT)
        raise  # unreachable


def _version() -> str:
    """The installed distribution's version; a checkout run without installing has none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("socknet")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="socknet", message="%(prog)s %(version)s")
def main() -> None:
    """socknet: OpenFlow controller for the mesh and vmbr0 bridges."""


@main.command()
@_config_option
def validate(cfg: HostConfig) -> None:
    """Check host.yaml and exit (2 with file:line: field: reason if invalid)."""
    from controller.tls import exposure_warnings

    path = _policy_path(cfg)
    if path is not None:
        _load_policy(path)  # the policy host.yaml names must parse too
    for warning in exposure_warnings(cfg):
        click.echo(f"socknet: warning: {warning}", err=True)
    click.echo(f"ok: {cfg.host}: bridges {cfg.bridges.mesh.name}, {cfg.bridges.socket.name}")


_IFNAME = re.compile(r"[^\s/:]{1,15}")  # what Linux accepts as an interface name


def _port_problem(cfg: HostConfig, bridge: str, name: str) -> str | None:
    """Why ``name`` cannot be a port of ``bridge`` at all (exit 2), or None."""
    if not _IFNAME.fullmatch(name):
        return f"{name!r} cannot be an interface name (1-15 characters, no spaces, / or :)"
    if name in (cfg.bridges.mesh.name, cfg.bridges.socket.name):
        return f"{name} is a bridge of this host, not a port"
    for other, named in configured_ports(cfg).items():
        if other != bridge and name in named:
            return f"{name} is a port of {other} (host.yaml {named[name]}), not of {bridge}"
    return None


def _parse_ports(cfg: HostConfig, specs: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """NAME=OFPORT or BRIDGE:NAME=OFPORT; a bare name goes to the bridge where it has a role.
    A name that cannot be a port of its bridge is refused; one without a role is warned
    about (it gets no flows: its packets are dropped)."""
    mesh, sock = cfg.bridges.mesh.name, cfg.bridges.socket.name
    ports: dict[str, dict[str, int]] = {mesh: {}, sock: {}}
    problems, warnings = [], []
    for spec in specs:
        left, sep, num = spec.partition("=")
        bridge, _, name = left.rpartition(":")
        if not sep or not name or not num.isdigit() or not 0 < int(num) < 0xFF00:
            problems.append(f"--port {spec!r}: expected NAME=OFPORT (OFPORT 1-65279)")
            continue
        if not bridge:
            bridge = mesh if classify_port(cfg, mesh, name).role is not Role.UNKNOWN else sock
        if bridge not in ports:
            problems.append(f"--port {spec!r}: unknown bridge {bridge!r}")
            continue
        problem = _port_problem(cfg, bridge, name)
        if problem is not None:
            problems.append(f"--port {spec!r}: {problem}")
            continue
        if int(num) in ports[bridge].values():
            problems.append(f"--port {spec!r}: ofport {num} used twice on {bridge}")
            continue
        if classify_port(cfg, bridge, name).role is Role.UNKNOWN:
            warnings.append(f"--port {spec!r}: {name} has no role on {bridge} "
                            f"({no_role_reason(cfg, bridge, name)}): it gets no flows, "
                            "its packets are dropped")
        ports[bridge][name] = int(num)
    if problems:
        _fail(problems, EXIT_BAD_INPUT)
    for warning in warnings:
        click.echo(f"socknet: warning: {warning}", err=True)
    return ports


@main.command()
@_config_option
@click.option("--port", "port_specs", multiple=True, metavar="[BRIDGE:]NAME=OFPORT",
              help="a port and its OpenFlow number (repeat)")
@click.option("--bridge", help="print only this bridge (output loads with ovs-ofctl add-flows)")
@click.option("--comments/--no-comments", default=False, help="explain each flow")
def flows(cfg: HostConfig, port_specs: tuple[str, ...], bridge: str | None,
          comments: bool) -> None:
    """Print, offline, the exact flows the controller would install."""
    from topology.flows import desired_state
    from topology.render import flows_text

    path = _policy_path(cfg)
    policy = _load_policy(path) if path is not None else None
    state = desired_state(cfg, _parse_ports(cfg, port_specs), policy,
                          declared=_declarations(cfg))
    if bridge is not None and bridge not in state:
        _fail([f"--bridge {bridge!r}: not a bridge of this host ({', '.join(state)})"],
              EXIT_BAD_INPUT)
    for name, fl in state.items():
        if bridge is not None and name != bridge:
            continue
        if bridge is None:
            click.echo(f"# bridge {name}")
        click.echo(flows_text(fl, comments=comments), nl=False)


def _declarations(cfg: HostConfig) -> Declarations:
    """Container addresses as the controller would have them: host.yaml over Proxmox's
    guest configs (read now); what they declare twice is named on stderr."""
    from controller.pve_watch import read_pve_dir
    from topology.addresses import declarations
    from topology.pve import parse_pve

    files = read_pve_dir(Path(cfg.pve.dir)) if cfg.pve is not None else None
    guests = parse_pve(files or {})
    declared = declarations(cfg, guests.nics)
    for line in [*guests.problems, *(f"conflict: {c.describe()}: refused to both"
                                     for c in declared.conflicts)]:
        click.echo(f"socknet: warning: {line}", err=True)
    return declared


def _policy_arg(path: str) -> Policy:
    return _load_policy(Path(path))


@main.command()
@click.argument("policy_file", nargs=-1, required=True, type=click.Path(),
                metavar="POLICY_FILE...")
@click.option("--quiet", "-q", is_flag=True, help="print failures only")
def check(policy_file: tuple[str, ...], quiet: bool) -> None:
    """Validate and compile policies, run their tests on the compiled flows (simulated).
    Exit status: the worst of the files'."""
    sys.exit(max(_check_one(path, quiet) for path in policy_file))


def _check_one(policy_file: str, quiet: bool) -> int:
    from topology.check import run_tests
    from topology.policy_compile import compile_policy, rule_flow_count

    try:
        policy = load_policy(policy_file)
    except PolicyError as exc:
        for line in exc.problems:
            click.echo(f"socknet: {line}", err=True)
        return EXIT_BAD_INPUT
    outcomes = run_tests(policy)
    failed = [o for o in outcomes if not o.passed]
    for o in outcomes:
        if not quiet or not o.passed:
            click.echo(str(o))
    flows = compile_policy(policy)
    click.echo(f"{policy_file}: {len(policy.rules)} rules, {rule_flow_count(flows)} rule flows, "
               f"{len(outcomes) - len(failed)}/{len(outcomes)} tests passed")
    return EXIT_FAILED if failed else EXIT_OK


@main.command()
@click.option("--policy", "policy_file", required=True, type=click.Path())
@click.option("--src", required=True, help="source IPv4 address")
@click.option("--dst", required=True, help="destination IPv4 address")
@click.option("--tcp", "tcp_port", type=click.IntRange(1, 65535), help="TCP destination port")
@click.option("--udp", "udp_port", type=click.IntRange(1, 65535), help="UDP destination port")
@click.option("--icmp", is_flag=True, help="ICMP echo")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def trace(policy_file: str, src: str, dst: str, tcp_port: int | None, udp_port: int | None,
          icmp: bool, as_json: bool) -> None:
    """Which rule decides SRC -> DST, simulated on the compiled flows."""
    import ipaddress

    from topology.check import PolicySimulator

    chosen = [(p, v) for p, v in (("tcp", tcp_port), ("udp", udp_port)) if v is not None]
    if icmp:
        chosen.append(("icmp", None))
    if len(chosen) != 1:
        _fail(["give exactly one of --tcp PORT, --udp PORT, --icmp"], EXIT_BAD_INPUT)
    for name, addr in (("--src", src), ("--dst", dst)):
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            _fail([f"{name} {addr!r} is not an IPv4 address"], EXIT_BAD_INPUT)
    proto, port = chosen[0]
    result = PolicySimulator(_policy_arg(policy_file)).trace(src, dst, proto, port)
    if as_json:
        click.echo(json.dumps({"src": src, "dst": dst, "proto": proto, "port": port,
                               **result.as_dict()}))
        return
    what = f"{proto}/{port}" if port else proto
    click.echo(f"{src} -> {dst} {what}: {result.verdict} (rule: {result.rule})")
    for step in result.tables:
        click.echo(f"  table {step}")


GRAPH_FORMATS = {".mmd": "mermaid", ".mermaid": "mermaid", ".dot": "dot", ".gv": "dot",
                 ".svg": "svg", ".png": "png"}


def _graph_format(fmt: str | None, output: str | None) -> str:
    """--format, else the one -o's extension says, else Mermaid; exit 2 where they disagree,
    where the extension says nothing, or for PNG bytes bound for a terminal."""
    by_ext = GRAPH_FORMATS.get(Path(output).suffix.lower()) if output else None
    known = ", ".join(GRAPH_FORMATS)
    if output is not None and fmt is None and by_ext is None:
        _fail([f"-o {output}: cannot tell the format from its extension ({known}): "
               "give --format"], EXIT_BAD_INPUT)
    if fmt is not None and by_ext is not None and fmt != by_ext:
        _fail([f"--format {fmt} but -o {output} is {by_ext}: give one or make them agree"],
              EXIT_BAD_INPUT)
    chosen = fmt or by_ext or "mermaid"
    if output is None and chosen == "png" and _stdout_is_terminal():
        _fail(["--format png writes binary data: give -o FILE.png (or redirect standard "
               "output)"], EXIT_BAD_INPUT)
    return chosen


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


@main.command()
@click.argument("policy_file", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot", "svg", "png"]),
              help="default: the one -o's extension names (.mmd .dot .gv .svg .png), else "
                   "mermaid; svg and png are drawn by Graphviz `dot` (package graphviz)")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="write to this file instead of standard output")
def graph(policy_file: str, fmt: str | None, output: str | None) -> None:
    """Draw the tiers and the rules between them (allow solid, deny dashed)."""
    from topology.graph import GraphvizMissing, render, to_dot, to_mermaid

    fmt = _graph_format(fmt, output)
    policy = _policy_arg(policy_file)
    title = Path(policy_file).name
    if fmt == "mermaid":
        data = to_mermaid(policy, title).encode()
    elif fmt == "dot":
        data = to_dot(policy, title).encode()
    else:
        try:
            data = render(to_dot(policy, title), fmt)
        except GraphvizMissing as exc:
            _fail([str(exc)], EXIT_FAILED)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        Path(output).write_bytes(data)
    except OSError as exc:
        _fail([f"cannot write {output}: {exc.strerror}"], EXIT_BAD_INPUT)
    click.echo(f"wrote {output} ({fmt}, {len(data)} bytes)")


@main.command()
def pipeline() -> None:
    """Print the declared pipeline (the text of docs/pipeline.md)."""
    from topology.pipeline import pipeline_markdown

    click.echo(pipeline_markdown(), nl=False)


def _network_plan(cfg: HostConfig, policy_file: str | None,
                  mesh_peers: dict[str, Any] | None = None) -> dict[str, Any]:
    """network-plan.json for host.yaml, with --policy or else the policy host.yaml names."""
    from controller.plan import build_plan

    path = Path(policy_file) if policy_file is not None else _policy_path(cfg)
    policy = _load_policy(path) if path is not None else None
    return build_plan(cfg, policy, path.name if path is not None else None, mesh_peers)


@main.command()
@_config_option
@click.option("--policy", "policy_file", type=click.Path(),
              help="policy.yaml (default: the one host.yaml names, if any)")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="write network-plan.json here instead of standard output")
@click.option("--mesh-interface", metavar="IFNAME",
              help="WireGuard device to list mesh peers from (default: the literal mesh "
                   "uplinks, then netmaker)")
@click.option("--no-peers", is_flag=True, help="leave mesh peers out")
def plan(cfg: HostConfig, policy_file: str | None, output: str | None,
         mesh_interface: str | None, no_peers: bool) -> None:
    """Write the deterministic network-plan.json that `bootstrap --plan` checks."""
    from controller.plan import plan_json, read_mesh_peers

    peers = None
    if not no_peers:
        peers, why = read_mesh_peers(cfg, mesh_interface)
        if why:
            click.echo(f"socknet: note: mesh peers left out of the plan: {why}", err=True)
    text = plan_json(_network_plan(cfg, policy_file, peers))
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text)
    except OSError as exc:
        _fail([f"cannot write {output}: {exc.strerror}"], EXIT_BAD_INPUT)
    click.echo(f"wrote {output}")


@main.command()
@_config_option
@click.option("--plan", "plan_file", type=click.Path(),
              help="network-plan.json to enforce: refuse (exit 2) if host.yaml no longer "
                   "matches it")
def bootstrap(cfg: HostConfig, plan_file: str | None) -> None:
    """Create/repair the mesh and vmbr0 bridges and the to-socket/from-mesh pair."""
    from controller.bootstrap import BootstrapError
    from controller.bootstrap import bootstrap as do_bootstrap

    if plan_file is not None:
        from controller.plan import PlanError, check_plan

        try:
            check_plan(plan_file, _network_plan(cfg, None))
        except PlanError as exc:
            _fail(exc.problems, EXIT_BAD_INPUT)
    if cfg.ovsdb.startswith("unix:") and not Path(cfg.ovsdb[5:]).exists():
        # fail at once (not after the connect timeout): systemd retries in a second
        _fail([f"OVSDB socket {cfg.ovsdb[5:]} does not exist (is ovsdb-server running?)"],
              EXIT_FAILED)
    try:
        result = do_bootstrap(cfg)
    except BootstrapError as exc:
        _fail([str(exc)], EXIT_FAILED)
    changes = list(getattr(result, "changes", []) or [])
    if changes:
        for change in changes:
            click.echo(f"changed: {change}")
    else:
        click.echo("nothing to do: bridges already as configured")
    if cfg.bridges.mesh.vxlan:
        _sync_mesh_peers(cfg)


def _sync_mesh_peers(cfg: HostConfig) -> None:
    """`bootstrap` with `vxlan: true`: one sync of the per-peer VXLAN ports. A mesh
    interface that cannot be read yet is a note (the controller follows it later);
    a device or port that cannot be made is a failure."""
    from controller.ovsdb import OvsdbError
    from controller.peersync import PeerSync, PeerSyncError

    sync = PeerSync(cfg)
    try:
        result = sync.sync_once()
    except (PeerSyncError, OvsdbError, OSError) as exc:
        _fail([f"mesh peers: {exc}"], EXIT_FAILED)
    finally:
        sync.close()
    if result.reading is None:
        for err in result.errors:
            click.echo(f"socknet: note: mesh peers not synced: {err}", err=True)
        return
    for change in result.changes:
        click.echo(f"changed: mesh peer port {change}")
    for err in result.errors:
        click.echo(f"socknet: warning: mesh peers: {err}", err=True)
    live = sum(1 for p in result.decisions if p.device is not None)
    click.echo(f"mesh peers: {len(result.decisions)} on {cfg.bridges.mesh.wg_interface}, "
               f"{live} with a port")


@main.command()
@_config_option
@click.option("--audit-interval", default=30.0, show_default=True,
              help="seconds between re-reads of the switches' flows")
@click.option("--log-level", default="info", show_default=True)
def run(cfg: HostConfig, audit_interval: float, log_level: str) -> None:
    """Run the OpenFlow controller (JSON logs on stderr)."""
    from controller.logs import setup_logging
    from controller.service import run_controller

    setup_logging(log_level)
    run_controller(cfg, audit_interval_s=audit_interval, policy_path=_policy_path(cfg))


@main.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def status(cfg: HostConfig, as_json: bool) -> None:
    """Bridges, ports and their roles, controller connection, flows per table."""
    from controller.status import collect_status, format_status

    data = collect_status(cfg, _policy_path(cfg))
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(format_status(data), nl=False)
    if data.get("problems"):
        sys.exit(EXIT_FAILED)


def _add_fleet_commands() -> None:
    from controller.fleet.cli import fleet, policy

    main.add_command(fleet)
    main.add_command(policy)


_add_fleet_commands()


if __name__ == "__main__":
    main()
