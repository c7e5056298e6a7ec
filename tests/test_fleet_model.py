"""topology.fleet: the fleet directory's records and decisions (pure)."""

from __future__ import annotations

import pytest

from topology.fleet import (
    LIVE_FACTOR,
    LIVE_GRACE_MS,
    ApplyReport,
    EndpointRecord,
    FleetRecordError,
    HostRecord,
    HostStatus,
    PolicyGeneration,
    delta,
    fleet_view,
    host_state,
    is_live,
    next_status,
    plan_publish,
    sha256_text,
    wait_state,
)

NOW = 1_800_000_000_000


def ep(mac_last: int, vmid: int = 200, ips: tuple[str, ...] = (), host: str = "h1",
       **kw: object) -> EndpointRecord:
    return EndpointRecord.make(host, f"02:00:00:00:00:{mac_last:02x}", vmid, ips, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- records


def test_endpoint_is_normalized() -> None:
    rec = EndpointRecord.make("h1", "02:AA:00:00:00:01", 7, ["10.0.0.2", "10.0.0.1"],
                              ["2001:DB8::1"])
    assert rec.mac == "02:aa:00:00:00:01"
    assert rec.ipv4 == ("10.0.0.1", "10.0.0.2") and rec.ipv6 == ("2001:db8::1",)
    assert rec.key == ("h1", "02:aa:00:00:00:01")


@pytest.mark.parametrize("kw, why", [
    ({"host": "bad name"}, "host name"),
    ({"mac": "03:00:00:00:00:01"}, "unicast"),
    ({"mac": "nope"}, "unicast"),
    ({"vmid": -1}, "vmid"),
    ({"ipv4": ["10.0.0.300"]}, "10.0.0.300"),
    ({"ipv6": ["10.0.0.1"]}, "10.0.0.1"),
    ({"port_class": "vip"}, "port class"),
    ({"source": "dhcp"}, "source"),
])
def test_endpoint_refuses_what_the_directory_must_not_hold(kw: dict[str, object],
                                                           why: str) -> None:
    args: dict[str, object] = {"host": "h1", "mac": "02:00:00:00:00:01", "vmid": 1, **kw}
    with pytest.raises(FleetRecordError, match=why):
        EndpointRecord.make(**args)  # type: ignore[arg-type]


def test_records_normalize_to_what_the_directory_gives_back() -> None:
    raw = EndpointRecord("h1", "02:AA:00:00:00:01", 7, ("10.0.0.20", "10.0.0.3", "10.0.0.3"))
    assert raw.normalized() == EndpointRecord.make("h1", "02:aa:00:00:00:01", 7,
                                                   ["10.0.0.3", "10.0.0.20"])
    host = HostRecord("h1", "key", ("100.64.0.2", "100.64.0.1"))
    assert host.normalized().mesh_addresses == ("100.64.0.1", "100.64.0.2")
    with pytest.raises(FleetRecordError, match="WireGuard"):
        HostRecord("h1", "").normalized()
    with pytest.raises(FleetRecordError):
        HostRecord("h1", "k", ("nope",)).normalized()


def test_claimed_at_is_not_content() -> None:
    assert ep(1, claimed_at=5) == ep(1, claimed_at=9)


# --------------------------------------------------------------------------- publishing


def test_plan_publish_touches_only_what_differs() -> None:
    current = [ep(1), ep(2), ep(3, ips=("10.0.0.3",))]
    desired = [ep(1), ep(3, ips=("10.0.0.33",)), ep(4)]
    plan = plan_publish("h1", current, desired)
    assert plan.insert == (ep(4),)
    assert plan.update == (ep(3, ips=("10.0.0.33",)),)
    assert plan.delete == (("h1", "02:00:00:00:00:02"),)
    assert not plan_publish("h1", desired, desired)


def test_plan_publish_refuses_another_hosts_endpoint_and_duplicate_macs() -> None:
    with pytest.raises(FleetRecordError, match="cannot publish an endpoint of host"):
        plan_publish("h1", [], [ep(1, host="h2")])
    with pytest.raises(FleetRecordError, match="published twice"):
        plan_publish("h1", [], [ep(1, vmid=1), ep(1, vmid=2)])


# --------------------------------------------------------------------------- deltas


def test_delta_only_looks_at_the_rows_named() -> None:
    before = {"a": ep(1), "b": ep(2), "c": ep(3)}
    after = {"a": ep(1), "b": ep(2, vmid=9), "d": ep(4)}
    d = delta(before, after)
    assert d.added == (ep(4),) and d.removed == (ep(3),)
    assert d.changed == ((ep(2), ep(2, vmid=9)),) and len(d) == 3
    only_b = delta(before, after, ["b"])
    assert only_b.changed == d.changed and not only_b.added and not only_b.removed
    assert not delta(before, before)


# --------------------------------------------------------------------------- status


def test_next_status_applied_and_refused() -> None:
    s = HostStatus("h1", applied_generation=3, applied_at=1)
    refused = next_status(s, ApplyReport(4, "bad tier"), NOW)
    assert (refused.applied_generation, refused.error_generation, refused.apply_error) == \
        (3, 4, "bad tier")  # the host stays on what it enforced
    older = next_status(refused, ApplyReport(3), NOW)
    assert older.error_generation == 4 and older.apply_error == "bad tier"
    fixed = next_status(refused, ApplyReport(5), NOW)
    assert (fixed.applied_generation, fixed.applied_at, fixed.error_generation,
            fixed.apply_error) == (5, NOW, 0, "")


def test_liveness_follows_each_hosts_own_heartbeat() -> None:
    fast = HostStatus("h1", last_seen=NOW - 6_000, heartbeat_interval=1_000)
    slow = HostStatus("h2", last_seen=NOW - 6_000, heartbeat_interval=10_000)
    assert not is_live(fast, NOW) and is_live(slow, NOW)
    edge = LIVE_FACTOR * 1_000 + LIVE_GRACE_MS
    assert is_live(HostStatus("h", last_seen=NOW - edge, heartbeat_interval=1_000), NOW)
    assert not is_live(HostStatus("h", last_seen=NOW - edge - 1, heartbeat_interval=1_000), NOW)
    assert not is_live(None, NOW) and not is_live(HostStatus("h"), NOW)


def test_host_state_and_fleet_view() -> None:
    live = {"last_seen": NOW, "heartbeat_interval": 1_000}
    statuses = [
        HostStatus("ok", applied_generation=5, **live),  # type: ignore[arg-type]
        HostStatus("behind", applied_generation=4, **live),  # type: ignore[arg-type]
        HostStatus("refused", applied_generation=4, error_generation=5, apply_error="x",
                   **live),  # type: ignore[arg-type]
        HostStatus("stale", applied_generation=1, last_seen=NOW - 60_000,
                   heartbeat_interval=1_000),
    ]
    hosts = [HostRecord("ok", "k1", ("10.0.0.1",), "0.2"), HostRecord("nostatus", "k2")]
    view = fleet_view(hosts, statuses, {"ok": 3}, 5, NOW)
    states = {h.name: h.state for h in view.hosts}
    assert states == {"ok": "ok", "behind": "behind", "refused": "refused", "stale": "stale",
                      "nostatus": "unknown"}
    assert [h.name for h in view.behind] == ["behind", "refused"]
    first = view.hosts[[h.name for h in view.hosts].index("ok")]
    assert first.endpoints == 3 and first.version == "0.2"
    assert first.as_dict(NOW)["last_seen_age_s"] == 0.0
    assert host_state(statuses[0], 0, NOW) == "ok"  # nothing pushed yet: nobody is behind


def test_wait_state() -> None:
    st = {
        "a": HostStatus("a", applied_generation=7),
        "b": HostStatus("b", applied_generation=5, error_generation=6, apply_error="old"),
        "c": HostStatus("c", applied_generation=6, error_generation=7, apply_error="no"),
        "d": HostStatus("d", applied_generation=8, error_generation=7, apply_error="no"),
    }
    w = wait_state(7, ["a", "b", "c", "d", "e"], st)
    assert w.applied == ("a", "d") and w.refused == (("c", "no"),)
    assert w.pending == ("b", "e") and not w.done and not w.ok
    assert wait_state(7, ["a", "d"], st).ok


def test_policy_generation_integrity() -> None:
    text = "tiers: {}\n"
    assert PolicyGeneration(1, text, sha256_text(text)).intact
    assert not PolicyGeneration(1, text + " ", sha256_text(text)).intact
