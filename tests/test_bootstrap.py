"""controller.bootstrap and controller.links against a private OVS in a fresh namespace.

The code under test creates kernel links, so it must act in the namespace where
that ovs-vswitchd runs: the tests pass ``netns=`` (the calling thread enters the
namespace only while creating its sockets), and one test runs ``bootstrap``
through ``ip netns exec`` exactly as a host would, without ``netns=``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller import links
from controller.bootstrap import BootstrapError, bootstrap, teardown
from labs import netns as nsl
from labs.ovs_instance import OvsInstance
from topology.config import HostConfig, parse_host_config

pytestmark = pytest.mark.ovs

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Host:
    ns: str
    ovs: OvsInstance
    cfg: HostConfig
    uid: str

    @property
    def mesh(self) -> str:
        return self.cfg.bridges.mesh.name

    @property
    def sock(self) -> str:
        return self.cfg.bridges.socket.name

    @property
    def to_socket(self) -> str:
        return self.cfg.bridges.mesh.to_socket

    @property
    def from_mesh(self) -> str:
        return self.cfg.bridges.socket.from_mesh

    def get(self, table: str, record: str, column: str) -> str:
        """``ovs-vsctl get`` output without quotes (vsctl quotes only some strings)."""
        return self.ovs.vsctl("get", table, record, column).strip().replace('"', "")

    def bridges(self) -> list[str]:
        return self.ovs.vsctl("list-br").split()

    def ports(self, bridge: str) -> list[str]:
        return self.ovs.vsctl("list-ports", bridge).split()


def _cfg_text(ovs: OvsInstance, uid: str, **controller: int) -> str:
    ctrl = "".join(f"\n  {k}: {v}" for k, v in controller.items())
    return f"""
ovsdb: {ovs.db_remote}
datapath_type: netdev
controller:
  listen: tcp:127.0.0.1:6653
  insecure_tcp: true{ctrl}
bridges:
  mesh: {{name: me{uid}, to_socket: ts{uid}}}
  socket: {{name: vm{uid}, from_mesh: fm{uid}}}
