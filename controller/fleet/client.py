"""A host's connection to the fleet database (python-ovs IDL): publish, follow, report.

``FleetClient`` keeps an IDL replica of the directory (every ``Host``,
``Endpoint`` and ``Policy`` row; of ``Host_Status`` only this host's own row)
and, from one thread (``run`` / ``start``), does all of its I/O:

* ``publish(endpoints)``: the host's endpoints as a set. The client diffs it
  against this host's rows in the database (``topology.fleet.plan_publish``) and
  writes only the difference, in one transaction; again after a reconnect or a
  failed commit, until the database holds exactly that set.
* ``on_change(callback)``: other hosts' endpoints as deltas (added, removed,
  changed). The IDL names the rows the server changed, so a delta costs
  O(changes); only a full re-dump (first connect, or a reconnect the server
  could not answer from its history) compares everything, and is flagged.
* ``on_policy(callback)``: the latest policy generation, each time it changes
  (generations whose text does not match their digest are refused here).
* ``report(ApplyReport)``: the generation applied or the error, into this host's
  ``Host_Status`` row, whose ``last_seen`` also beats every ``heartbeat_s``.
  No controller monitors other hosts' status rows (the IDL asks the server for
  its own row only), so heartbeats do not fan out to every host.

Reads go to any member (``leader_only=False``): the IDL takes a comma-separated
list of members and moves to another one when its member fails or falls out of
the cluster. After a reconnect it asks for the changes since the last
transaction it saw (``monitor_cond_since``); ``stats.full_syncs`` counts the
times the whole directory had to be fetched instead.

Callbacks run on the client's thread, outside its locks: keep them short;
``publish``/``report`` may be called from them and from any other thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ovs.db.idl
import ovs.json
import ovs.poller

from controller.fleet.schema import (
    ENDPOINT,
    HOST,
    HOST_STATUS,
    POLICY,
    SCHEMA_PATH,
)
from controller.fleet.tlsstream import remotes_with_identity
from topology.fleet import (
    ApplyReport,
    EndpointDelta,
    EndpointRecord,
    HostRecord,
    HostStatus,
    PolicyGeneration,
    delta,
    next_status,
    plan_publish,
)

log = logging.getLogger(__name__)

RECONNECT_MIN_BACKOFF_MS = 1000  # python-ovs refuses anything below 1000
RECONNECT_MAX_BACKOFF_MS = 2000
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0  # after a failed commit
IDLE_WAKE_S = 1.0

COLUMNS: dict[str, list[str]] = {
    HOST: ["name", "mesh_addresses", "wg_public_key", "version"],
    HOST_STATUS: ["name", "last_seen", "heartbeat_interval", "applied_generation",
                  "applied_at", "error_generation", "apply_error"],
    ENDPOINT: ["host", "vmid", "mac", "ipv4", "ipv6", "port_class", "source", "claimed_at"],
    POLICY: ["generation", "text", "sha256", "pushed_at", "pushed_by"],
}

DeltaCallback = Callable[[EndpointDelta], None]
PolicyCallback = Callable[[PolicyGeneration], None]


def now_ms() -> int:
    return int(time.time() * 1000)


def schema_helper(columns: dict[str, list[str]], path: Path = SCHEMA_PATH
                  ) -> ovs.db.idl.SchemaHelper:
    """A SchemaHelper from the shipped schema file with ``columns`` registered."""
    helper = ovs.db.idl.SchemaHelper(schema_json=ovs.json.from_file(str(path)))
    for table, cols in columns.items():
        helper.register_columns(table, cols)
    return helper


def endpoint_of(row: Any) -> EndpointRecord:
    return EndpointRecord(host=row.host, mac=row.mac, vmid=row.vmid,
                          ipv4=tuple(sorted(row.ipv4)), ipv6=tuple(sorted(row.ipv6)),
                          port_class=row.port_class, source=row.source,
                          claimed_at=row.claimed_at)


def host_of(row: Any) -> HostRecord:
    return HostRecord(name=row.name, wg_public_key=row.wg_public_key,
                      mesh_addresses=tuple(sorted(row.mesh_addresses)), version=row.version)


def status_of(row: Any) -> HostStatus:
    return HostStatus(name=row.name, last_seen=row.last_seen,
                      heartbeat_interval=row.heartbeat_interval,
                      applied_generation=row.applied_generation, applied_at=row.applied_at,
                      error_generation=row.error_generation, apply_error=row.apply_error)


def policy_of(row: Any) -> PolicyGeneration:
    return PolicyGeneration(generation=row.generation, text=row.text, sha256=row.sha256,
                            pushed_at=row.pushed_at, pushed_by=row.pushed_by)


class TrackingIdl(ovs.db.idl.Idl):
    """An IDL that remembers which rows the server changed since ``take_changes()``,
    and whether it had to drop its whole replica (a full re-dump follows)."""

    def __init__(self, remote: str, helper: ovs.db.idl.SchemaHelper, **kw: Any) -> None:
        super().__init__(remote, helper, **kw)
        self.changed_rows: dict[str, set[Any]] = {}
        self.cleared = False
        self.clears = 0

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        self.changed_rows.setdefault(row._table.name, set()).add(row.uuid)

    # python-ovs drops the replica without notifying when the server answers a
    # monitor request with a full dump; that is the only way to see it happen.
    def _Idl__clear(self) -> None:
        self.cleared = True
        self.clears += 1
        ovs.db.idl.Idl._Idl__clear(self)  # type: ignore[attr-defined]

    def take_changes(self) -> tuple[dict[str, set[Any]], bool]:
        out, cleared = self.changed_rows, self.cleared
        self.changed_rows, self.cleared = {}, False
        return out, cleared


@dataclass
class FleetClientStats:
    connected: bool = False
    full_syncs: int = 0  # whole-directory dumps received (1 after the first connect)
    reconnects: int = 0
    deltas: int = 0  # deltas delivered to on_change callbacks
    endpoint_changes: int = 0  # endpoints added + removed + changed in them
    policies_delivered: int = 0
    commits_ok: int = 0
    commits_failed: int = 0
    last_error: str = ""
    last_commit_ms: int = 0  # wall clock of the last successful commit
    heartbeats: int = 0


class FleetClient:
    """See the module docstring. ``remotes``: comma-separated members (``ssl:ADDR:PORT``,
    ``unix:PATH``); ``tls``: this host's key, certificate and the fleet CA (for ssl:)."""

    def __init__(self, remotes: str, host: HostRecord, *,
                 tls: tuple[Path, Path, Path] | None = None, heartbeat_s: float = 10.0,
                 schema_path: Path = SCHEMA_PATH) -> None:
        host = host.normalized()
        if tls is not None:
            remotes = remotes_with_identity(remotes, *tls)
        self.name = host.name
        self.remotes = remotes
        self.heartbeat_s = heartbeat_s
        self.idl = TrackingIdl(remotes, schema_helper(COLUMNS, schema_path), leader_only=False)
        self.idl.cond_change(HOST_STATUS, [["name", "==", host.name]])
        reconnect = getattr(self.idl._session, "reconnect", None)
        if reconnect is not None:
            reconnect.set_backoff(RECONNECT_MIN_BACKOFF_MS, RECONNECT_MAX_BACKOFF_MS)
        self.stats = FleetClientStats()
        self._lock = threading.Lock()  # guards the desired state and the mirrors below
        self._host = host
        self._endpoints: frozenset[EndpointRecord] | None = None  # None: never published
        self._report: ApplyReport | None = None
        self._delta_cbs: list[tuple[DeltaCallback, bool]] = []
        self._policy_cbs: list[PolicyCallback] = []
        self._mirror: dict[Any, EndpointRecord] = {}  # row uuid -> endpoint, every host
        self._own: set[Any] = set()  # uuids of this host's Endpoint rows
        self._hosts: dict[Any, HostRecord] = {}
        self._policy: PolicyGeneration | None = None
        self._txn: ovs.db.idl.Transaction | None = None
        self._txn_heartbeat = False
        self._dirty = True  # something to write may differ from the database: look
        self._retry_at = 0.0
        self._retry_s = RETRY_MIN_S
        self._next_beat = 0.0
        self._was_connected = self._ever_connected = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    # ------------------------------------------------------------ the seam

    def publish(self, endpoints: Iterable[EndpointRecord]) -> None:
        """This host's endpoints, all of them: rows not in the set are withdrawn."""
        records = frozenset(r.normalized() for r in endpoints)
        plan_publish(self.name, (), records)  # FleetRecordError now, not in the loop
        with self._lock:
            self._endpoints = records
            self._dirty = True
        self.wakeup()

    def set_host(self, host: HostRecord) -> None:
        """New identity columns (mesh addresses, WireGuard key, version); same name."""
        if host.name != self.name:
            raise ValueError(f"host name is fixed: {self.name!r}, not {host.name!r}")
        host = host.normalized()
        with self._lock:
            self._host = host
            self._dirty = True
        self.wakeup()

    def on_change(self, callback: DeltaCallback, *, include_own: bool = False) -> None:
        """Call ``callback(delta)`` for every change of the directory's endpoints (other
        hosts' only, unless ``include_own``). Registered before ``start``, the first
        delta holds the whole directory as ``added``."""
        with self._lock:
            self._delta_cbs.append((callback, include_own))

    def on_policy(self, callback: PolicyCallback) -> None:
        """Call ``callback(generation)`` whenever the latest policy generation changes."""
        with self._lock:
            self._policy_cbs.append(callback)

    def report(self, report: ApplyReport) -> None:
        """Record in this host's status row that ``report.generation`` was applied
        (``error`` None) or refused (``error``: why)."""
        with self._lock:
            self._report = report
            self._dirty = True
        self.wakeup()

    # ------------------------------------------------------------ views

    def endpoints(self, *, include_own: bool = False) -> dict[tuple[str, str], EndpointRecord]:
        """The directory's endpoints now, by (host, MAC)."""
        with self._lock:
            return {r.key: r for r in self._mirror.values()
                    if include_own or r.host != self.name}

    def hosts(self) -> dict[str, HostRecord]:
        with self._lock:
            return {h.name: h for h in self._hosts.values()}

    def latest_policy(self) -> PolicyGeneration | None:
        with self._lock:
            return self._policy

    def own_status(self) -> HostStatus | None:
        """This host's status row as the database has it."""
        with self._lock:
            rows = list(self.idl.tables[HOST_STATUS].rows.values())
            return status_of(rows[0]) if rows else None

    @property
    def connected(self) -> bool:
        return self.stats.connected

    @property
    def current_remote(self) -> str:
        """The member this client talks to (or tries next), as ``ssl:ADDR:PORT``."""
        with self._lock:
            name: str = self.idl._session.reconnect.get_name()
        scheme, _, rest = name.partition(":")
        return f"ssl:{rest}" if scheme.startswith("sslid") else name

    @property
    def in_sync(self) -> bool:
        """Connected, and the database holds what was last published/reported."""
        with self._lock:
            return self.stats.connected and self._txn is None and not self._work(time.monotonic(),
                                                                                 beat=False)

    # ------------------------------------------------------------ lifecycle

    def start(self, thread_setup: Callable[[], None] | None = None) -> FleetClient:
        """Run the client in a daemon thread (``stop()`` ends it). ``thread_setup`` runs
        first on that thread (labs: enter the simulated host's network namespace)."""
        def main() -> None:
            if thread_setup is not None:
                thread_setup()
            self.run(self._stop)

        self._thread = threading.Thread(target=main, name=f"fleet-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.wakeup()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self.idl.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def force_reconnect(self) -> None:
        """Drop the connection; the IDL reconnects (to any member) and resyncs."""
        with self._lock:
            self.idl.force_reconnect()
        self.wakeup()

    def wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """The client's loop: all IDL and socket work happens here, until ``stop``."""
        while not stop.is_set():
            try:
                calls = self._step()
            except Exception:
                log.exception("fleet client step failed")
                calls = []
            for fn, arg in calls:
                try:
                    fn(arg)
                except Exception:
                    log.exception("fleet callback failed")
            if calls:
                continue
            self._block()

    def _block(self) -> None:
        poller = ovs.poller.Poller()
        with self._lock:
            self.idl.wait(poller)
            timeout = IDLE_WAKE_S
            if self.stats.connected:
                now = time.monotonic()
                timeout = min(timeout, max(0.0, self._next_beat - now))
                if self._retry_at > now:
                    timeout = min(timeout, self._retry_at - now)
        poller.fd_wait(self._wake_r, ovs.poller.POLLIN)
        poller.timer_wait(int(timeout * 1000))
        poller.block()
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def _step(self) -> list[tuple[Callable[[Any], None], Any]]:
        """One pass: process the server's messages, find deltas, finish or start a
        commit. Returns the callbacks to run (outside the lock)."""
        calls: list[tuple[Callable[[Any], None], Any]] = []
        with self._lock:
            self.idl.run()
            connected = (self.idl._session.is_connected()
                         and self.idl.state == ovs.db.idl.Idl.IDL_S_MONITORING)
            if connected and not self._was_connected:
                if self._ever_connected:
                    self.stats.reconnects += 1
                self._ever_connected = True
                self._next_beat = 0.0  # a heartbeat right after (re)connecting
                self._dirty = True
            self._was_connected = connected
            self.stats.connected = connected
            changes, cleared = self.idl.take_changes()
            if cleared:
                self.stats.full_syncs += 1
            if changes or cleared:
                calls += self._absorb(changes, cleared)
                self._dirty = self._dirty or cleared or self._own_rows_changed(changes)
            self._finish_txn()
            if connected and self._txn is None:
                self._start_txn(time.monotonic())
        return calls

    # ------------------------------------------------------------ reading

    def _absorb(self, changes: dict[str, set[Any]], cleared: bool
                ) -> list[tuple[Callable[[Any], None], Any]]:
        calls: list[tuple[Callable[[Any], None], Any]] = []
        host_rows = self.idl.tables[HOST].rows
        if cleared:
            self._hosts = {u: host_of(r) for u, r in host_rows.items()}
        else:
            for u in changes.get(HOST, ()):
                row = host_rows.get(u)
                if row is None:
                    self._hosts.pop(u, None)
                else:
                    self._hosts[u] = host_of(row)
        ep_rows = self.idl.tables[ENDPOINT].rows
        if cleared:
            after = {u: endpoint_of(r) for u, r in ep_rows.items()}
            d = delta(self._mirror, after, full_sync=True)
            self._mirror = after
            self._own = {u for u, r in after.items() if r.host == self.name}
        elif ENDPOINT in changes:
            keys = changes[ENDPOINT]
            before = {u: self._mirror[u] for u in keys if u in self._mirror}
            after = {u: endpoint_of(ep_rows[u]) for u in keys if u in ep_rows}
            d = delta(before, after, keys)
            for u in keys:
                if u in after:
                    self._mirror[u] = after[u]
                    if after[u].host == self.name:
                        self._own.add(u)
                else:
                    self._mirror.pop(u, None)
                    self._own.discard(u)
        else:
            d = EndpointDelta()
        if d or cleared:
            for cb, own in self._delta_cbs:
                sub = d if own else _without_host(d, self.name)
                if sub or cleared:
                    calls.append((cb, sub))
                    self.stats.deltas += 1
            self.stats.endpoint_changes += len(d)
        if cleared or POLICY in changes:
            calls += self._policy_changed()
        return calls

    def _policy_changed(self) -> list[tuple[Callable[[Any], None], Any]]:
        rows = self.idl.tables[POLICY].rows.values()
        latest = max(rows, key=lambda r: r.generation, default=None)
        gen = policy_of(latest) if latest is not None else None
        if gen is None or gen == self._policy:
            return []
        self._policy = gen
        if not gen.intact:
            log.error("fleet policy generation %d: text does not match its sha256; refused",
                      gen.generation)
            self._report = ApplyReport(gen.generation, "text does not match its sha256")
            self._dirty = True
            return []
        self.stats.policies_delivered += 1
        return [(cb, gen) for cb in self._policy_cbs]

    # ------------------------------------------------------------ writing

    def _own_rows(self, table: str, column: str) -> list[Any]:
        if table == ENDPOINT:  # the directory's big table: only this host's rows
            rows = self.idl.tables[ENDPOINT].rows
            return [rows[u] for u in self._own if u in rows]
        return [r for r in self.idl.tables[table].rows.values()
                if getattr(r, column) == self.name]

    def _desired_status(self, now: int, beat: bool) -> tuple[Any, HostStatus] | None:
        rows = self._own_rows(HOST_STATUS, "name")
        row = rows[0] if rows else None
        cur = status_of(row) if row is not None else HostStatus(self.name)
        want = replace(cur, heartbeat_interval=max(1, int(self.heartbeat_s * 1000)))
        if self._report is not None:
            want = next_status(want, self._report, now)
            if want.applied_generation == cur.applied_generation and self._report.error is None:
                want = replace(want, applied_at=cur.applied_at)
        if beat or row is None:
            want = replace(want, last_seen=now)
        return (row, want) if row is None or want != cur else None

    def _work(self, mono: float, *, beat: bool) -> bool:
        """Is there anything to write? (caller holds the lock)"""
        if self._endpoints is not None and plan_publish(
                self.name, (endpoint_of(r) for r in self._own_rows(ENDPOINT, "host")),
                self._endpoints):
            return True
        hrow = self._own_rows(HOST, "name")
        if not hrow or host_of(hrow[0]) != self._host:
            return True
        return self._desired_status(now_ms(), beat) is not None

    def _own_rows_changed(self, changes: dict[str, set[Any]]) -> bool:
        """Did the server change (or delete) one of this host's rows?"""
        for table, column in ((ENDPOINT, "host"), (HOST, "name"), (HOST_STATUS, "name")):
            rows = self.idl.tables[table].rows
            for u in changes.get(table, ()):
                row = rows.get(u)
                if row is None or getattr(row, column) == self.name:
                    return True
        return False

    def _start_txn(self, mono: float) -> None:
        beat = mono >= self._next_beat
        if mono < self._retry_at or not (self._dirty or beat):
            return
        self._dirty = False
        now = now_ms()
        txn = ovs.db.idl.Transaction(self.idl)
        # Host row
        hrows = self._own_rows(HOST, "name")
        h = self._host
        if not hrows:
            row = txn.insert(self.idl.tables[HOST])
            row.name = h.name
            _set_host(row, h)
        elif host_of(hrows[0]) != h:
            _set_host(hrows[0], h, host_of(hrows[0]))
        # Endpoints
        if self._endpoints is not None:
            rows = {(r.host, r.mac): r for r in self._own_rows(ENDPOINT, "host")}
            plan = plan_publish(self.name, (endpoint_of(r) for r in rows.values()),
                                self._endpoints)
            for rec in plan.insert:
                row = txn.insert(self.idl.tables[ENDPOINT])
                row.host, row.mac = rec.host, rec.mac
                _set_endpoint(row, rec)
                row.claimed_at = now
            for rec in plan.update:
                _set_endpoint(rows[rec.key], rec, endpoint_of(rows[rec.key]))
            for key in plan.delete:
                rows[key].delete()
        # Status
        status = self._desired_status(now, beat)
        if status is not None:
            row, want = status
            if row is None:
                row = txn.insert(self.idl.tables[HOST_STATUS])
                row.name = self.name
                cur = None
            else:
                cur = status_of(row)
            _set_status(row, want, cur)
        result = txn.commit()
        if result == ovs.db.idl.Transaction.UNCHANGED:
            if beat:
                self._next_beat = mono + self.heartbeat_s
            return
        self._txn = txn
        self._txn_heartbeat = beat
        self._finish_txn()

    def _finish_txn(self) -> None:
        txn = self._txn
        if txn is None:
            return
        result = txn.commit()  # returns the status once the reply came
        if result == ovs.db.idl.Transaction.INCOMPLETE:
            return
        self._txn = None
        mono = time.monotonic()
        if result in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
            self.stats.commits_ok += 1
            self.stats.last_commit_ms = now_ms()
            self._retry_s = RETRY_MIN_S
            if self._txn_heartbeat:
                self._next_beat = mono + self.heartbeat_s
                self.stats.heartbeats += 1
            return
        self.stats.commits_failed += 1
        self._dirty = True
        self.stats.last_error = txn.get_error()
        if result == ovs.db.idl.Transaction.ERROR:
            log.warning("fleet commit refused: %s", self.stats.last_error)
        self._retry_at = mono + self._retry_s
        self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)


