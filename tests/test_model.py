"""Port roles, pipeline declaration, flow computation and reconciliation (no switch)."""

import subprocess
import sys
from pathlib import Path

import pytest

from controller.reconcile import plan
from topology.config import parse_host_config
from topology.flows import desired_state
from topology.model import (
    LEARNED_COOKIE,
    Output,
    Owner,
    SetReg,
    cookie_owner,
    ct_state,
    flow,
)
from topology.pipeline import (
    MESH_PIPELINE,
    SOCKET_PIPELINE,
    PipelineError,
    check_flows,
    pipeline_markdown,
)
from topology.roles import Role, classify_port, container_vmid

CFG = parse_host_config(
    """
bridges:
  mesh: {name: mesh, uplinks: [nm-privacy, "vx-*"], to_socket: to-socket}
  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}
containers:
  100: {mac: "02:00:00:00:01:00", ip: 10.0.0.100/24}
"""
)
PORTS = {
    "mesh": {"nm-privacy": 1, "to-socket": 2, "vx-node2": 3, "eth9": 4},
    "vmbr0": {"from-mesh": 1, "warp0": 2, "veth100": 3, "veth102i0": 4, "veth200": 5,
              "tap201i0": 6, "fwln202o0": 7, "veth350": 8, "eth1": 9},
}


@pytest.mark.parametrize(
    "bridge,name,role,vmid",
    [
        ("mesh", "nm-privacy", Role.MESH_UPLINK, None),
        ("mesh", "vx-node2", Role.MESH_UPLINK, None),
        ("mesh", "to-socket", Role.TO_SOCKET, None),
        ("mesh", "veth100", Role.UNKNOWN, None),
        ("vmbr0", "from-mesh", Role.FROM_MESH, None),
        ("vmbr0", "warp0", Role.WARP, None),
        ("vmbr0", "veth100", Role.PRIVACY, 100),
        ("vmbr0", "veth199i3", Role.PRIVACY, 199),
        ("vmbr0", "tap150i0", Role.PRIVACY, 150),
        ("vmbr0", "fwln120o1", Role.PRIVACY, 120),
        ("vmbr0", "veth200", Role.SERVICE, 200),
        ("vmbr0", "veth201i0", Role.SERVICE, 201),
        ("vmbr0", "tap299i1", Role.SERVICE, 299),
        ("vmbr0", "veth300", Role.UNKNOWN, 300),
        ("vmbr0", "veth99", Role.UNKNOWN, 99),
        ("vmbr0", "tap200", Role.UNKNOWN, None),  # VM taps always carry i<n>
        ("vmbr0", "nm-privacy", Role.UNKNOWN, None),
        ("vmbr0", "vethx100", Role.UNKNOWN, None),
        ("other", "veth100", Role.UNKNOWN, None),
    ],
)
def test_port_roles(bridge, name, role, vmid):
    got = classify_port(CFG, bridge, name)
    assert got.role is role
    assert got.vmid == vmid


def test_container_vmid_patterns():
    assert container_vmid("veth100i0") == 100
    assert container_vmid("fwln205o0") == 205
    assert container_vmid("fwbr205i0") is None


def test_desired_state_passes_pipeline_check_and_is_deterministic():
    a = desired_state(CFG, PORTS)
    b = desired_state(CFG, {k: dict(reversed(v.items())) for k, v in PORTS.items()})
    assert a == b
    assert {f.cookie for f in a["vmbr0"]} == {f.cookie for f in b["vmbr0"]}
    assert len({f.cookie for f in a["vmbr0"]}) == len(a["vmbr0"])  # cookies identify flows