"""


@pytest.fixture
def host(
    uid: str, netns_factory: Callable[..., str], ovs_factory: Callable[..., OvsInstance]
) -> Host:
    ns = netns_factory("h")
    ovs = ovs_factory(ns)
    cfg = parse_host_config(_cfg_text(ovs, uid, max_backoff_ms=2000, inactivity_probe_ms=7000))
    return Host(ns, ovs, cfg, uid)


def _tx_checksumming(ns: str, ifname: str) -> str:
    out = nsl.run(ns, ["ethtool", "-k", ifname], check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("tx-checksumming:"))
    return line.split(":", 1)[1].split()[0]


def _assert_nothing_left(h: Host) -> None:
    assert h.bridges() == []
    assert not links.link_exists(h.to_socket, netns=h.ns)
    assert not links.link_exists(h.from_mesh, netns=h.ns)
    assert h.ovs.vsctl("--columns=_uuid", "list", "controller").strip() == ""


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_creates_bridges_controller_and_veth(host: Host) -> None:
    result = bootstrap(host.cfg, netns=host.ns)

    assert any(host.mesh in c for c in result.created)
    assert any(host.sock in c for c in result.created)
    assert result.changed == []
    assert sorted(host.bridges()) == sorted([host.mesh, host.sock])
    for bridge, port in ((host.mesh, host.to_socket), (host.sock, host.from_mesh)):
        assert host.get("bridge", bridge, "datapath_type") == "netdev"
        assert host.get("bridge", bridge, "fail_mode") == "secure"
        assert host.get("bridge", bridge, "protocols") == "[OpenFlow13, OpenFlow14]"
        assert host.get("bridge", bridge, "other_config:disable-in-band") == "true"
        assert host.ports(bridge) == [port]
        assert host.get("interface", bridge, "type") == "internal"  # its LOCAL port
        assert int(host.get("interface", port, "ofport")) > 0
        assert host.get("interface", port, "error") == "[]"
        assert host.ovs.vsctl("get-controller", bridge).split() == ["tcp:127.0.0.1:6653"]
        ctrl = host.get("bridge", bridge, "controller").strip("[]")
        assert host.get("controller", ctrl, "connection_mode") == "out-of-band"
        assert host.get("controller", ctrl, "max_backoff") == "2000"
        assert host.get("controller", ctrl, "inactivity_probe") == "7000"

    assert links.veth_pair_exists(host.to_socket, host.from_mesh, netns=host.ns)
    for end in (host.to_socket, host.from_mesh):
        assert _tx_checksumming(host.ns, end) == "off"
    up = nsl.run(host.ns, ["ip", "-o", "link", "show", "up"], check=True).stdout
    assert f" {host.to_socket}@" in up and f" {host.from_mesh}@" in up

    snap = result.snapshot
    assert snap is not None
    assert snap.ports[host.mesh] == {
        host.to_socket: int(host.get("interface", host.to_socket, "ofport"))
    }
    assert set(snap.dpids) == {host.mesh, host.sock}


def test_second_bootstrap_changes_nothing(host: Host) -> None:
    first = bootstrap(host.cfg, netns=host.ns)
    before = host.ovs.vsctl("show")
    second = bootstrap(host.cfg, netns=host.ns)
    assert not first.unchanged
    assert second.unchanged, second.changes
    assert second.created == [] and second.changed == []
    assert host.ovs.vsctl("show") == before


def test_drifted_settings_are_fixed(host: Host) -> None:
    bootstrap(host.cfg, netns=host.ns)
    host.ovs.vsctl(
        "set", "bridge", host.mesh, "fail_mode=standalone", "protocols=OpenFlow10",
        "other_config:disable-in-band=false",
    )  # fmt: skip
    host.ovs.vsctl("set-controller", host.sock, "tcp:127.0.0.1:6999")
    ctrl = host.get("bridge", host.mesh, "controller").strip("[]")
    host.ovs.vsctl("set", "controller", ctrl, "max_backoff=9000", "connection_mode=in-band")

    result = bootstrap(host.cfg, netns=host.ns)

    assert result.created == []
    text = "\n".join(result.changed)
    assert "fail_mode standalone -> secure" in text
    assert "protocols OpenFlow10 -> OpenFlow13,OpenFlow14" in text
    assert "disable-in-band" in text
    assert "tcp:127.0.0.1:6999 -> tcp:127.0.0.1:6653" in text
    assert "max_backoff 9000 -> 2000" in text
    assert "connection_mode in-band -> out-of-band" in text
    assert host.get("bridge", host.mesh, "fail_mode") == "secure"
    assert host.get("bridge", host.mesh, "protocols") == "[OpenFlow13, OpenFlow14]"
    assert host.get("bridge", host.mesh, "other_config:disable-in-band") == "true"
    assert host.ovs.vsctl("get-controller", host.sock).split() == ["tcp:127.0.0.1:6653"]
    assert host.get("controller", ctrl, "max_backoff") == "2000"
    assert host.get("controller", ctrl, "connection_mode") == "out-of-band"
    assert bootstrap(host.cfg, netns=host.ns).unchanged


def test_ports_it_does_not_own_are_kept(host: Host) -> None:
    bootstrap(host.cfg, netns=host.ns)
    nsl.add_veth("veth101i0", "ct101", host.ns, host.ns)
    host.ovs.add_port(host.sock, "veth101i0")
    host.ovs.vsctl("set", "bridge", host.sock, "fail_mode=standalone")
    result = bootstrap(host.cfg, netns=host.ns)
    assert result.changed and not result.created
    assert sorted(host.ports(host.sock)) == sorted([host.from_mesh, "veth101i0"])


def test_existing_bridge_gets_missing_pieces(host: Host) -> None:
    """A hand-made bridge (standalone, no controller, foreign port) is completed, not replaced."""
    host.ovs.add_bridge(host.sock, fail_mode="standalone")
    nsl.add_veth("veth102i0", "ct102", host.ns, host.ns)
    host.ovs.add_port(host.sock, "veth102i0")
    uuid_before = host.get("bridge", host.sock, "_uuid")

    result = bootstrap(host.cfg, netns=host.ns)

    assert host.get("bridge", host.sock, "_uuid") == uuid_before
    assert f"port {host.from_mesh} on {host.sock}" in result.created
    assert any("controller none -> tcp:127.0.0.1:6653" in c for c in result.changed)
    assert sorted(host.ports(host.sock)) == sorted([host.from_mesh, "veth102i0"])
    assert host.get("bridge", host.sock, "fail_mode") == "secure"


def test_vanished_veth_is_recreated_and_rebound(host: Host) -> None:
    bootstrap(host.cfg, netns=host.ns)
    links.delete_link(host.to_socket, netns=host.ns)  # takes from-mesh along
    result = bootstrap(host.cfg, netns=host.ns)
    assert f"veth pair {host.to_socket}/{host.from_mesh}" in result.created
    assert any("stale port" in c for c in result.changed)
    assert links.veth_pair_exists(host.to_socket, host.from_mesh, netns=host.ns)
    assert result.snapshot is not None
    assert result.snapshot.ofport(host.mesh, host.to_socket)
    assert host.get("interface", host.to_socket, "error") == "[]"
    assert bootstrap(host.cfg, netns=host.ns).unchanged


def test_bootstrap_inside_namespace_without_netns_argument(host: Host, tmp_path: Path) -> None:
    """How a host runs it: the process itself lives in ovs-vswitchd's namespace."""
    cfg_file = tmp_path / "host.yaml"
    cfg_file.write_text(_cfg_text(host.ovs, host.uid))
    code = (
        "import json, sys\n"
        "from controller.bootstrap import bootstrap\n"
        "from topology.config import load_host_config\n"
        "r = bootstrap(load_host_config(sys.argv[1]))\n"
        "print(json.dumps({'created': r.created, 'changed': r.changed}))\n"
    )
    argv = [sys.executable, "-c", code, str(cfg_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(2):
        proc = nsl.run(host.ns, argv, env=env, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["created"] and runs[1] == {"created": [], "changed": []}
    assert links.veth_pair_exists(host.to_socket, host.from_mesh, netns=host.ns)
    assert sorted(host.bridges()) == sorted([host.mesh, host.sock])


# --------------------------------------------------------------------------- failures


def test_conflicting_link_fails_cleanly(host: Host) -> None:
    """A foreign device named like a veth end: clear error, nothing created, device kept."""
    nsl.run(host.ns, ["ip", "link", "add", host.from_mesh, "type", "bridge"], check=True)
    with pytest.raises(BootstrapError) as err:
        bootstrap(host.cfg, netns=host.ns)
    msg = str(err.value)
    assert "\n" not in msg
    assert host.from_mesh in msg and "bridge" in msg
    assert host.bridges() == []
    assert not links.link_exists(host.to_socket, netns=host.ns)
    assert links.link_exists(host.from_mesh, netns=host.ns)  # not ours: left alone


def test_veth_paired_elsewhere_fails_cleanly(host: Host) -> None:
    nsl.add_veth(host.to_socket, f"xx{host.uid}", host.ns, host.ns)
    with pytest.raises(BootstrapError, match=f"paired with xx{host.uid}|its peer"):
        bootstrap(host.cfg, netns=host.ns)
    assert host.bridges() == []
    assert links.link_exists(f"xx{host.uid}", netns=host.ns)


def test_device_named_like_bridge_fails_cleanly(host: Host) -> None:
    nsl.run(host.ns, ["ip", "link", "add", host.sock, "type", "bridge"], check=True)
    with pytest.raises(BootstrapError, match="Linux bridge"):
        bootstrap(host.cfg, netns=host.ns)
    assert host.bridges() == []
    assert not links.link_exists(host.to_socket, netns=host.ns)


def test_failure_after_veth_creation_rolls_back(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str, *, netns: str | None = None) -> bool:
        raise links.LinkError(f"simulated failure on {name}")

    monkeypatch.setattr(links, "disable_tx_offload", broken)
    with pytest.raises(BootstrapError, match="simulated failure"):
        bootstrap(host.cfg, netns=host.ns)
    _assert_nothing_left(host)


def test_vswitchd_down_rolls_back_everything(host: Host) -> None:
    """The commit succeeds but ovs-vswitchd never applies it: DB rows and veth are undone."""
    _kill_vswitchd(host.ovs)
    with pytest.raises(BootstrapError, match="ovs-vswitchd did not apply"):
        bootstrap(host.cfg, netns=host.ns, timeout=2.0)
    _assert_nothing_left(host)


def test_rollback_restores_drifted_values(host: Host) -> None:
    bootstrap(host.cfg, netns=host.ns)
    host.ovs.vsctl("set", "bridge", host.mesh, "fail_mode=standalone", "protocols=OpenFlow10")
    host.ovs.vsctl("set-controller", host.sock, "tcp:127.0.0.1:6999")
    _kill_vswitchd(host.ovs)
    with pytest.raises(BootstrapError, match="ovs-vswitchd did not apply"):
        bootstrap(host.cfg, netns=host.ns, timeout=2.0)
    assert host.get("bridge", host.mesh, "fail_mode") == "standalone"
    assert host.get("bridge", host.mesh, "protocols") == "[OpenFlow10]"
    assert host.ovs.vsctl("get-controller", host.sock).split() == ["tcp:127.0.0.1:6999"]
    assert sorted(host.bridges()) == sorted([host.mesh, host.sock])  # existed before: kept
    assert links.veth_pair_exists(host.to_socket, host.from_mesh, netns=host.ns)


def test_unreachable_ovsdb(host: Host, tmp_path: Path) -> None:
    cfg = host.cfg.model_copy(update={"ovsdb": f"unix:{tmp_path}/none.sock"})
    with pytest.raises(BootstrapError, match="no database contents"):
        bootstrap(cfg, netns=host.ns, timeout=0.5)
    assert not links.link_exists(host.to_socket, netns=host.ns)


def _kill_vswitchd(ovs: OvsInstance) -> None:
    pid = ovs.vswitchd_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while nsl.pid_alive(pid):
        assert time.monotonic() < deadline, "ovs-vswitchd did not exit"
        time.sleep(0.02)


# --------------------------------------------------------------------------- teardown


def test_teardown_removes_bridges_and_veth(host: Host) -> None:
    nsl.add_veth("veth103i0", "ct103", host.ns, host.ns)
    host.ovs.add_bridge(f"ot{host.uid}")  # someone else's bridge survives
    bootstrap(host.cfg, netns=host.ns)
    removed = teardown(host.cfg, netns=host.ns)
    assert f"bridge {host.mesh}" in removed and f"bridge {host.sock}" in removed
    assert host.bridges() == [f"ot{host.uid}"]
    assert not links.link_exists(host.to_socket, netns=host.ns)
    assert not links.link_exists(host.from_mesh, netns=host.ns)
    assert teardown(host.cfg, netns=host.ns) == []
    # and it comes back
    assert not bootstrap(host.cfg, netns=host.ns).unchanged


# --------------------------------------------------------------------------- links


def test_links_helpers(host: Host) -> None:
    a, b = f"la{host.uid}", f"lb{host.uid}"
    ns = host.ns
    assert not links.link_exists(a, netns=ns)
    first = links.ensure_veth_pair(a, b, mtu=1400, netns=ns)
    assert first.created
    again = links.ensure_veth_pair(a, b, mtu=1400, netns=ns)
    assert again == links.VethResult(created=False, changes=())
    nsl.link_down(ns, b)
    fixed = links.ensure_veth_pair(a, b, netns=ns)
    assert fixed.changes == (f"set {b} up",)
    mtus = nsl.run(ns, ["ip", "-o", "link", "show", a], check=True).stdout
    assert "mtu 1400" in mtus
    # reversed names describe the same pair
    assert links.veth_pair_exists(b, a, netns=ns)
    # wrong peer / one end missing: error, nothing touched
    with pytest.raises(links.LinkError, match=f"is paired with {b}"):
        links.ensure_veth_pair(a, f"lc{host.uid}", netns=ns)
    assert links.disable_tx_offload(a, netns=ns) is True
    assert links.disable_tx_offload(a, netns=ns) is False
    assert _tx_checksumming(ns, a) == "off"
    assert links.delete_link(a, netns=ns) is True
    assert links.delete_link(a, netns=ns) is False
    assert not links.link_exists(b, netns=ns)
    nsl.run(ns, ["ip", "link", "add", a, "type", "bridge"], check=True)
    with pytest.raises(links.LinkError, match="is a bridge device, not a veth"):
        links.ensure_veth_pair(a, b, netns=ns)
    with pytest.raises(links.LinkError, match="no interface"):
        links.disable_tx_offload(f"zz{host.uid}", netns=ns)


def test_in_netns_only_affects_calling_thread(host: Host) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    with links.in_netns(host.ns):
        inside = os.readlink("/proc/thread-self/ns/net")
    assert inside != before
    assert os.readlink("/proc/thread-self/ns/net") == before
    with pytest.raises(links.LinkError, match="cannot enter"):
        with links.in_netns(f"nonexistent{host.uid}"):
            pass
    assert not Path(f"/var/run/netns/nonexistent{host.uid}").exists()
