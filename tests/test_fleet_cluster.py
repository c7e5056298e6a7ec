"""The fleet database for real: a 3-member ovsdb-server Raft cluster over TLS, each
member in its own network namespace (labs/fleet_lab.py), hosts as FleetClients
inside namespaces of their own, presenting their own certificates.

One lab for the module (the cluster takes ~1 s to form); tests use their own MACs
and hosts so they do not depend on each other's rows. The failure tests kill
members and start them again, leaving the cluster whole for the next test.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from controller.cli import main
from labs.fleet_lab import FleetLab, SimHost, wait_for
from labs.waiting import eventually
from topology.fleet import EndpointDelta, EndpointRecord

pytestmark = pytest.mark.ovs

def _policy(rule_port: int) -> str:
    return f"""\
tiers:
  app: {{cidrs: [10.20.0.0/24]}}
  db:  {{cidrs: [10.30.0.0/24]}}
policy:
  default: deny
  rules:
    - {{name: app-db, from: app, to: db, tcp: [{rule_port}]}}
tests:
  - {{from: 10.20.0.5, to: 10.30.0.9, tcp: {rule_port}, expect: allow, rule: app-db}}
  - {{from: 10.30.0.9, to: 10.20.0.5, tcp: 3000, expect: deny}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetLab]:
    lab = FleetLab(f"fl{secrets.token_hex(2)}", tmp_path_factory.mktemp("fleet"),
                   members=3, hosts=3)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def hosts(lab: FleetLab) -> Iterator[list[SimHost]]:
    """Simulated hosts the test starts; all stopped at teardown."""
    started: list[SimHost] = []
    try:
        yield started
    finally:
        for h in started:
            h.stop()


def _ep(host: str, n: int, vmid: int = 200, ip: str | None = None) -> EndpointRecord:
    return EndpointRecord.make(host, f"02:00:00:{n // 256:02x}:{n % 256:02x}:01", vmid,
                               [ip] if ip else [])


def _dump(lab: FleetLab) -> dict[str, Any]:
    tables = ("Host", "Host_Status", "Endpoint", "Policy", "Fleet_Global", "Connection",
              "RBAC_Role", "RBAC_Permission")
    return {t: sorted(json.dumps(r, sort_keys=True) for r in lab.select(t)) for t in tables}


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- cluster


def test_cluster_write_on_one_member_read_on_another(lab: FleetLab) -> None:
    """A host's write over TLS through one follower is committed by the cluster and read
    back from the other members (their admin sockets)."""
    leader = lab.leader()
    assert leader is not None
    follower = next(m for m in (1, 2, 3) if m != leader)
    row = {"host": "host4", "mac": "02:00:00:aa:00:01", "vmid": 201, "port_class": "service",
           "source": "proxmox", "claimed_at": 1}
    reply = lab.transact_as(4, [{"op": "insert", "table": "Endpoint", "row": row}],
                            member=follower)
    assert "uuid" in reply[0], reply
    where = [["mac", "==", row["mac"]]]
    for m in (1, 2, 3):
        wait_for(lambda m=m: lab.select("Endpoint", where, member=m), f"row on member {m}")
    lab.transact_as(4, [{"op": "delete", "table": "Endpoint", "where": where}], member=leader)
    wait_for(lambda: not lab.select("Endpoint", where, member=follower), "delete replicated")


def test_tls_refuses_a_certificate_of_another_ca(lab: FleetLab, tmp_path: Path) -> None:
    from controller.fleet import pki

    rogue_ca = tmp_path / "rogue"
    pki.create_ca(rogue_ca, "rogue CA")
    files = pki.issue_cert(rogue_ca, "host4", pki.host_files(tmp_path, "host4"))
    remote = f"ssl:{lab.address(1)}:6641"
    proc = lab.ovsdb_client(4, "--timeout=5", "list-dbs", remote, identity="host4")
    assert proc.returncode == 0 and "Fleet" in proc.stdout  # the lab's own certificate
    from labs import netns as nsl

    rogue = nsl.run(lab.ns(4), ["ovsdb-client", f"--private-key={files.key}",
                                f"--certificate={files.cert}",
                                f"--ca-cert={lab.identity('host4').ca_cert}", "--timeout=5",
                                "list-dbs", remote], timeout=15)
    assert rogue.returncode != 0


# --------------------------------------------------------------------------- RBAC