def _without_host(d: EndpointDelta, host: str) -> EndpointDelta:
    return EndpointDelta(
        added=tuple(e for e in d.added if e.host != host),
        removed=tuple(e for e in d.removed if e.host != host),
        changed=tuple((o, n) for o, n in d.changed if o.host != host or n.host != host),
        full_sync=d.full_sync)


def _set_host(row: Any, h: HostRecord, cur: HostRecord | None = None) -> None:
    if cur is None or cur.mesh_addresses != h.mesh_addresses:
        row.mesh_addresses = list(h.mesh_addresses)
    if cur is None or cur.wg_public_key != h.wg_public_key:
        row.wg_public_key = h.wg_public_key
    if cur is None or cur.version != h.version:
        row.version = h.version


def _set_endpoint(row: Any, rec: EndpointRecord, cur: EndpointRecord | None = None) -> None:
    """Write only the columns that differ (RBAC: the host and MAC are never updated)."""
    for col in ("vmid", "ipv4", "ipv6", "port_class", "source"):
        value = getattr(rec, col)
        if cur is None or getattr(cur, col) != value:
            setattr(row, col, list(value) if isinstance(value, tuple) else value)


def _set_status(row: Any, want: HostStatus, cur: HostStatus | None) -> None:
    for col in ("last_seen", "heartbeat_interval", "applied_generation", "applied_at",
                "error_generation", "apply_error"):
        value = getattr(want, col)
        if cur is None or getattr(cur, col) != value:
            setattr(row, col, value)
