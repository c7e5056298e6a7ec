"""controller.ovsdb_txn (the one transact-with-retry and wait-until-applied of every
OVSDB writer) against a real private OVS instance in a fresh namespace."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ovs.db.idl
import pytest

from controller.ovsdb import OvsdbView
from controller.ovsdb_txn import NotApplied, root_row, transact, wait_applied
from labs import netns as nsl
from labs.ovs_instance import OvsInstance

pytestmark = pytest.mark.ovs

WAIT_S = 15.0  # generous: only failures ever wait this long
Txn = ovs.db.idl.Transaction


@pytest.fixture
def ovs_sw(uid: str, netns_factory: Callable[..., str],
           ovs_factory: Callable[..., OvsInstance]) -> tuple[OvsInstance, str, str]:
    ns = netns_factory("t")
    inst = ovs_factory(ns)
    inst.add_bridge(f"br{uid}")
    return inst, f"br{uid}", ns


@pytest.fixture
def view(ovs_sw: tuple[OvsInstance, str, str]) -> Iterator[OvsdbView]:
    v = OvsdbView(ovs_sw[0].db_remote)
    try:
        v.wait_connected(WAIT_S)
        yield v
    finally:
        v.close()


def _bridge(idl: ovs.db.idl.Idl, name: str) -> Any:
    return next(b for b in idl.tables["Bridge"].rows.values() if b.name == name)


def _add_port(idl: ovs.db.idl.Idl, txn: Txn, bridge: str, name: str) -> None:
    br = _bridge(idl, bridge)
    iface = txn.insert(idl.tables["Interface"])
    iface.name = name
    port = txn.insert(idl.tables["Port"])
    port.name = name
    port.interfaces = [iface]
    br.verify("ports")
    br.ports = [*(p for p in br.ports if p is not None), port]
    root_row(idl).increment("next_cfg")


def _ports(inst: OvsInstance, bridge: str) -> list[str]:
    return sorted(inst.vsctl("list-ports", bridge).split())


def test_a_conflicting_change_is_read_and_the_changes_staged_again(
        ovs_sw: tuple[OvsInstance, str, str], view: OvsdbView, uid: str) -> None:
    inst, bridge, ns = ovs_sw
    nsl.add_veth(f"a{uid}", f"a{uid}x", ns, ns)
    calls = []

    def stage(idl: ovs.db.idl.Idl, txn: Txn) -> str:
        calls.append(sorted(p.name for p in _bridge(idl, bridge).ports if p is not None))
        if len(calls) == 1:  # someone else adds a port after we read the bridge
            inst.vsctl("--no-wait", "add-port", bridge, f"other{uid}")
        _add_port(idl, txn, bridge, f"a{uid}")
        return "staged"

    done = transact(view, stage, comment="test", timeout=WAIT_S)
    assert done is not None and done.staged == "staged" and done.next_cfg is not None
    assert len(calls) == 2 and f"other{uid}" in calls[1]  # the second stage saw it
    assert _ports(inst, bridge) == sorted([f"a{uid}", f"other{uid}"])  # nothing lost
    wait_applied(view, done.next_cfg, WAIT_S, ports=[f"a{uid}"])
    assert inst.ofport(f"a{uid}") > 0


def test_nothing_to_stage_commits_nothing(ovs_sw: tuple[OvsInstance, str, str],
                                          view: OvsdbView) -> None:
    inst, bridge, _ = ovs_sw
    before = inst.vsctl("get", "Open_vSwitch", ".", "next_cfg")
    assert transact(view, lambda idl, txn: None, comment="test", timeout=WAIT_S) is None
    assert inst.vsctl("get", "Open_vSwitch", ".", "next_cfg") == before


def test_a_port_ovs_cannot_add_is_reported(ovs_sw: tuple[OvsInstance, str, str],
                                           view: OvsdbView, uid: str) -> None:
    _, bridge, _ = ovs_sw
    missing = f"nodev{uid}"  # no such network device

    def stage(idl: ovs.db.idl.Idl, txn: Txn) -> bool:
        _add_port(idl, txn, bridge, missing)
        return True

    done = transact(view, stage, comment="test", timeout=WAIT_S)
    assert done is not None
    with pytest.raises(NotApplied, match=f"could not add port {missing} to {bridge}: "):
        wait_applied(view, done.next_cfg, WAIT_S, ports=[missing])