def test_rbac_a_host_writes_only_its_own_rows(lab: FleetLab) -> None:
    """host5 may write its own Host/Host_Status/Endpoint rows; every write to another
    host's rows, to the identity columns, to the policy or to the listener/RBAC
    tables is a permission error and changes nothing."""
    for n in (5, 6):
        name = lab.host_name(n)
        ops = [
            {"op": "insert", "table": "Host", "row": {"name": name, "wg_public_key": f"k{n}"}},
            {"op": "insert", "table": "Host_Status", "row": {"name": name, "last_seen": 1}},
            {"op": "insert", "table": "Endpoint",
             "row": {"host": name, "mac": f"02:00:00:bb:00:0{n}", "vmid": 200 + n,
                     "port_class": "service", "source": "proxmox"}},
        ]
        reply = lab.transact_as(n, ops, member=n % 3 + 1)
        assert all("uuid" in r for r in reply), reply  # its own rows: allowed
    before = _dump(lab)

    other = [["host", "==", "host6"]]
    attempts = {
        "insert another host's endpoint": {
            "op": "insert", "table": "Endpoint",
            "row": {"host": "host6", "mac": "02:00:00:bb:01:05", "vmid": 300,
                    "port_class": "service", "source": "proxmox"}},
        "update another host's endpoint": {
            "op": "update", "table": "Endpoint", "where": other, "row": {"vmid": 999}},
        "delete another host's endpoint": {"op": "delete", "table": "Endpoint", "where": other},
        "mutate another host's endpoint": {
            "op": "mutate", "table": "Endpoint", "where": other,
            "mutations": [["ipv4", "insert", ["set", ["10.9.9.9"]]]]},
        "move its own endpoint to another host": {
            "op": "update", "table": "Endpoint", "where": [["host", "==", "host5"]],
            "row": {"host": "host6"}},
        "change its own endpoint's MAC": {
            "op": "update", "table": "Endpoint", "where": [["host", "==", "host5"]],
            "row": {"mac": "02:00:00:bb:02:05"}},
        "rename its own Host row": {
            "op": "update", "table": "Host", "where": [["name", "==", "host5"]],
            "row": {"name": "host6"}},
        "update another host's Host row": {
            "op": "update", "table": "Host", "where": [["name", "==", "host6"]],
            "row": {"wg_public_key": "stolen"}},
        "update another host's status": {
            "op": "update", "table": "Host_Status", "where": [["name", "==", "host6"]],
            "row": {"applied_generation": 99}},
        "delete another host's Host row": {
            "op": "delete", "table": "Host", "where": [["name", "==", "host6"]]},
        "write a policy": {
            "op": "insert", "table": "Policy",
            "row": {"generation": 99, "text": "x", "sha256": "y"}},
        "drop the listener's role": {
            "op": "update", "table": "Connection", "where": [], "row": {"role": ""}},
        "grant itself more": {
            "op": "update", "table": "RBAC_Permission", "where": [],
            "row": {"authorization": ["set", [""]]}},
        "add a role": {"op": "insert", "table": "RBAC_Role", "row": {"name": "x"}},
    }
    for what, op in attempts.items():
        for member in (1, 2):
            reply = lab.transact_as(5, [op], member=member)
            assert reply[0].get("error") == "permission error", (what, member, reply)
    assert _dump(lab) == before


# --------------------------------------------------------------------------- client


def test_client_publishes_a_diff_and_others_get_deltas(lab: FleetLab,
                                                       hosts: list[SimHost]) -> None:
    a, b = SimHost(lab, 4).start(), SimHost(lab, 5).start()
    hosts += [a, b]
    seen: list[EndpointDelta] = []
    b.client.on_change(seen.append)
    wait_for(lambda: a.client.connected and b.client.connected, "clients connected")
    eps = [_ep("host4", i, 200 + i, f"10.0.0.{i}") for i in range(1, 6)]
    a.client.publish(eps)
    wait_for(lambda: set(b.client.endpoints().values()) >= set(eps), "b sees a's endpoints")
    where = [["host", "==", "host4"]]
    versions = {r["mac"]: r["_version"][1] for r in lab.select("Endpoint", where)}

    changed = EndpointRecord.make("host4", eps[0].mac, 201, ["10.0.0.99"])
    new = _ep("host4", 42, 242)
    a.client.publish([changed, *eps[1:4], new])  # eps[4] withdrawn
    wait_for(lambda: set(b.client.endpoints(include_own=False).values())
             >= {changed, new} and eps[4].key not in b.client.endpoints(), "b follows")
    after = {r["mac"]: r["_version"][1] for r in lab.select("Endpoint", where)}
    # only the changed row was rewritten; the untouched ones kept their version
    assert {m for m in versions if m in after and after[m] != versions[m]} == {eps[0].mac}
    assert eps[4].mac not in after and new.mac in after
    flat_added = [e for d in seen for e in d.added if e.host == "host4"]
    flat_removed = [e for d in seen for e in d.removed]
    flat_changed = [(o, n) for d in seen for o, n in d.changed]
    assert set(flat_added) == {*eps, new}
    assert flat_removed == [eps[4]]
    assert [(o.ipv4, n.ipv4) for o, n in flat_changed] == [(("10.0.0.1",), ("10.0.0.99",))]
    assert not any(e.host == "host5" for d in seen for e in d.added)  # own rows not echoed
    # the status row: only the host's own is replicated to it (no fan-out)
    b_status = lab.select("Host_Status", [["name", "==", "host5"]])
    assert b_status and b.client.own_status() is not None
    assert len(b.client.idl.tables["Host_Status"].rows) == 1
    # a record as a caller may build it (unsorted addresses, upper-case MAC) is written
    # once, not rewritten on every pass
    raw = EndpointRecord("host4", "02:00:00:AB:00:01", 300, ("10.0.0.3", "10.0.0.20"))
    a.client.publish([raw])
    wait_for(lambda: a.client.in_sync, "a in sync")
    commits = a.client.stats.commits_ok
    a.client.wakeup()
    assert not eventually(lambda: a.client.stats.commits_ok > commits + 2, 1.0)  # heartbeats
    a.client.publish([])
    wait_for(lambda: not lab.select("Endpoint", where), "a withdrew everything")