def test_mesh_flows_only_forward_uplinks_and_to_socket():
    mesh = desired_state(CFG, PORTS)["mesh"]
    # (the invalid-source drops match eth_src alone: left out, tested on their own)
    by_in = {f.match_dict.get("in_port"): f for f in mesh
             if f.table == 0 and "eth_src" not in f.match_dict}
    outputs = {k: [a for a in f.actions if isinstance(a, Output)] for k, f in by_in.items()}
    assert outputs[1] == [Output(2)] and outputs[3] == [Output(2)]  # peers -> host only
    assert by_in[2].goto == MESH_PIPELINE["mesh_l2"] and not outputs[2]
    flood = next(f for f in mesh if f.table == MESH_PIPELINE["mesh_l2"] and not f.match)
    assert flood.actions == (Output(1), Output(3))  # to-socket -> every peer, never port 4
    assert 4 not in by_in  # eth9: only the default drop applies
    assert by_in[None].is_drop and by_in[None].priority == 0


def test_vmbr0_classify_has_one_flow_per_known_port():
    flows = desired_state(CFG, PORTS)["vmbr0"]
    classify = {f.match_dict["in_port"] for f in flows if f.table == 0 and f.match}
    assert classify == {1, 2, 3, 4, 5, 6, 7}  # veth350 (no range) and eth1 are dropped


def test_kill_switch_without_warp_port():
    ports = {**PORTS, "vmbr0": {k: v for k, v in PORTS["vmbr0"].items() if k != "warp0"}}
    flows = desired_state(CFG, ports)["vmbr0"]
    egress = [f for f in flows if f.table in (SOCKET_PIPELINE["privacy_egress"],
                                               SOCKET_PIPELINE["privacy_ct"])]
    outputs = {a.port for f in egress for a in f.actions if isinstance(a, Output)}
    assert outputs == {1}  # only replies to mesh-opened connections, via from-mesh
    assert not any(isinstance(a, Output) and a.port == 2 for f in flows for a in f.actions)


def test_privacy_ports_never_in_service_flood():
    flows = desired_state(CFG, PORTS)["vmbr0"]
    flood = next(f for f in flows if f.table == SOCKET_PIPELINE["service_l2"] and not f.match)
    assert {a.port for a in flood.actions} == {5, 6, 7, 1}


def test_pipeline_check_rejects_bad_flows():
    base = list(desired_state(CFG, PORTS)["mesh"])
    with pytest.raises(PipelineError, match="not declared"):
        check_flows(MESH_PIPELINE, [*base, flow(7, 1)])
    with pytest.raises(PipelineError, match="may not match"):
        check_flows(MESH_PIPELINE, [*base, flow(0, 5, eth_dst="02:00:00:00:00:01")])
    with pytest.raises(PipelineError, match="catch-all"):
        check_flows(MESH_PIPELINE, [f for f in base if f.match])
    sock = list(desired_state(CFG, PORTS)["vmbr0"])
    with pytest.raises(PipelineError, match="goto"):
        check_flows(SOCKET_PIPELINE, [*sock, flow(30, 5, reg0=9, goto=10)])


def test_pipeline_doc_lists_every_table_in_order():
    text = pipeline_markdown()
    for p in (MESH_PIPELINE, SOCKET_PIPELINE):
        positions = [text.index(f"`{t.name}`") for t in p.tables]
        assert positions == sorted(positions)


def test_pipeline_doc_is_up_to_date():
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "pipeline.md"
    assert doc.read_text() == pipeline_markdown(), "run: socknet pipeline > docs/pipeline.md"


def test_cookie_owner_bits():
    f = flow(0, 1, in_port=1, owner=Owner.PORTS)
    assert cookie_owner(f.cookie) is Owner.PORTS
    assert cookie_owner(LEARNED_COOKIE) is Owner.LEARNED
    assert cookie_owner(0) is None
    assert f.cookie != flow(0, 1, in_port=2, owner=Owner.PORTS).cookie


def test_ct_state_parsing():
    assert ct_state("+trk+est-rpl") == (0x22, 0x2A)
    with pytest.raises(ValueError):
        ct_state("+bogus")


def test_plan_nothing_to_do_when_installed_matches():
    want = desired_state(CFG, PORTS)["vmbr0"]
    cookies = [f.cookie for f in want] + [LEARNED_COOKIE, LEARNED_COOKIE]
    assert plan(want, cookies).empty


