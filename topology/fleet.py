"""The fleet directory's records and every decision taken on them (pure, no I/O).

The clustered fleet database (controller/fleet/fleet.ovsschema) holds, per host,
one ``Host`` row (identity: name, mesh addresses, WireGuard key, version), one
``Host_Status`` row (the often-changing columns: heartbeat, applied policy
generation or the error) and its ``Endpoint`` rows; and the ``Policy``
generations. This module holds the same things as plain values and decides:

* ``plan_publish``: which Endpoint rows a host inserts, updates and deletes so
  that the directory holds exactly the set it publishes (a diff, never a wipe);
* ``delta``: what changed between two views of the directory (added, removed,
  changed endpoints), for the consumers that turn endpoints into flows;
* ``next_status``: the status row after a host reports a policy generation
  applied or refused;
* ``fleet_view`` / ``wait_state``: per host, is it live, which generation it
  enforces, and whether a push has reached every host that was live.

Times are integers in milliseconds since the epoch (OVSDB has no float-free
timestamp type; milliseconds stay exact in its 64-bit integers).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
PORT_CLASSES = ("privacy", "service", "other")
SOURCES = ("proxmox", "host.yaml", "learned")
# A host is live while its last heartbeat is younger than LIVE_FACTOR heartbeats
# (plus LIVE_GRACE_MS for clock skew between hosts and a slow commit).
LIVE_FACTOR = 3
LIVE_GRACE_MS = 2000

HostState = Literal["ok", "behind", "refused", "stale", "unknown"]


class FleetRecordError(ValueError):
    """A record that the directory must not hold (bad name, MAC, address, class)."""


def check_host_name(name: str) -> str:
    """``name`` if it can be a host's identity (certificate CN, RBAC key), else raise."""
    if not isinstance(name, str) or not HOST_NAME_RE.match(name):
        raise FleetRecordError(f"{name!r} is not a host name (1-63 of A-Z a-z 0-9 . _ -, "
                               "starting with a letter or digit)")
    return name


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, order=True)
class EndpointRecord:
    """One container or VM interface, as a host publishes it.

    Identity within the directory is ``(host, mac)``. ``claimed_at`` (ms) is set by
    the publishing host when the row is first inserted; it is not part of the
    content (two records that differ only in it are equal), so re-publishing never
    rewrites it.
    """

    host: str
    mac: str
    vmid: int
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    port_class: str = "service"
    source: str = "proxmox"
    claimed_at: int = field(default=0, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.mac)

    @classmethod
    def make(cls, host: str, mac: str, vmid: int, ipv4: Iterable[str] = (),
             ipv6: Iterable[str] = (), port_class: str = "service", source: str = "proxmox",
             claimed_at: int = 0) -> EndpointRecord:
        """A normalized, validated record (lower-case MAC, sorted canonical addresses)."""
        check_host_name(host)
        mac = str(mac).lower()
        if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
            raise FleetRecordError(f"{host}: {mac!r} is not a unicast MAC address")
        if not isinstance(vmid, int) or vmid < 0:
            raise FleetRecordError(f"{host} {mac}: vmid {vmid!r} is not a non-negative integer")
        if port_class not in PORT_CLASSES:
            raise FleetRecordError(f"{host} {mac}: port class {port_class!r} not one of "
                                   f"{', '.join(PORT_CLASSES)}")
        if source not in SOURCES:
            raise FleetRecordError(f"{host} {mac}: source {source!r} not one of "
                                   f"{', '.join(SOURCES)}")
        try:
            v4 = tuple(sorted({str(ipaddress.IPv4Address(a)) for a in ipv4}))
            v6 = tuple(sorted({str(ipaddress.IPv6Address(a)) for a in ipv6}))
        except ValueError as exc:
            raise FleetRecordError(f"{host} {mac}: {exc}") from None
        return cls(host, mac, vmid, v4, v6, port_class, source, claimed_at)

    def normalized(self) -> EndpointRecord:
        """The same record validated and in canonical form (as read back from the
        directory): compare only canonical records, or every publish rewrites rows."""
        return EndpointRecord.make(self.host, self.mac, self.vmid, self.ipv4, self.ipv6,
                                   self.port_class, self.source, self.claimed_at)