# --------------------------------------------------------------------------- policy


def test_policy_push_wait_and_fleet_status(lab: FleetLab, hosts: list[SimHost]) -> None:
    admin = lab.admin_remote(2)
    refusing: dict[str, bool] = {"on": True}
    h4 = SimHost(lab, 4).start()
    h5 = SimHost(lab, 5, refuse=lambda g: "port 5433 not supported here"
                 if refusing["on"] and "5433" in g.text else None).start()
    hosts += [h4, h5]
    wait_for(lambda: all(h.client.own_status() is not None for h in (h4, h5)), "heartbeats")

    tmp = lab.workdir / "policy.yaml"
    bad = _policy(5432).replace("tcp: 5432, expect: allow", "tcp: 22, expect: allow")
    tmp.write_text(bad)
    res = _cli("policy", "push", str(tmp), "--db", admin)
    assert res.exit_code == 1 and "not pushed" in res.output  # its own tests fail
    before = lab.select("Policy")

    tmp.write_text(_policy(5432))
    res = _cli("policy", "push", str(tmp), "--db", admin, "--wait", "--timeout", "20")
    assert res.exit_code == 0, res.output
    gen = max(r["generation"] for r in lab.select("Policy"))
    assert len(lab.select("Policy")) == len(before) + 1
    assert gen in h4.applied and gen in h5.applied
    assert f"generation {gen} applied by all" in res.output

    res = _cli("fleet", "status", "--db", admin, "--json")
    data = json.loads(res.output)
    assert res.exit_code == 0, res.output
    assert data["latest_generation"] == gen
    by_name = {h["name"]: h for h in data["hosts"]}
    assert by_name["host4"]["state"] == "ok" and by_name["host4"]["live"]

    tmp.write_text(_policy(5433))  # host5 refuses it
    res = _cli("policy", "push", str(tmp), "--db", admin, "--wait", "--timeout", "20")
    assert res.exit_code == 1, res.output
    assert "host5: refused: port 5433 not supported here" in res.output
    assert "host4: applied" in res.output
    assert "not applied by: host5 (refused)" in res.output
    res = _cli("fleet", "status", "--db", admin, "--json")
    assert res.exit_code == 1
    data = json.loads(res.output)
    assert data["behind"] == ["host5"]
    assert {h["name"]: h for h in data["hosts"]}["host5"]["state"] == "refused"

    refusing["on"] = False
    hung = SimHost(lab, 6, answer=False).start()  # live, never applies anything
    hosts.append(hung)
    wait_for(lambda: hung.client.own_status() is not None, "hung host's heartbeat")
    tmp.write_text(_policy(5434))
    res = _cli("policy", "push", str(tmp), "--db", admin, "--wait", "--timeout", "3")
    assert res.exit_code == 1, res.output
    assert "host6: no answer within 3s" in res.output
    assert "host4: applied" in res.output and "host5: applied" in res.output

    hung.stop()  # a stopped host goes stale and is no longer waited for
    hosts.remove(hung)
    wait_for(lambda: json.loads(_cli("fleet", "status", "--db", admin, "--json").output)
             ["behind"] == [], "host6 stale", timeout_s=30)
    res = _cli("policy", "push", str(tmp), "--db", admin, "--wait", "--timeout", "20")
    assert res.exit_code == 0, res.output
    assert "already the latest" in res.output


# --------------------------------------------------------------------------- failures


