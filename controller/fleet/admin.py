"""Administrative access to the fleet database: ``policy push`` and ``fleet status``.

``FleetAdmin`` is a short-lived IDL connection (normally a member's local admin
socket, a listener without RBAC role; a host's ``ssl:`` identity can read the
status too, but RBAC refuses its policy writes). It reads every host's identity
and status rows, counts the endpoints per host, and writes new policy
generations, keeping the last ``POLICY_KEEP``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ovs.db.idl
import ovs.poller

from controller.fleet.client import host_of, now_ms, schema_helper, status_of
from controller.fleet.schema import ENDPOINT, HOST, HOST_STATUS, POLICY, SCHEMA_PATH
from controller.fleet.tlsstream import remotes_with_identity
from controller.ovsdb import OvsdbError, commit
from topology.fleet import FleetView, HostStatus, WaitState, fleet_view, sha256_text, wait_state

POLICY_KEEP = 10  # generations kept for audit and rollback
PUSH_ATTEMPTS = 5  # a concurrent push takes the same generation number: retry

COLUMNS: dict[str, list[str]] = {
    HOST: ["name", "mesh_addresses", "wg_public_key", "version"],
    HOST_STATUS: ["name", "last_seen", "heartbeat_interval", "applied_generation",
                  "applied_at", "error_generation", "apply_error"],
    ENDPOINT: ["host"],
    POLICY: ["generation", "text", "sha256", "pushed_at", "pushed_by"],
}


class FleetAdminError(RuntimeError):
    """The fleet database could not be reached, or refused a write."""


@dataclass(frozen=True)
class PolicyInfo:
    generation: int
    sha256: str
    pushed_at: int
    pushed_by: str


@dataclass(frozen=True)
class PushResult:
    generation: int
    new: bool  # False: the latest generation already held this text


class FleetAdmin:
    def __init__(self, remote: str, *, tls: tuple[Path, Path, Path] | None = None,
                 schema_path: Path = SCHEMA_PATH) -> None:
        if tls is not None:
            remote = remotes_with_identity(remote, *tls)
        self.remote = remote
        self.idl = ovs.db.idl.Idl(remote, schema_helper(COLUMNS, schema_path),
                                  leader_only=False)

    def close(self) -> None:
        self.idl.close()

    def __enter__(self) -> FleetAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ waiting

    @property
    def synced(self) -> bool:
        return bool(self.idl._session.is_connected()
                    and self.idl.state == ovs.db.idl.Idl.IDL_S_MONITORING)

    def run_until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        """Process the server's messages until ``pred()`` holds (True) or the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.idl.run()
            if self.synced and pred():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller = ovs.poller.Poller()
            self.idl.wait(poller)
            poller.timer_wait(int(min(remaining, 0.5) * 1000) + 1)
            poller.block()

    def connect(self, timeout_s: float = 10.0) -> FleetAdmin:
        if not self.run_until(lambda: True, timeout_s):
            raise FleetAdminError(f"fleet database at {self.remote}: no answer within "
                                  f"{timeout_s:g}s")
        return self

    # ------------------------------------------------------------ reading

    def statuses(self) -> dict[str, HostStatus]:
        return {r.name: status_of(r) for r in self.idl.tables[HOST_STATUS].rows.values()}

    def latest(self) -> PolicyInfo | None:
        rows = list(self.idl.tables[POLICY].rows.values())
        if not rows:
            return None
        r = max(rows, key=lambda r: r.generation)
        return PolicyInfo(r.generation, r.sha256, r.pushed_at, r.pushed_by)

    def view(self, now: int | None = None) -> FleetView:
        counts = Counter(r.host for r in self.idl.tables[ENDPOINT].rows.values())
        latest = self.latest()
        return fleet_view((host_of(r) for r in self.idl.tables[HOST].rows.values()),
                          self.statuses().values(), counts,
                          latest.generation if latest else 0, now if now is not None else now_ms())

    # ------------------------------------------------------------ writing

    def push(self, text: str, pushed_by: str, timeout_s: float = 10.0) -> PushResult:
        """Write ``text`` as the next policy generation (or nothing if the latest
        generation holds the same text) and drop generations beyond POLICY_KEEP."""
        digest = sha256_text(text)
        error = ""
        for _ in range(PUSH_ATTEMPTS):
            latest = self.latest()
            if latest is not None and latest.sha256 == digest:
                return PushResult(latest.generation, new=False)
            generation = (latest.generation if latest else 0) + 1
            txn = ovs.db.idl.Transaction(self.idl)
            row = txn.insert(self.idl.tables[POLICY])
            row.generation = generation
            row.text = text
            row.sha256 = digest
            row.pushed_at = now_ms()
            row.pushed_by = pushed_by
            for old in list(self.idl.tables[POLICY].rows.values()):
                if old.generation <= generation - POLICY_KEEP:
                    old.delete()
            try:
                status = commit(self.idl, txn, timeout_s)
            except OvsdbError as exc:
                raise FleetAdminError(str(exc)) from None
            if status == ovs.db.idl.Transaction.SUCCESS:
                self.run_until(lambda g=generation: (self.latest() or _NONE).generation >= g,
                               2.0)
                return PushResult(generation, new=True)
            error = txn.get_error()
            if status == ovs.db.idl.Transaction.ERROR and "constraint violation" not in error:
                raise FleetAdminError(f"policy push refused: {error}")
            self.run_until(lambda: True, 1.0)  # a concurrent push: look again
        raise FleetAdminError(f"policy push did not commit after {PUSH_ATTEMPTS} attempts: "
                              f"{error}")

    def wait(self, generation: int, hosts: list[str], timeout_s: float,
             progress: Callable[[WaitState], Any] | None = None) -> WaitState:
        """Until every host in ``hosts`` applied or refused ``generation`` (or timeout)."""
        last: list[WaitState] = []

        def answered() -> bool:
            st = wait_state(generation, hosts, self.statuses())
            if progress is not None and (not last or st != last[-1]):
                progress(st)
            last[:] = [st]
            return st.done

        self.run_until(answered, timeout_s)
        return wait_state(generation, hosts, self.statuses())


_NONE = PolicyInfo(0, "", 0, "")


# --------------------------------------------------------------------------- text


def format_view(view: FleetView, now: int) -> str:
    """``socknet fleet status`` as text: one line per host."""
    lines = [f"policy generation: {view.latest_generation or 'none pushed'}"]
    header = f"{'host':<20} {'state':<8} {'last seen':>10} {'applied':>8} {'endpoints':>9}  version"
    lines.append(header)
    for h in view.hosts:
        seen = "never" if h.last_seen is None else f"{(now - h.last_seen) / 1000:.0f}s ago"
        lines.append(f"{h.name:<20} {h.state:<8} {seen:>10} {h.applied_generation:>8} "
                     f"{h.endpoints:>9}  {h.version or '-'}")
        if h.apply_error:
            lines.append(f"{'':<20} refused generation {h.error_generation}: {h.apply_error}")
    behind = view.behind
    lines.append(f"{len(view.hosts)} hosts, {sum(h.live for h in view.hosts)} live, "
                 f"{len(behind)} live behind the latest generation")
    return "\n".join(lines) + "\n"