@dataclass(frozen=True)
class HostRecord:
    """A host's identity row (``Host``); changes rarely."""

    name: str
    wg_public_key: str
    mesh_addresses: tuple[str, ...] = ()
    version: str = ""

    def normalized(self) -> HostRecord:
        """Validated, addresses canonical and sorted (as read back from the directory)."""
        check_host_name(self.name)
        try:
            addrs = tuple(sorted({str(ipaddress.ip_address(a)) for a in self.mesh_addresses}))
        except ValueError as exc:
            raise FleetRecordError(f"{self.name}: {exc}") from None
        if not self.wg_public_key:
            raise FleetRecordError(f"{self.name}: no WireGuard public key")
        return replace(self, mesh_addresses=addrs)


@dataclass(frozen=True)
class HostStatus:
    """A host's ``Host_Status`` row: only status readers monitor it (not the controllers),
    so its heartbeat does not wake every host (OVN's Chassis_Private)."""

    name: str
    last_seen: int = 0
    heartbeat_interval: int = 10_000
    applied_generation: int = 0
    applied_at: int = 0
    error_generation: int = 0
    apply_error: str = ""


@dataclass(frozen=True)
class PolicyGeneration:
    """One pushed policy (``Policy`` row)."""

    generation: int
    text: str
    sha256: str
    pushed_at: int = 0
    pushed_by: str = ""

    @property
    def intact(self) -> bool:
        """The text is what was pushed (its digest matches)."""
        return sha256_text(self.text) == self.sha256


@dataclass(frozen=True)
class ApplyReport:
    """What a host reports after trying a policy generation: applied (error None) or
    refused with the reason."""

    generation: int
    error: str | None = None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class PublishPlan:
    """Rows to change so the directory holds exactly a host's desired endpoints."""

    insert: tuple[EndpointRecord, ...] = ()
    update: tuple[EndpointRecord, ...] = ()  # the new content, found by (host, mac)
    delete: tuple[tuple[str, str], ...] = ()  # keys

    def __bool__(self) -> bool:
        return bool(self.insert or self.update or self.delete)


def plan_publish(host: str, current: Iterable[EndpointRecord],
                 desired: Iterable[EndpointRecord]) -> PublishPlan:
    """The inserts, updates and deletes that turn ``current`` (the host's rows now in
    the directory) into ``desired``. Raises FleetRecordError if ``desired`` names
    another host or the same MAC twice (the directory keys rows by host and MAC)."""
    want: dict[tuple[str, str], EndpointRecord] = {}
    for rec in desired:
        if rec.host != host:
            raise FleetRecordError(f"{host} cannot publish an endpoint of host {rec.host!r}")
        if rec.key in want and want[rec.key] != rec:
            raise FleetRecordError(f"{host}: MAC {rec.mac} published twice")
        want[rec.key] = rec
    have = {rec.key: rec for rec in current}
    return PublishPlan(
        insert=tuple(sorted(r for k, r in want.items() if k not in have)),
        update=tuple(sorted(r for k, r in want.items() if k in have and have[k] != r)),
        delete=tuple(sorted(k for k in have if k not in want)),
    )


# --------------------------------------------------------------------------- deltas