def test_leader_killed_writes_resume_without_full_resync(lab: FleetLab,
                                                         hosts: list[SimHost]) -> None:
    """Kill the Raft leader while a host's client is connected to it: the others elect
    a new leader, the client moves to another member, catches up from where it was
    (monitor_cond_since: no second full dump), and its writes go through again."""
    leader = lab.leader()
    assert leader is not None
    a = SimHost(lab, 4).start()
    b = SimHost(lab, 5).start()
    hosts += [a, b]
    wait_for(lambda: a.client.connected and b.client.connected, "connected")
    for _ in range(6):  # put a's client on the leader (the IDL picks members at random)
        if a.member() == leader:
            break
        count = a.client.stats.reconnects
        a.client.force_reconnect()
        wait_for(lambda c=count: a.client.stats.reconnects > c and a.client.connected,
                 "reconnected")
    assert a.member() == leader
    a.client.publish([_ep("host4", 100)])
    wait_for(lambda: _ep("host4", 100).key in b.client.endpoints(), "first write")

    lab.kill(leader)
    a.client.publish([_ep("host4", 100), _ep("host4", 101)])
    wait_for(lambda: _ep("host4", 101).key in b.client.endpoints(), "write after election",
             timeout_s=30)
    assert lab.leader() not in (None, leader)
    assert a.member() != leader and a.client.stats.reconnects >= 1
    assert a.client.stats.full_syncs == 1 and b.client.stats.full_syncs == 1

    lab.start(leader)  # it rejoins and catches up
    wait_for(lambda: lab.select("Endpoint", [["host", "==", "host4"]], member=leader)
             and len(lab.select("Endpoint", [["host", "==", "host4"]], member=leader)) == 2,
             "restarted member caught up")
    a.client.publish([])


def test_client_resyncs_changes_made_while_it_was_away(lab: FleetLab,
                                                       hosts: list[SimHost]) -> None:
    """Hold a host's client still (its callback blocks its loop), kill the member it
    talks to and change the directory meanwhile: released, it reconnects elsewhere
    and receives exactly the changes as a delta, not a new full dump."""
    a, b = SimHost(lab, 4).start(), SimHost(lab, 5).start()
    hosts += [a, b]
    gate, held = threading.Event(), threading.Event()
    seen: list[EndpointDelta] = []

    def hold(d: EndpointDelta) -> None:
        seen.append(d)
        if any(e.mac == _ep("host4", 1).mac for e in d.added):
            held.set()
            gate.wait(30)

    b.client.on_change(hold)
    wait_for(lambda: a.client.connected and b.client.connected, "connected")
    keep = [_ep("host4", i) for i in range(2, 6)]
    a.client.publish([*keep, _ep("host4", 1)])
    wait_for(held.is_set, "b's loop held")
    member = b.member()
    assert member is not None
    lab.kill(member)
    changed = EndpointRecord.make("host4", keep[0].mac, 777)
    final = [changed, *keep[1:], _ep("host4", 9)]
    a.client.publish(final)
    wait_for(lambda: a.client.in_sync, "a's change committed", timeout_s=30)
    gate.set()
    wait_for(lambda: {e for e in b.client.endpoints().values() if e.host == "host4"}
             == set(final), "b caught up", timeout_s=30)
    assert b.client.stats.reconnects == 1 and b.client.stats.full_syncs == 1
    catch_up = [d for d in seen if not d.full_sync][-3:]
    got_removed = {e.mac for d in catch_up for e in d.removed}
    assert _ep("host4", 1).mac in got_removed
    lab.start(member)
    wait_for(lambda: lab.status(member).get("status") == "cluster member", "member back")
    a.client.publish([])


def test_a_host_reads_status_over_tls_but_cannot_push(lab: FleetLab, hosts: list[SimHost],
                                                      tmp_path: Path) -> None:
    """`socknet fleet status` and `policy push` with a plain host's host.yaml: they go
    to the members over TLS with its certificate; reading works, RBAC refuses the push."""
    import os
    import sys

    from labs import netns as nsl

    h4 = SimHost(lab, 4).start()
    hosts.append(h4)
    wait_for(lambda: h4.client.own_status() is not None, "heartbeat")
    key, cert, ca = lab.tls(5)
    members = ", ".join(lab.member_addresses)
    (tmp_path / "host.yaml").write_text(
        f"host: host5\nbridges: {{mesh: {{}}, socket: {{}}}}\n"
        f"fleet:\n  members: [{members}]\n"
        f"  tls: {{key: {key}, cert: {cert}, ca_cert: {ca}}}\n")
    (tmp_path / "p.yaml").write_text(_policy(6000))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def cli(*args: str) -> Any:
        return nsl.run(lab.ns(5), [sys.executable, "-m", "controller.cli", *args,
                                   "-c", str(tmp_path / "host.yaml")], env=env, timeout=60)

    res = cli("fleet", "status", "--json")
    assert res.returncode in (0, 1), res.stderr
    assert "host4" in {h["name"] for h in json.loads(res.stdout)["hosts"]}
    before = lab.select("Policy")
    res = cli("policy", "push", str(tmp_path / "p.yaml"))
    assert res.returncode == 1 and "permission error" in res.stderr, res.stderr
    assert lab.select("Policy") == before