def test_plan_port_change_touches_only_that_port():
    before = desired_state(CFG, PORTS)["vmbr0"]
    ports = {**PORTS, "vmbr0": {**PORTS["vmbr0"], "tap201i0": 10}}  # re-created by Proxmox
    after = desired_state(CFG, ports)["vmbr0"]
    p = plan(after, [f.cookie for f in before])
    added_in_ports = {f.match_dict.get("in_port") for f in p.add if f.table == 0}
    assert added_in_ports == {10}
    deleted = [f for f in before if f.cookie in p.delete_cookies]
    assert {f.match_dict.get("in_port") for f in deleted if f.table == 0} == {6}
    # its spoof guard (learn path) and the service flood (member 6 -> 10) change too
    assert sorted(f.table for f in p.add) == [0, 10, 50]
    assert sorted(f.table for f in deleted) == [0, 10, 50]
    p2 = plan(after, [f.cookie for f in before] + [0x1234])
    assert 0x1234 in p2.delete_cookies  # foreign flows go


def test_plan_removed_port_deletes_its_flows():
    before = desired_state(CFG, PORTS)["vmbr0"]
    ports = {**PORTS, "vmbr0": {k: v for k, v in PORTS["vmbr0"].items() if k != "veth200"}}
    after = desired_state(CFG, ports)["vmbr0"]
    p = plan(after, [f.cookie for f in before])
    gone = {f.cookie for f in before} - {f.cookie for f in after}
    assert set(p.delete_cookies) == gone
    assert any(f.table == 0 and f.match_dict.get("in_port") == 5 for f in before
               if f.cookie in gone)


def test_plan_on_a_switch_without_our_flows_adds_everything_lazily():
    want = desired_state(CFG, PORTS)["vmbr0"]
    fresh = frozenset(flow(f.table, f.priority, actions=f.actions, goto=f.goto, owner=f.owner,
                           **f.match_dict) for f in want)
    for installed in ([], [LEARNED_COOKIE, LEARNED_COOKIE]):
        p = plan(fresh, installed)
        assert set(p.add) == set(want) and len(p.add) == len(want)
        assert not p.delete_cookies and not p.purge_cookies
    # no cookie worked out yet: the sender does that as it packs each flow
    assert all("cookie" not in vars(f) for f in fresh)
    # the same adds as the diff against a switch holding one foreign flow (then deleted)
    diff = plan(want, [0x1234])
    assert set(diff.add) == set(want) and diff.delete_cookies == (0x1234,)
    assert [f.cookie for f in diff.add] == sorted(f.cookie for f in want)
    twice = [*want, *want]
    assert len(plan(twice, []).add) == len(want)


def test_plan_duplicate_cookie_is_purged_then_added():
    want = desired_state(CFG, PORTS)["mesh"]
    one = next(iter(want))
    p = plan(want, [f.cookie for f in want] + [one.cookie])
    assert p.purge_cookies == (one.cookie,) and p.add == (one,)


def test_equal_flows_hash_alike_and_cookies_do_not_depend_on_the_process():
    a = flow(22, 100, eth_type=0x0800, ipv4_src="10.0.0.1", actions=[SetReg("reg2", 7)],
             goto=23, owner=Owner.POLICY, note="one")
    b = flow(22, 100, ipv4_src="10.0.0.1", eth_type=0x0800, actions=[SetReg("reg2", 7)],
             goto=23, owner=Owner.POLICY, note="another")
    assert a == b and hash(a) == hash(b) and a.cookie == b.cookie and len({a, b}) == 1
    code = ("from topology.model import flow, Owner, SetReg; print(flow(22, 100, "
            "eth_type=0x0800, ipv4_src='10.0.0.1', actions=[SetReg('reg2', 7)], goto=23, "
            "owner=Owner.POLICY).cookie)")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={"PYTHONHASHSEED": seed, "PATH": ""},
                             cwd=str(Path(__file__).parent.parent))
        assert int(out.stdout) == a.cookie

