"""Operations: exit codes of every command, network-plan.json, safe listener defaults,
the systemd unit and NixOS module, the Grafana dashboard, the Makefile targets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from controller import cli
from controller.plan import CONTAINER_PORT_PATTERNS, PLAN_FORMAT, build_plan, differences
from controller.tls import exposure_warnings, osken_args, ovs_ssl
from labs import netns as nsl
from labs.ovs_instance import OvsInstance
from topology.config import parse_host_config
from topology.roles import container_vmid

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

HOST = textwrap.dedent("""\
    host: pve9
    datapath_type: netdev
    bridges:
      mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}
      socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
    containers:
      100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
    """)
POLICY = textwrap.dedent("""\
    tiers:
      api: {cidrs: [172.30.1.0/24]}
      data: {cidrs: [172.30.4.0/24], internal: true}
    externals:
      tailnet: {cidrs: [100.64.0.0/10]}
    policy:
      rules:
        - {name: api-data, from: api, to: data, tcp: [5432]}
    tests:
      - {from: 172.30.1.5, to: 172.30.4.5, tcp: 5432, expect: allow}
    """)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


def one_line_per_problem(result: Any, n: int | None = None) -> list[str]:
    """stderr is only `socknet: ...` lines (no traceback, no usage text); returns them."""
    lines = result.stderr.splitlines()
    assert lines, "no error printed"
    assert all(line.startswith("socknet: ") for line in lines), result.stderr
    assert "Traceback" not in result.output
    if n is not None:
        assert len(lines) == n, result.stderr
    return lines


# --------------------------------------------------------------------------- exit codes


def _bad_files(tmp: Path, kind: str) -> dict[str, tuple[Path, str]]:
    """case -> (file, text expected in the error). ``kind``: host or policy."""
    good = HOST if kind == "host" else POLICY
    (tmp / "invalid.yaml").write_text("host: [unclosed\n")
    (tmp / "unknown.yaml").write_text(good + "bogus_key: 1\n")
    return {
        "missing file": (tmp / "absent.yaml", "cannot read: No such file or directory"),
        "invalid YAML": (tmp / "invalid.yaml", "YAML syntax error"),
        "unknown key": (tmp / "unknown.yaml", "bogus_key: unknown key"),
    }


# Arguments a command needs besides its input file. A new command that takes
# `-c host.yaml` or a policy file is tested automatically; one that needs more
# arguments must be listed here (the test fails until it is). Subcommands of a
# group are named "group sub".
EXTRA_ARGS: dict[str, list[str]] = {
    "trace": ["--src", "172.30.1.5", "--dst", "172.30.4.5", "--tcp", "5432"],
}
NO_INPUT_FILE = {"pipeline"}
# commands whose input is no file: their bad input is in BAD_INPUT below
OTHER_INPUT = {"fleet ca", "fleet cert"}


def _command(name: str) -> Any:
    command: Any = cli.main
    for part in name.split():
        command = command.commands[part]
    return command


def _leaves(group: Any, prefix: str = "") -> list[str]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, cli.click.Group):
            out += _leaves(command, f"{prefix}{name} ")
        else:
            out.append(f"{prefix}{name}")
    return out


def _input_kind(command: Any) -> str | None:
    params = {p.name: p for p in command.params}
    if isinstance(params.get("policy_file"), cli.click.Argument):
        return "policy"
    if "config_path" in params:
        return "host"
    if "policy_file" in params:
        return "policy"
    return None


def _argv(name: str, kind: str, path: Path) -> list[str]:
    command = _command(name)
    if kind == "host":
        return [*name.split(), "-c", str(path), *EXTRA_ARGS.get(name, [])]
    param = next(p for p in command.params if p.name == "policy_file")
    if isinstance(param, cli.click.Argument):
        return [*name.split(), str(path), *EXTRA_ARGS.get(name, [])]
    return [*name.split(), "--policy", str(path), *EXTRA_ARGS.get(name, [])]


COMMANDS = sorted(_leaves(cli.main))


def test_every_command_is_classified() -> None:
    for name in COMMANDS:
        assert _input_kind(_command(name)) or name in NO_INPUT_FILE | OTHER_INPUT, (
            f"socknet {name}: add its bad-input cases to tests/test_ops.py")


@pytest.mark.parametrize("case", ["missing file", "invalid YAML", "unknown key"])
@pytest.mark.parametrize("name", sorted(set(COMMANDS) - OTHER_INPUT))
def test_bad_input_file_exits_2_with_one_line(name: str, case: str, tmp_path: Path) -> None:
    kind = _input_kind(_command(name))
    if kind is None:
        result = invoke(*name.split())
        assert result.exit_code == 0, result.output  # takes no input: cannot get it wrong
        return
    path, expected = _bad_files(tmp_path, kind)[case]
    result = invoke(*_argv(name, kind, path))
    assert result.exit_code == 2, result.output
    (line,) = one_line_per_problem(result)
    assert str(path) in line and expected in line


BAD_INPUT: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("validate: policy named by host.yaml is broken",
     lambda d: ["validate", "-c", str(d / "host-badpolicy.yaml")], "policy.yaml:2: YAML syntax"),
    ("flows: bad --port", lambda d: ["flows", "-c", str(d / "host.yaml"), "--port", "x=y"],
     "expected NAME=OFPORT"),
    ("flows: unknown --bridge", lambda d: ["flows", "-c", str(d / "host.yaml"), "--bridge",
                                           "br9"], "not a bridge of this host"),
    ("trace: bad address", lambda d: ["trace", "--policy", str(d / "policy.yaml"), "--src",
                                      "1.2.3", "--dst", "1.2.3.4", "--icmp"],
     "not an IPv4 address"),
    ("graph: unwritable output", lambda d: ["graph", str(d / "policy.yaml"), "-o",
                                            str(d / "no" / "g.mmd")], "cannot write"),
    ("plan: unwritable output", lambda d: ["plan", "-c", str(d / "host.yaml"), "--no-peers",
                                           "-o", str(d / "no" / "p.json")], "cannot write"),
    ("plan: --policy missing", lambda d: ["plan", "-c", str(d / "host.yaml"), "--no-peers",
                                          "--policy", str(d / "nope.yaml")], "cannot read"),
    ("bootstrap: --plan missing", lambda d: ["bootstrap", "-c", str(d / "host.yaml"),
                                             "--plan", str(d / "nope.json")], "cannot read"),
    ("bootstrap: --plan not JSON", lambda d: ["bootstrap", "-c", str(d / "host.yaml"),
                                              "--plan", str(d / "host.yaml")], "not JSON"),
    ("bootstrap: --plan not a plan", lambda d: ["bootstrap", "-c", str(d / "host.yaml"),
                                                "--plan", str(d / "other.json")],
     "not a socknet network plan"),
    ("validate: ssl without tls", lambda d: ["validate", "-c", str(d / "host-ssl.yaml")],
     "needs a tls: block"),
    ("validate: tls file missing", lambda d: ["validate", "-c", str(d / "host-tls.yaml")],
     "no such file"),
    ("fleet cert: not a host name", lambda d: ["fleet", "cert", "a/b", "--ca-dir", str(d),
                                              "--out", str(d)], "is not a host name"),
    ("fleet ca: directory is a file", lambda d: ["fleet", "ca", "--dir", str(d / "host.yaml")],
     "is not a directory"),
    ("fleet init: no fleet section", lambda d: ["fleet", "init", "-c", str(d / "host.yaml")],
     "no fleet: section"),
    ("fleet status: no database named", lambda d: ["fleet", "status"], "give -c host.yaml"),
]


@pytest.mark.parametrize("what,argv,expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_other_bad_input_exits_2(what: str, argv: Callable[[Path], list[str]], expected: str,
                                 tmp_path: Path) -> None:
    (tmp_path / "host.yaml").write_text(HOST)
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "host-badpolicy.yaml").write_text(HOST + "policy: policy.yaml\n")
    (tmp_path / "other.json").write_text('{"format": "something else"}\n')
    (tmp_path / "host-ssl.yaml").write_text(HOST + "controller: {listen: 'ssl:127.0.0.1:6653'}\n")
    (tmp_path / "host-tls.yaml").write_text(HOST + (
        "controller:\n  listen: ssl:127.0.0.1:6653\n  tls: {key: /nonexistent/k.pem, "
        f"cert: {tmp_path}/host.yaml, ca_cert: {tmp_path}/host.yaml, "
        f"switch_key: {tmp_path}/host.yaml, switch_cert: {tmp_path}/host.yaml}}\n"))
    if "badpolicy" in " ".join(argv(tmp_path)):
        (tmp_path / "policy.yaml").write_text("tiers: [\n")
    result = invoke(*argv(tmp_path))
    assert result.exit_code == 2, result.output
    lines = one_line_per_problem(result)
    assert any(expected in line for line in lines), lines


def test_check_failed_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("expect: allow", "expect: deny"))
    result = invoke("check", str(path), "-q")
    assert result.exit_code == 1
    assert "1/1 tests" not in result.stdout and "0/1 tests passed" in result.stdout


def test_bootstrap_without_ovsdb_exits_1_at_once(tmp_path: Path) -> None:
    (tmp_path / "host.yaml").write_text(HOST + f"ovsdb: unix:{tmp_path}/db.sock\n")
    started = time.monotonic()
    result = invoke("bootstrap", "-c", str(tmp_path / "host.yaml"))
    assert result.exit_code == 1
    (line,) = one_line_per_problem(result)
    assert "does not exist (is ovsdb-server running?)" in line
    assert time.monotonic() - started < 5  # not the OVSDB connect timeout


# --------------------------------------------------------------------------- network plan


def _plan_files(tmp_path: Path) -> Path:
    for f in ("host.yaml", "pmoves-tiers.yaml"):
        shutil.copy(EXAMPLES / f, tmp_path / f)
    return tmp_path / "host.yaml"


def test_plan_is_deterministic_and_complete(tmp_path: Path) -> None:
    host = _plan_files(tmp_path)
    runs = [invoke("plan", "-c", str(host), "--no-peers") for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs) and runs[0].stdout == runs[1].stdout
    text = runs[0].stdout
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert not re.search(r"time|date|generated|20\d\d-\d\d-\d\d", text)
    plan = json.loads(text)
    assert plan["format"] == PLAN_FORMAT and plan["host"] == "pve1"
    mesh, sock = plan["bridges"]["mesh"], plan["bridges"]["vmbr0"]
    for br in (mesh, sock):
        assert br["fail_mode"] == "secure" and br["protocols"] == ["OpenFlow13", "OpenFlow14"]
        assert br["controller"]["target"] == "tcp:127.0.0.1:6653"
    roles = {p["role"]: p for p in sock["ports"]}
    assert set(roles) == {"from-mesh", "warp", "gateway", "privacy", "service", "unknown"}
    assert roles["privacy"]["vmids"] == "100-199" and roles["gateway"]["names"] == ["vmbr0gw"]
    assert [p["role"] for p in mesh["ports"]] == ["mesh-uplink", "to-socket", "unknown"]
    assert plan["veth_pair"] == ["to-socket", "from-mesh"]
    assert plan["controller"] == {"listen": "tcp:127.0.0.1:6653", "loopback": True,
                                  "tls": None}
    assert plan["metrics"] == {"enabled": True, "listen": "127.0.0.1:9464", "loopback": True}
    pol = plan["policy"]
    assert pol["source"] == "pmoves-tiers.yaml"
    assert pol["tiers"]["data"] == {"cidrs": ["172.30.4.0/24"], "internal": True}
    assert pol["tiers"]["api"]["internal"] is False
    assert pol["tailnet_cidrs"] == ["100.64.0.0/10"]
    assert pol["externals"]["tailnet"] == {"cidrs": ["100.64.0.0/10"]}
    assert "api-data" in [r["name"] for r in pol["rules"]]
    assert plan["containers"]["201"] == {"ip": "172.30.4.5/24", "mac": "02:00:00:00:02:01"}


def test_plan_port_patterns_are_the_ones_roles_recognise() -> None:
    for pattern in CONTAINER_PORT_PATTERNS:
        assert container_vmid(pattern.format(vmid=150, n=0)) == 150, pattern


def test_plan_output_file_and_policy_option(tmp_path: Path) -> None:
    (tmp_path / "host.yaml").write_text(HOST)
    (tmp_path / "tiers.yaml").write_text(POLICY)
    out = tmp_path / "network-plan.json"
    result = invoke("plan", "-c", str(tmp_path / "host.yaml"), "--policy",
                    str(tmp_path / "tiers.yaml"), "--no-peers", "-o", str(out))
    assert result.exit_code == 0 and result.stdout == f"wrote {out}\n"
    plan = json.loads(out.read_text())
    assert plan["policy"]["source"] == "tiers.yaml" and plan["mesh_peers"] is None
    # host.yaml names no policy: a plan made with one does not match it
    result = invoke("bootstrap", "-c", str(tmp_path / "host.yaml"), "--plan", str(out))
    assert result.exit_code == 2
    assert any("policy: the plan has" in ln for ln in one_line_per_problem(result))


def test_plan_mesh_peers_sorted_identity_only(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from controller import wgpeers

    keys = ["mI0BTIFlKqXZ0zJ7FKZcVHJXFvRvYa8x6kdNl0k3lno=",
            "AeXcM4MhdNDRLTaVlFmq6UCDV2XNYqDMvLkSmAnYcGU="]
    peers = tuple(wgpeers.WgPeer(k, endpoint=f"192.0.2.{i}:51821",
                                 allowed_ips=(f"100.100.0.{9 - i}/32", "10.9.0.0/24"),
                                 last_handshake=1700000000 + i, rx_bytes=i)
                  for i, k in enumerate(keys))
    asked = []

    def fake(ifname: str, **_: Any) -> Any:
        asked.append(ifname)
        if ifname != "netmaker":
            raise wgpeers.WgError(f"cannot read peers of {ifname}")
        return wgpeers.PeerReading(ifname, "uapi", peers)

    monkeypatch.setattr(wgpeers, "read_peers", fake)
    (tmp_path / "host.yaml").write_text(HOST.replace("[nm-privacy]", '[nm-privacy, "vx-*"]'))
    result = invoke("plan", "-c", str(tmp_path / "host.yaml"))
    assert result.exit_code == 0, result.output
    assert asked == ["nm-privacy", "netmaker"]  # literal uplinks, then Netmaker's default
    section = json.loads(result.stdout)["mesh_peers"]
    assert section == {"interface": "netmaker", "peers": [
        {"public_key": keys[1], "allowed_ips": ["10.9.0.0/24", "100.100.0.8/32"]},
        {"public_key": keys[0], "allowed_ips": ["10.9.0.0/24", "100.100.0.9/32"]},
    ]}
    # live state: peers in the plan never make bootstrap refuse
    plan = json.loads(result.stdout)
    plan["mesh_peers"] = None
    assert differences(plan, json.loads(result.stdout)) == []


def test_plan_without_wgpeers_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import controller

    monkeypatch.delattr(controller, "wgpeers", raising=False)
    monkeypatch.setitem(sys.modules, "controller.wgpeers", None)
    (tmp_path / "host.yaml").write_text(HOST)
    result = invoke("plan", "-c", str(tmp_path / "host.yaml"))
    assert result.exit_code == 0
    assert json.loads(result.stdout)["mesh_peers"] is None
    assert "mesh peers left out" in result.stderr


def test_bootstrap_refuses_a_plan_that_no_longer_matches(tmp_path: Path) -> None:
    host = _plan_files(tmp_path)
    plan = tmp_path / "network-plan.json"
    assert invoke("plan", "-c", str(host), "--no-peers", "-o", str(plan)).exit_code == 0
    text = host.read_text()
    host.write_text(text.replace("service_ids: 200-299", "service_ids: 200-298")
                    .replace("listen: tcp:127.0.0.1:6653", "listen: tcp:127.0.0.1:6654"))
    (tmp_path / "pmoves-tiers.yaml").write_text(
        (tmp_path / "pmoves-tiers.yaml").read_text().replace("172.30.4.0/24", "172.30.6.0/24"))
    result = invoke("bootstrap", "-c", str(host), "--plan", str(plan))
    assert result.exit_code == 2  # before touching OVSDB (it does not exist here)
    lines = one_line_per_problem(result)
    assert "does not match host.yaml" in lines[0]
    text = "\n".join(lines)
    for field in ("bridges.vmbr0.ports[4].vmids", "bridges.mesh.controller.target",
                  "controller.listen", "policy.tiers.data.cidrs[0]"):
        assert f"{plan}: {field}: the plan has" in text, field


def test_differences_names_each_leaf() -> None:
    a = {"x": {"y": [1, 2], "z": "a"}, "mesh_peers": [1], "only_a": 1}
    b = {"x": {"y": [1, 3], "z": "a"}, "mesh_peers": [2], "only_b": 2}
    assert differences(a, b) == [
        "only_a: the plan has 1, host.yaml has nothing",
        "only_b: missing from the plan, host.yaml gives 2",
        "x.y[1]: the plan has 2, host.yaml gives 3",
    ]


# --------------------------------------------------------------------------- safe defaults, TLS


def _tls_files(tmp_path: Path) -> str:
    for name in ("k", "c", "ca", "sk", "sc"):
        (tmp_path / f"{name}.pem").write_text("x\n")
    d = tmp_path
    return (f"  tls: {{key: {d}/k.pem, cert: {d}/c.pem, ca_cert: {d}/ca.pem, "
            f"switch_key: {d}/sk.pem, switch_cert: {d}/sc.pem}}\n")


def test_listeners_default_to_loopback_without_warnings() -> None:
    cfg = parse_host_config(HOST)
    assert cfg.controller.listen == "tcp:127.0.0.1:6653"
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert exposure_warnings(cfg) == []
    assert osken_args(cfg) == ["--ofp-listen-host", "127.0.0.1", "--ofp-tcp-listen-port", "6653"]
    assert ovs_ssl(cfg) is None


def test_non_loopback_listeners_are_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "host.yaml"
    path.write_text(HOST + "controller: {listen: 'tcp:0.0.0.0:6653'}\n"
                    "metrics: {listen: '192.0.2.1:9464'}\n")
    cfg = parse_host_config(path.read_text())
    warnings = exposure_warnings(cfg)
    assert len(warnings) == 2
    assert "controller.listen tcp:0.0.0.0:6653" in warnings[0] and "no authentication" in \
        warnings[0]
    assert "metrics.listen 192.0.2.1:9464" in warnings[1]
    assert cfg.controller.ovs_target == "tcp:127.0.0.1:6653"  # OVS still connects locally
    result = invoke("validate", "-c", str(path))
    assert result.exit_code == 0
    assert [ln.split(":")[1].strip() for ln in result.stderr.splitlines()] == ["warning"] * 2


def test_tls_config_gives_osken_and_ovs_settings(tmp_path: Path) -> None:
    cfg = parse_host_config(HOST + "controller:\n  listen: ssl:127.0.0.1:6653\n"
                            + _tls_files(tmp_path))
    d = tmp_path
    assert cfg.controller.ovs_target == "ssl:127.0.0.1:6653"
    assert osken_args(cfg) == [
        "--ofp-listen-host", "127.0.0.1", "--ofp-ssl-listen-port", "6653",
        "--ctl-privkey", f"{d}/k.pem", "--ctl-cert", f"{d}/c.pem", "--ca-certs", f"{d}/ca.pem",
    ]  # fmt: skip
    assert ovs_ssl(cfg) == {"private_key": f"{d}/sk.pem", "certificate": f"{d}/sc.pem",
                            "ca_cert": f"{d}/ca.pem"}
    plan = build_plan(cfg)
    assert plan["controller"]["tls"]["ovs_ssl"] == ovs_ssl(cfg)
    assert plan["bridges"]["mesh"]["controller"]["target"] == "ssl:127.0.0.1:6653"


@pytest.mark.parametrize("controller,expected", [
    ("controller: {listen: 'ssl:127.0.0.1:6653'}\n", "needs a tls: block"),
    ("controller:\n  listen: tcp:127.0.0.1:6653\nTLS", "only used with listen: ssl"),
    ("controller:\n  listen: ssl:127.0.0.1:6653\n  tls: {key: k.pem}\n",
     "is not an absolute path"),
    ("controller:\n  listen: ssl:127.0.0.1:6653\n  tls: {key: /nonexistent.pem}\n",
     "/nonexistent.pem: no such file"),
])
def test_tls_config_errors(controller: str, expected: str, tmp_path: Path) -> None:
    from topology.config import ConfigError

    text = HOST + controller.replace("TLS", _tls_files(tmp_path))
    with pytest.raises(ConfigError) as err:
        parse_host_config(text, "host.yaml")
    assert any(expected in p for p in err.value.problems), err.value.problems


# --------------------------------------------------------------------------- service files


def _unit(path: Path) -> dict[str, list[str]]:
    """key -> values (a key may repeat) of a systemd unit file."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_settings() -> None:
    u = _unit(REPO / "deploy" / "socknet.service")
    assert u["Restart"] == ["always"] and u["RestartSec"] == ["1"]
    for dep in ("openvswitch-switch.service", "sys-subsystem-net-devices-netmaker.device"):
        assert any(dep in v for v in u["After"]) and any(dep in v for v in u["Wants"])
    assert u["ExecStartPre"] == ["/usr/local/bin/socknet bootstrap -c /etc/socknet/host.yaml"]
    assert u["ExecStart"] == ["/usr/local/bin/socknet run -c /etc/socknet/host.yaml"]
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    families = u["RestrictAddressFamilies"][0].split()
    assert {"AF_NETLINK", "AF_UNIX", "AF_INET"} <= set(families)
    assert "PrivateNetwork" not in u  # it configures the host's own network
    assert u["RestartPreventExitStatus"] == ["2"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing for a valid unit (it exits 0 even on
    warnings); the binary path is pointed at this checkout's socknet so it exists."""
    socknet = shutil.which("socknet", path=str(Path(sys.executable).parent)) or "/bin/true"
    unit = tmp_path / "socknet.service"
    unit.write_text((REPO / "deploy" / "socknet.service").read_text()
                    .replace("/usr/local/bin/socknet", socknet))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stderr


NIX = REPO / "deploy" / "nixos" / "socknet.nix"
# Stand-ins for nixpkgs' lib, pkgs and utils: enough to evaluate the module's config.
NIX_STUB = """
let
  lib = {
    mkEnableOption = d: { _type = "option"; };
    mkOption = a: a // { _type = "option"; };
    types = { package = "package"; bool = "bool"; str = "str"; path = "path";
              nullOr = t: "nullOr"; either = a: b: "either"; listOf = t: "listOf"; };
    literalExpression = s: s;
    mkIf = c: v: if c then v else { };
    mkDefault = x: x;
    optional = c: v: if c then [ v ] else [ ];
    optionalAttrs = c: v: if c then v else { };
    recursiveUpdate = a: b: a // b // { metrics = (a.metrics or { }) // b.metrics; };
    toInt = builtins.fromJSON;
    last = l: builtins.elemAt l (builtins.length l - 1);
    splitString = sep: s: builtins.filter builtins.isString (builtins.split sep s);
    escapeShellArgs = l: builtins.concatStringsSep " " l;
  };
  pkgs = {
    formats.yaml = { }: { type = "yaml"; generate = name: v: builtins.toJSON v; };
    coreutils = "/coreutils";
  };
  utils.escapeSystemdPath = s: builtins.replaceStrings [ "-" ] [ "\\\\x2d" ] s;
  m = import MODULE {
    inherit lib pkgs utils;
    config.services.socknet = {
      enable = true; package = "/socknet"; wireguardInterface = "nm-privacy";
      hostConfig = { host = "h1"; bridges = { mesh = { }; socket = { }; }; };
      policy = { tiers = { a = { cidrs = [ "10.0.0.0/8" ]; }; }; };
      metrics = { enable = true; listen = "127.0.0.1:9464"; openFirewall = false; };
      extraArgs = [ ];
    };
  };
in { options = builtins.attrNames m.options.services.socknet; config = m.config; }
"""


def test_nixos_module_shape() -> None:
    text = NIX.read_text()
    assert "options.services.socknet" in text and "pkgs.formats.yaml" in text
    for option in ("enable", "package", "hostConfig", "policy", "metrics"):
        assert re.search(rf"^    {option} = ", text, re.M), option


@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="nix not installed")
def test_nixos_module_parses_and_evaluates(tmp_path: Path) -> None:
    env = {**os.environ, "NIX_STATE_DIR": str(tmp_path / "nix"), "NIX_CONF_DIR": str(tmp_path)}
    res = subprocess.run(["nix-instantiate", "--parse", str(NIX)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    stub = tmp_path / "eval.nix"
    stub.write_text(NIX_STUB.replace("MODULE", str(NIX)))
    res = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(stub)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"enable", "package", "hostConfig", "policy", "metrics"} <= set(out["options"])
    svc = out["config"]["systemd"]["services"]["socknet"]
    sc = svc["serviceConfig"]
    assert sc["Restart"] == "always" and sc["RestartSec"] == 1
    assert sc["ExecStartPre"] == "/socknet/bin/socknet bootstrap -c /etc/socknet/host.yaml"
    assert sc["ExecReload"] == "/coreutils/bin/kill -HUP $MAINPID"
    assert "sys-subsystem-net-devices-nm\\x2dprivacy.device" in svc["after"]
    assert "vswitchd.service" in svc["after"]
    etc = out["config"]["environment"]["etc"]
    host = json.loads(etc["socknet/host.yaml"]["source"])
    assert host["policy"] == "/etc/socknet/policy.yaml"
    assert host["metrics"] == {"enabled": True, "listen": "127.0.0.1:9464"}
    # the rendered host.yaml is one socknet accepts
    cfg = parse_host_config(json.dumps(host))
    assert cfg.host == "h1" and cfg.metrics.listen == "127.0.0.1:9464"


# --------------------------------------------------------------------------- dashboard


def _exposed_metric_names() -> set[str]:
    """Every sample name controller/metrics.py can expose (counters get _total)."""
    from controller.metrics import ControllerCollector
    from controller.runtime import Controller

    collector = ControllerCollector(Controller(parse_host_config(HOST)))
    names = set()
    for family in collector.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_grafana_dashboard_references_only_real_metrics() -> None:
    dash = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    referenced = {m for e in exprs for m in re.findall(r"\bsocknet_[a-z_]+\b", e)}
    exposed = _exposed_metric_names()
    assert referenced - exposed == set(), f"not exported by controller/metrics.py: " \
                                          f"{sorted(referenced - exposed)}"
    # what the issue asks the dashboard to show
    for name in ("socknet_flows", "socknet_flow_mods_total", "socknet_bundles_total",
                 "socknet_reconciles_total", "socknet_packet_ins_total",
                 "socknet_rule_packets_total", "socknet_rule_bytes_total",
                 "socknet_denied_logged_total", "socknet_policy_reloads_total",
                 "socknet_policy_generation", "socknet_switch_connected"):
        assert name in referenced, name


# --------------------------------------------------------------------------- Makefile


def test_make_net_targets(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    cfg = tmp_path / "host.yaml"

    def dry(target: str) -> str:
        res = subprocess.run(["make", "-s", "-n", "-C", str(REPO), target, f"CONFIG={cfg}"],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()[-1]

    assert dry("net-status").endswith(f"socknet status -c {cfg}")
    assert dry("net-bootstrap").endswith(f"socknet bootstrap -c {cfg} ")  # no plan yet
    assert dry("net-plan").endswith(f"socknet plan -c {cfg} -o {tmp_path}/network-plan.json")
    (tmp_path / "network-plan.json").write_text("{}")
    assert dry("net-bootstrap").endswith(
        f"socknet bootstrap -c {cfg} --plan {tmp_path}/network-plan.json")


# --------------------------------------------------------------------------- on real OVS


def _host_text(ovs: OvsInstance, uid: str, extra: str = "") -> str:
    return (f"ovsdb: {ovs.db_remote}\ndatapath_type: netdev\n"
            f"bridges:\n  mesh: {{name: me{uid}, to_socket: ts{uid}}}\n"
            f"  socket: {{name: vm{uid}, from_mesh: fm{uid}}}\n{extra}")


@pytest.mark.ovs
def test_bootstrap_with_plan_on_real_ovs(uid: str, netns_factory: Callable[..., str],
                                         ovs_factory: Callable[..., OvsInstance],
                                         tmp_path: Path) -> None:
    ns = netns_factory("h")
    ovs = ovs_factory(ns)
    host, plan = tmp_path / "host.yaml", tmp_path / "network-plan.json"
    host.write_text(_host_text(ovs, uid))
    assert invoke("plan", "-c", str(host), "--no-peers", "-o", str(plan)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def bootstrap() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "controller.cli", "bootstrap", "-c", str(host),
                "--plan", str(plan)]
        return nsl.run(ns, argv, env=env, timeout=60, cwd=REPO)

    res = bootstrap()
    assert res.returncode == 0, res.stderr
    assert f"changed: bridge me{uid}" in res.stdout
    # host.yaml drifts from the reviewed plan: refused, OVS left exactly as it was
    before = ovs.vsctl("--columns=target,max_backoff", "list", "Controller")
    host.write_text(_host_text(ovs, uid, "controller: {max_backoff_ms: 4000}\n"))
    res = bootstrap()
    assert res.returncode == 2
    assert f"bridges.me{uid}.controller.max_backoff_ms: the plan has 1000, host.yaml gives " \
           "4000" in res.stderr
    assert ovs.vsctl("--columns=target,max_backoff", "list", "Controller") == before


@pytest.mark.ovs
def test_bootstrap_rolls_back_the_ssl_row(uid: str, netns_factory: Callable[..., str],
                                          ovs_factory: Callable[..., OvsInstance],
                                          tmp_path: Path) -> None:
    from controller.bootstrap import BootstrapError, bootstrap

    ns = netns_factory("h")
    ovs = ovs_factory(ns)
    cfg = parse_host_config(_host_text(ovs, uid, "controller:\n  listen: ssl:127.0.0.1:6653\n"
                                       + _tls_files(tmp_path)))
    pid = ovs.vswitchd_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # commits succeed, ovs-vswitchd never applies them
    deadline = time.monotonic() + 10
    while nsl.pid_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # no SSL row before: none after
    with pytest.raises(BootstrapError, match="ovs-vswitchd did not apply"):
        bootstrap(cfg, netns=ns, timeout=1.0)
    assert ovs.vsctl("--no-wait", "get-ssl").strip() == ""
    # an SSL row with other files before: the same files after
    ovs.vsctl("--no-wait", "set-ssl", "/old/key.pem", "/old/cert.pem", "/old/ca.pem")
    with pytest.raises(BootstrapError, match="ovs-vswitchd did not apply"):
        bootstrap(cfg, netns=ns, timeout=1.0)
    ssl = ovs.vsctl("--no-wait", "get-ssl")
    assert "Private key: /old/key.pem" in ssl and "CA Certificate: /old/ca.pem" in ssl
    assert ovs.vsctl("--no-wait", "list-br").split() == []
