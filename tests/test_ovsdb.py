"""controller.ovsdb against a real private OVS instance in a fresh namespace."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.ovsdb import (
    OFPP_LOCAL,
    OvsdbError,
    OvsdbSnapshot,
    OvsdbView,
    schema_helper,
    status_data,
)
from labs import netns as nsl
from labs.ovs_instance import OvsInstance
from topology.config import HostConfig, parse_host_config

pytestmark = pytest.mark.ovs

WAIT_S = 15.0  # generous: only failures ever wait this long


@dataclass
class Switch:
    ns: str
    ovs: OvsInstance
    bridge: str
    uid: str


@pytest.fixture
def switch(
    uid: str, netns_factory: Callable[..., str], ovs_factory: Callable[..., OvsInstance]
) -> Switch:
    ns = netns_factory("s")
    ovs = ovs_factory(ns)
    bridge = f"br{uid}"
    ovs.add_bridge(bridge)
    return Switch(ns, ovs, bridge, uid)


@pytest.fixture
def view(switch: Switch) -> Iterator[OvsdbView]:
    v = OvsdbView(switch.ovs.db_remote)
    try:
        v.wait_connected(WAIT_S)
        yield v
    finally:
        v.close()


def _veth_port(sw: Switch, name: str) -> int:
    """Create veth ``name``/``name``x in the switch namespace, add ``name``; return ofport."""
    nsl.add_veth(name, f"{name}x", sw.ns, sw.ns)
    return sw.ovs.add_port(sw.bridge, name)


class Watcher:
    """Runs OvsdbView.watch in a thread; collects snapshots in a queue."""

    def __init__(self, view: OvsdbView) -> None:
        self.view = view
        self.snaps: queue.Queue[OvsdbSnapshot] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=view.watch, args=(self.snaps.put, self.stop), daemon=True
        )

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.view.wakeup()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "watch() did not stop"

    def wait_for(self, pred: Callable[[OvsdbSnapshot], bool], what: str) -> OvsdbSnapshot:
        seen: list[OvsdbSnapshot] = []
        try:
            while True:
                snap = self.snaps.get(timeout=WAIT_S)
                seen.append(snap)
                if pred(snap):
                    return snap
        except queue.Empty:
            pytest.fail(f"no watch callback with {what} within {WAIT_S}s; got {seen}")


# --------------------------------------------------------------------------- snapshot


def test_snapshot_lists_ports_with_ofports(switch: Switch, view: OvsdbView) -> None:
    p1 = _veth_port(switch, f"sn{switch.uid}a")
    p2 = _veth_port(switch, f"sn{switch.uid}b")
    switch.ovs.vsctl("set-controller", switch.bridge, "tcp:127.0.0.1:1")
    view.run(1.0)
    while view.snapshot().controllers.get(switch.bridge) != [("tcp:127.0.0.1:1", False)]:
        assert view.run(WAIT_S), "controller never showed up"

    snap = view.snapshot()
    assert snap.ports[switch.bridge] == {f"sn{switch.uid}a": p1, f"sn{switch.uid}b": p2}
    assert OFPP_LOCAL not in snap.ports[switch.bridge].values()
    assert switch.bridge not in snap.ports[switch.bridge]  # LOCAL port excluded
    dpid = switch.ovs.vsctl("get", "bridge", switch.bridge, "datapath_id").strip().strip('"')
    assert snap.dpids[switch.bridge] == int(dpid, 16)
    assert snap.fail_modes[switch.bridge] == "secure"
    assert snap.datapath_types[switch.bridge] == "netdev"
    assert snap.ofport(switch.bridge, f"sn{switch.uid}a") == p1
    assert snap.port_name(switch.bridge, p2) == f"sn{switch.uid}b"
    assert snap.bridge_of_dpid(int(dpid, 16)) == switch.bridge
    assert snap == view.snapshot()  # value equality: watch() relies on it


def test_port_that_cannot_be_opened_is_not_listed(switch: Switch, view: OvsdbView) -> None:
    name = f"sn{switch.uid}n"  # no such device: OVS records ofport -1
    switch.ovs.vsctl("add-port", switch.bridge, name)
    assert switch.ovs.ofport(name) == -1
    while not any(i.name == name for i in view.idl.tables["Interface"].rows.values()):
        assert view.run(WAIT_S), "interface never reached the IDL"
    assert name not in view.snapshot().ports[switch.bridge]


# --------------------------------------------------------------------------- watch


def test_watch_fires_on_port_add_and_remove(switch: Switch, view: OvsdbView) -> None:
    name = f"sn{switch.uid}w"
    nsl.add_veth(name, f"{name}x", switch.ns, switch.ns)
    with Watcher(view) as w:
        w.wait_for(lambda s: switch.bridge in s.ports, "the initial snapshot")
        switch.ovs.vsctl("--no-wait", "add-port", switch.bridge, name)
        snap = w.wait_for(lambda s: name in s.ports[switch.bridge], f"port {name}")
        assert snap.ports[switch.bridge][name] == switch.ovs.ofport(name)
        switch.ovs.vsctl("--no-wait", "del-port", switch.bridge, name)
        w.wait_for(lambda s: name not in s.ports[switch.bridge], f"{name} removed")


def test_watch_coalesces_and_skips_unchanged(switch: Switch, view: OvsdbView) -> None:
    with Watcher(view) as w:
        w.wait_for(lambda s: switch.bridge in s.ports, "the initial snapshot")
        # Changes to columns outside the snapshot must not produce callbacks...
        switch.ovs.vsctl("set", "bridge", switch.bridge, "external_ids:x=1")
        # ...while a real change does, once.
        names = [f"sn{switch.uid}{i}" for i in range(3)]
        for name in names:
            nsl.add_veth(name, f"{name}x", switch.ns, switch.ns)
        switch.ovs.vsctl(
            *[a for n in names for a in ("--", "add-port", switch.bridge, n)]
        )  # one transaction
        snap = w.wait_for(lambda s: set(names) <= set(s.ports[switch.bridge]), "three ports")
        assert len(snap.ports[switch.bridge]) == 3
        with pytest.raises(queue.Empty):
            extra = w.snaps.get(timeout=0.3)
            pytest.fail(f"unexpected callback {extra}")


def test_watch_reconnects_after_ovsdb_restart(switch: Switch, view: OvsdbView) -> None:
    name = f"sn{switch.uid}r"
    nsl.add_veth(name, f"{name}x", switch.ns, switch.ns)
    with Watcher(view) as w:
        w.wait_for(lambda s: switch.bridge in s.ports, "the initial snapshot")
        switch.ovs.stop(remove_rundir=False)  # both daemons; the database file stays
        switch.ovs.start()
        switch.ovs.vsctl("add-port", switch.bridge, name)
        w.wait_for(lambda s: name in s.ports.get(switch.bridge, {}), f"{name} after restart")
    assert view.connected


def test_watch_stops_promptly(view: OvsdbView) -> None:
    stop = threading.Event()
    t = threading.Thread(target=view.watch, args=(lambda s: None, stop), daemon=True)
    t.start()
    stop.set()
    view.wakeup()
    t.join(WAIT_S)
    assert not t.is_alive()


# --------------------------------------------------------------------------- errors


def test_unreachable_server(tmp_path: Path) -> None:
    remote = f"unix:{tmp_path}/nothing.sock"
    helper = schema_helper(remote, timeout=0.2)  # falls back to the installed schema
    assert helper is not None
    v = OvsdbView(remote, schema_timeout=0.2)
    try:
        with pytest.raises(OvsdbError, match="no database contents"):
            v.wait_connected(0.5)
        assert not v.connected
    finally:
        v.close()


# --------------------------------------------------------------------------- status


def _cfg(sw: Switch, mesh: str) -> HostConfig:
    return parse_host_config(
        f"""
