"""What the operator sees, without a switch: `socknet flows --port` naming odd ports,
`socknet graph` formats, `--version`, no banner, the install step and the systemd unit
as shipped, the lab's hints, the metrics table of docs/operations.md. The drop
counters, dropped and port events are in tests/test_drops.py; with real packets in
tests/test_operator_lab.py."""

from __future__ import annotations

import ipaddress
import os
import pty
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from controller import cli
from labs.lab import SocketLab, hints, socknet_command
from labs.policy_lab import tier_services
from topology.graph import dot_available, to_dot, to_mermaid
from topology.policy import load_policy

REPO = Path(__file__).resolve().parent.parent
HOST = textwrap.dedent("""\
    host: pve9
    datapath_type: netdev
    bridges:
      mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}
      socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
    """)
PMOVES = REPO / "examples" / "pmoves-tiers.yaml"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture()
def host(tmp_path: Path) -> Path:
    path = tmp_path / "host.yaml"
    path.write_text(HOST)
    return path


# ------------------------------------------------------------------ flows --port


@pytest.mark.parametrize("spec, why", [
    ("veth999=5", "veth999 has no role on vmbr0 (container 999 is in neither privacy_ids "
                  "100-199 nor service_ids 200-299)"),
    ("eth0=7", "eth0 has no role on vmbr0 (not a container port"),
    ("mesh:rogue0=3", "rogue0 has no role on mesh (neither to-socket nor a mesh uplink "
                      "(nm-privacy))"),
])
def test_flows_warns_about_a_port_without_a_role(host: Path, spec: str, why: str) -> None:
    result = invoke("flows", "-c", str(host), "--port", spec)
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"socknet: warning: --port {spec!r}: {why}"), line
    assert line.endswith("it gets no flows, its packets are dropped")
    assert result.stdout == invoke("flows", "-c", str(host)).stdout  # and indeed none


@pytest.mark.parametrize("spec, why", [
    ("vmbr0:to-socket=3", "to-socket is a port of mesh (host.yaml bridges.mesh.to_socket), "
                          "not of vmbr0"),
    ("mesh:warp0=3", "warp0 is a port of vmbr0 (host.yaml bridges.socket.warp), not of mesh"),
    ("vmbr0=2", "vmbr0 is a bridge of this host, not a port"),
    ("a-very-long-port-name=2", "cannot be an interface name"),
    ("a b=2", "cannot be an interface name"),
])
def test_flows_refuses_names_that_cannot_be_ports_there(host: Path, spec: str,
                                                        why: str) -> None:
    result = invoke("flows", "-c", str(host), "--port", spec)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"socknet: --port {spec!r}: ") and why in line, line


def test_flows_ports_with_a_role_say_nothing(host: Path) -> None:
    result = invoke("flows", "-c", str(host), "--port", "veth100i0=4", "--port",
                    "mesh:to-socket=2", "--port", "warp0=3")
    assert result.exit_code == 0 and result.stderr == ""
    assert "in_port=4" in result.stdout


# ------------------------------------------------------------------ graph