@dataclass(frozen=True)
class EndpointDelta:
    """What changed in the directory since the previous delta.

    ``full_sync``: the client had to fetch the whole directory again (first
    connect, or a reconnect the server could not answer with a delta); the delta
    is still exact (computed against what was delivered before).
    """

    added: tuple[EndpointRecord, ...] = ()
    removed: tuple[EndpointRecord, ...] = ()
    changed: tuple[tuple[EndpointRecord, EndpointRecord], ...] = ()  # (old, new)
    full_sync: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __len__(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


def delta(before: Mapping[str, EndpointRecord], after: Mapping[str, EndpointRecord],
          keys: Iterable[str] | None = None, *, full_sync: bool = False) -> EndpointDelta:
    """Endpoints added, removed and changed from ``before`` to ``after`` (both keyed by
    row id). ``keys``: only these rows may differ (the rows the server named), so the
    cost is O(changes), not O(directory); None compares everything."""
    added, removed, changed = [], [], []
    for k in (keys if keys is not None else before.keys() | after.keys()):
        old, new = before.get(k), after.get(k)
        if old is None and new is not None:
            added.append(new)
        elif old is not None and new is None:
            removed.append(old)
        elif old is not None and new is not None and old != new:
            changed.append((old, new))
    return EndpointDelta(tuple(sorted(added)), tuple(sorted(removed)),
                         tuple(sorted(changed)), full_sync)


# --------------------------------------------------------------------------- status


def next_status(prev: HostStatus, report: ApplyReport, now_ms: int) -> HostStatus:
    """The status row after ``report``. Applying generation g clears an error of an
    older generation; a refusal keeps the generation in force (the host stays on
    what it enforced before) and records which generation it refused and why."""
    if report.error is None:
        cleared = report.generation >= prev.error_generation
        return replace(prev, applied_generation=report.generation, applied_at=now_ms,
                       error_generation=0 if cleared else prev.error_generation,
                       apply_error="" if cleared else prev.apply_error)
    return replace(prev, error_generation=report.generation, apply_error=report.error[:4000])


def is_live(status: HostStatus | None, now_ms: int) -> bool:
    """True if the host's last heartbeat is recent (its own interval, LIVE_FACTOR times)."""
    if status is None or status.last_seen <= 0:
        return False
    return now_ms - status.last_seen <= LIVE_FACTOR * status.heartbeat_interval + LIVE_GRACE_MS


def host_state(status: HostStatus | None, latest: int, now_ms: int) -> HostState:
    """ok: enforces the latest generation; refused: live, and its last answer to the
    latest generation was an error; behind: live, not there yet; stale: no recent
    heartbeat; unknown: never reported."""
    if status is None:
        return "unknown"
    if not is_live(status, now_ms):
        return "stale"
    if status.applied_generation >= latest:
        return "ok"
    if status.error_generation >= latest:
        return "refused"
    return "behind"


@dataclass(frozen=True)
class HostView:
    """One line of ``socknet fleet status``."""

    name: str
    state: HostState
    live: bool
    version: str | None  # None: no Host row (only a status row)
    mesh_addresses: tuple[str, ...]
    last_seen: int | None
    applied_generation: int
    error_generation: int
    apply_error: str
    endpoints: int

    def as_dict(self, now_ms: int) -> dict[str, object]:
        age = None if self.last_seen is None else round((now_ms - self.last_seen) / 1000, 1)
        return {"name": self.name, "state": self.state, "live": self.live,
                "version": self.version, "mesh_addresses": list(self.mesh_addresses),
                "last_seen_ms": self.last_seen, "last_seen_age_s": age,
                "applied_generation": self.applied_generation,
                "error_generation": self.error_generation or None,
                "apply_error": self.apply_error or None, "endpoints": self.endpoints}


@dataclass(frozen=True)
class FleetView:
    latest_generation: int  # 0: no policy pushed yet
    hosts: tuple[HostView, ...]

    @property
    def behind(self) -> tuple[HostView, ...]:
        """Live hosts that do not enforce the latest generation (exit 1)."""
        return tuple(h for h in self.hosts if h.live and h.state != "ok")


def fleet_view(hosts: Iterable[HostRecord], statuses: Iterable[HostStatus],
               endpoint_counts: Mapping[str, int], latest: int, now_ms: int) -> FleetView:
    """Every host that has a Host or a Host_Status row, sorted by name."""
    by_host = {h.name: h for h in hosts}
    by_status = {s.name: s for s in statuses}
    views = []
    for name in sorted(by_host.keys() | by_status.keys()):
        h, s = by_host.get(name), by_status.get(name)
        views.append(HostView(
            name=name, state=host_state(s, latest, now_ms), live=is_live(s, now_ms),
            version=h.version if h is not None else None,
            mesh_addresses=h.mesh_addresses if h is not None else (),
            last_seen=s.last_seen if s is not None and s.last_seen > 0 else None,
            applied_generation=s.applied_generation if s is not None else 0,
            error_generation=s.error_generation if s is not None else 0,
            apply_error=s.apply_error if s is not None else "",
            endpoints=endpoint_counts.get(name, 0)))
    return FleetView(latest, tuple(views))


@dataclass(frozen=True)
class WaitState:
    """Where a ``policy push --wait`` stands for the hosts it waits for."""

    generation: int
    applied: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (host, error)
    pending: tuple[str, ...]

    @property
    def done(self) -> bool:
        """Every host answered (applied or refused)."""
        return not self.pending

    @property
    def ok(self) -> bool:
        return self.done and not self.refused


def wait_state(generation: int, hosts: Iterable[str],
               statuses: Mapping[str, HostStatus]) -> WaitState:
    """A host answered ``generation`` once it applied it (or a later one), or refused
    it (or a later one) without having applied it since."""
    applied, refused, pending = [], [], []
    for name in sorted(set(hosts)):
        s = statuses.get(name)
        if s is not None and s.applied_generation >= generation:
            applied.append(name)
        elif s is not None and s.error_generation >= generation:
            refused.append((name, s.apply_error))
        else:
            pending.append(name)
    return WaitState(generation, tuple(applied), tuple(refused), tuple(pending))