ovsdb: {sw.ovs.db_remote}
datapath_type: netdev
bridges:
  mesh: {{name: {mesh}, uplinks: ["nm-*"], to_socket: ts{sw.uid}}}
  socket: {{name: {sw.bridge}, from_mesh: fm{sw.uid}}}
"""
    )


def test_status_data_roles_and_problems(switch: Switch, view: OvsdbView) -> None:
    cfg = _cfg(switch, f"me{switch.uid}")
    ofp = {
        name: _veth_port(switch, name)
        for name in (f"fm{switch.uid}", "veth101i0", "veth250i0", "tap999i0")
    }
    switch.ovs.vsctl("set-controller", switch.bridge, cfg.controller.ovs_target)
    while f"fm{switch.uid}" not in view.snapshot().ports.get(switch.bridge, {}) or not (
        view.snapshot().controllers.get(switch.bridge)
    ):
        assert view.run(WAIT_S)

    data = status_data(cfg, view.snapshot())
    sock = data["bridges"][switch.bridge]
    assert sock["present"] and sock["kind"] == "socket"
    assert sock["fail_mode"] == "secure" and sock["datapath_type"] == "netdev"
    assert sock["dpid"] == view.snapshot().dpids[switch.bridge]
    assert sock["controllers"] == [{"target": cfg.controller.ovs_target, "connected": False}]
    assert sock["ports"] == {
        f"fm{switch.uid}": {"ofport": ofp[f"fm{switch.uid}"], "role": "from-mesh", "vmid": None},
        "veth101i0": {"ofport": ofp["veth101i0"], "role": "privacy", "vmid": 101},
        "veth250i0": {"ofport": ofp["veth250i0"], "role": "service", "vmid": 250},
        "tap999i0": {"ofport": ofp["tap999i0"], "role": "unknown", "vmid": 999},
    }
    assert data["bridges"][f"me{switch.uid}"]["present"] is False
    assert f"bridge me{switch.uid} does not exist" in data["problems"]
    assert (
        f"bridge {switch.bridge}: controller {cfg.controller.ovs_target} not connected"
        in data["problems"]
    )