def test_graph_format_from_the_extension(tmp_path: Path) -> None:
    for name, starts in (("g.dot", "digraph policy {"), ("g.gv", "digraph policy {"),
                         ("g.mmd", "---\ntitle: pmoves-tiers.yaml")):
        result = invoke("graph", str(PMOVES), "-o", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_text().startswith(starts)
    if not dot_available():
        pytest.skip("Graphviz `dot` not installed (make deps)")
    result = invoke("graph", str(PMOVES), "-o", str(tmp_path / "t.svg"))
    assert result.exit_code == 0 and "(svg," in result.output
    assert "<svg" in (tmp_path / "t.svg").read_text()
    result = invoke("graph", str(PMOVES), "-o", str(tmp_path / "t.PNG"))
    assert (tmp_path / "t.PNG").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, why", [
    (["--format", "mermaid", "-o", "t.svg"], "--format mermaid but -o t.svg is svg"),
    (["-o", "t.txt"], "-o t.txt: cannot tell the format from its extension"),
])
def test_graph_format_and_file_must_agree(tmp_path: Path, args: list[str], why: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("graph", str(PMOVES), *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"socknet: {why}")
    assert not list(tmp_path.iterdir())  # nothing written


def _on_a_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run ``socknet ARGV`` with its standard output on a pseudo-terminal (read as it
    comes: a full terminal would block the writer)."""
    leader, follower = pty.openpty()
    seen = bytearray()

    def read() -> None:
        try:
            while chunk := os.read(leader, 65536):
                seen.extend(chunk)
        except OSError:
            pass  # EIO: the terminal's other end is closed, all read

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "controller.cli", *argv], stdout=follower,
                              stderr=subprocess.PIPE, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.close(follower)
        reader.join(10)
        os.close(leader)
    return proc.returncode, bytes(seen) + proc.stderr


def test_graph_png_is_never_written_to_a_terminal() -> None:
    code, seen = _on_a_terminal(["graph", str(PMOVES), "--format", "png"])
    assert code == 2
    assert b"\x89PNG" not in seen and b"give -o FILE.png" in seen
    code, seen = _on_a_terminal(["graph", str(PMOVES)])  # text is fine
    assert code == 0 and b"flowchart LR" in seen
    if dot_available():  # into a pipe it is what was asked for
        out = subprocess.run([sys.executable, "-m", "controller.cli", "graph", str(PMOVES),
                              "--format", "png"], capture_output=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0 and out.stdout.startswith(b"\x89PNG")


def test_graph_labels_each_rule_once() -> None:
    """A rule towards four tiers was labelled on each of its four edges."""
    policy = load_policy(PMOVES)
    mermaid, dot = to_mermaid(policy), to_dot(policy)
    for rule in policy.rules:
        if rule.implicit:
            continue
        label = f"{rule.name}{' (log)' if rule.log else ''}:"
        assert mermaid.count(label) == 1, (rule.name, mermaid)
        assert dot.count(label) == 1, rule.name
    # monitoring-scrape still reaches each of its four tiers, through its label node
    group = re.search(r'(r\d+)\["monitoring-scrape:', mermaid)
    assert group is not None
    assert len(re.findall(rf"^  {group.group(1)} --> n\d+$", mermaid, re.M)) == 4


# ------------------------------------------------------------------ version, noise


def test_version() -> None:
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"socknet {version('socknet')}\n"


def test_no_eventlet_banner_from_what_the_labs_import() -> None:
    """`make lab-up HOSTS=3` printed eventlet's deprecation banner (python-ovs imports
    eventlet); not actionable, so never shown."""
    code = "import labs.lab, labs.mesh_lab, controller.peersync, controller.ovsdb"
    res = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                         text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert "Eventlet" not in res.stderr and "Warning" not in res.stderr, res.stderr


# ------------------------------------------------------------------ install, unit, docs


def _make_dry(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    res = subprocess.run(["make", "-s", "-n", "-C", str(REPO), *args], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _unit_value(key: str) -> str:
    text = (REPO / "deploy" / "socknet.service").read_text()
    m = re.search(rf"^{key}=(.*)$", text, re.M)
    assert m is not None, key
    return m.group(1)


def test_install_puts_socknet_on_path_and_the_unit_docs_in_place() -> None:
    out = _make_dry("install", "VENV=/opt/sn")
    assert "ln -sfn /opt/sn/bin/socknet /usr/local/bin/socknet" in out
    docs = re.search(r"install -D -m 0644 docs/operations.md (\S+)", out)
    assert docs is not None
    assert _unit_value("Documentation") == f"file://{docs.group(1)}"
    assert _unit_value("ExecStart").startswith("/usr/local/bin/socknet ")
    for target in ("demo", "lab-up", "test"):  # each of them leaves socknet on PATH
        assert "ln -sfn" in _make_dry(target, "VENV=/opt/sn"), target


def test_make_lab_up_takes_a_policy() -> None:
    assert re.search(r"labs\.lab up --hosts 1 --policy examples/pmoves-tiers.yaml",
                     _make_dry("lab-up", "POLICY=examples/pmoves-tiers.yaml", "VENV=/opt/sn"))
    assert "--policy" not in _make_dry("lab-up", "VENV=/opt/sn")


def test_apt_list_has_what_ci_needs() -> None:
    make = (REPO / "Makefile").read_text()
    pkgs = re.search(r"^APT_PKGS := (.*?)\n[A-Z]", make, re.M | re.S)
    assert pkgs is not None
    names = pkgs.group(1).replace("\\", " ").split()
    assert {"systemd", "curl", "graphviz"} <= set(names)  # systemd-analyze, the lab hints


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_shipped_systemd_unit_verifies() -> None:
    """The unit exactly as shipped, after the documented install (`make install`, which
    `make test` runs): its ExecStart= binary must exist."""
    assert os.access("/usr/local/bin/socknet", os.X_OK), \
        "/usr/local/bin/socknet is missing: run `make install` (make test does)"
    res = subprocess.run(["systemd-analyze", "verify", str(REPO / "deploy" / "socknet.service")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr


def test_every_exported_metric_is_in_the_operations_guide() -> None:
    from test_ops import _exposed_metric_names

    guide = (REPO / "docs" / "operations.md").read_text()
    table = guide[guide.index("| metric | what |"):guide.index("Each remote host learned")]
    missing = {m for m in _exposed_metric_names()
               if not re.search(rf"`{re.escape(m.removesuffix('_total'))}(_total)?[{{`]",
                                table)}
    assert not missing, f"not in docs/operations.md's metric table: {sorted(missing)}"


# ------------------------------------------------------------------ the labs


def test_lab_hints_use_socknet_and_reach_the_metrics(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr("labs.lab.shutil.which", lambda name: f"/usr/local/bin/{name}")
    assert socknet_command() == "socknet"
    lab = SocketLab("snx", tmp_path)
    lines = hints(lab)
    status = next(line for line in lines if line.startswith("status:"))
    assert status.split(None, 1)[1] == (f"ip netns exec snxh socknet status -c "
                                        f"{tmp_path / 'host.yaml'}")
    metrics = next(line for line in lines if line.startswith("metrics:"))
    assert "ip netns exec snxh curl -s http://127.0.0.1:9464/metrics" in metrics
    assert not any("controller.cli" in line for line in lines)
    monkeypatch.setattr("labs.lab.shutil.which", lambda name: None)
    assert socknet_command().endswith("socknet")  # the virtualenv's own


def test_policy_lab_places_a_container_in_every_tier() -> None:
    policy = load_policy(PMOVES)
    placed = tier_services(policy)
    assert [tier for _, tier in placed.values()] == list(policy.tiers)
    for ip, tier in placed.values():
        assert any(ipaddress.ip_address(ip) in net for net in policy.tiers[tier].nets)
    assert min(placed) == 200 and max(placed) < 300
