"""Writing to OVSDB: one transaction, retried on conflicts, and waiting until
ovs-vswitchd applied it. Used by every writer (controller.bootstrap: bridges,
veth ports, rollback, teardown; controller.peersync: per-peer VXLAN ports).

A commit only says the database changed. ovs-vswitchd applies a change later
and reports it by setting ``Open_vSwitch.cur_cfg`` to the ``next_cfg`` the
transaction incremented; a port it could not add gets ``ofport -1`` or an
``error``. :func:`wait_applied` waits for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ovs.db.idl

from controller.ovsdb import OvsdbError, OvsdbView, commit

MAX_ATTEMPTS = 5
RETRY_WAIT_S = 0.5  # at most this long for the update that caused a conflict
POLL_S = 0.5  # at most this long between looks while waiting for ovs-vswitchd

Txn = ovs.db.idl.Transaction
T = TypeVar("T")


class TxnError(OvsdbError):
    """The transaction failed, or kept conflicting with concurrent changes."""


class NotApplied(OvsdbError):
    """ovs-vswitchd did not apply a committed change in time, or could not add a port."""


@dataclass(frozen=True)
class Committed(Generic[T]):
    """A committed transaction and what its stage function returned."""

    staged: T
    txn: Txn

    @property
    def next_cfg(self) -> int | None:
        """The ``next_cfg`` the transaction set (None if it did not increment it)."""
        value = self.txn.get_increment_new_value()
        return None if value is None else int(value)


def root_row(idl: ovs.db.idl.Idl) -> Any:
    """The one ``Open_vSwitch`` row (None in an uninitialised database)."""
    return next(iter(idl.tables["Open_vSwitch"].rows.values()), None)


def transact(view: OvsdbView, stage: Callable[[ovs.db.idl.Idl, Txn], T | None], *,
             comment: str, timeout: float, attempts: int = MAX_ATTEMPTS) -> Committed[T] | None:
    """Stage changes in a new transaction (under the view's lock) and commit them.

    ``stage(idl, txn)`` reads the replica and writes rows; it returns None when
    there is nothing to do (the transaction is aborted). When someone else changed
    what it read meanwhile (``verify``: TRY_AGAIN), the replica is brought up to date
    and ``stage`` runs again, up to ``attempts`` times. Returns None if nothing was
    committed (nothing to do, or the server found nothing changed). Raises TxnError
    when the transaction fails, OvsdbError when it does not complete in ``timeout``.
    """
    idl = view.idl
    for _attempt in range(attempts):
        with view.lock:
            txn = Txn(idl)
            txn.add_comment(comment)
            try:
                staged = stage(idl, txn)
            except BaseException:
                txn.abort()
                raise
            if staged is None:
                txn.abort()
                return None
            status = commit(idl, txn, timeout)
        if status == Txn.SUCCESS:
            return Committed(staged, txn)
        if status == Txn.UNCHANGED:
            return None
        if status != Txn.TRY_AGAIN:
            raise TxnError(f"OVSDB transaction failed: {txn.get_error()}")
        view.run(RETRY_WAIT_S)
    raise TxnError("OVSDB transaction kept conflicting with concurrent changes")


def _interface(idl: ovs.db.idl.Idl, name: str) -> Any:
    for row in idl.tables["Interface"].rows.values():
        if row.name == name:
            return row
    return None


def _bridge_of(idl: ovs.db.idl.Idl, iface: Any) -> str | None:
    for br in idl.tables["Bridge"].rows.values():
        for port in (p for p in br.ports if p is not None):
            if any(i is not None and i.uuid == iface.uuid for i in port.interfaces):
                return str(br.name)
    return None


def _opt(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def wait_applied(view: OvsdbView, next_cfg: int | None, timeout: float, *,
                 ports: Iterable[str] = ()) -> None:
    """Wait until ovs-vswitchd reached ``next_cfg`` (None: no new configuration) and each
    interface named in ``ports`` has an OpenFlow port number.

    Raises NotApplied: with "ovs-vswitchd did not apply" if ``cur_cfg`` stays behind
    for ``timeout``, "could not add port" if a port got ``ofport -1`` or an error, "got
    no OpenFlow port number" if one is still without after ``timeout``.
    """
    names = list(ports)
    deadline = time.monotonic() + timeout
    idl = view.idl
    while True:
        failed: list[str] = []
        pending: list[str] = []
        with view.lock:
            root = root_row(idl)
            applied = root is None or next_cfg is None or root.cur_cfg >= next_cfg
            if applied:
                for name in names:
                    iface = _interface(idl, name)
                    error = _opt(iface.error) if iface is not None else None
                    ofport = _opt(iface.ofport) if iface is not None else None
                    if error or ofport == -1:
                        bridge = _bridge_of(idl, iface)
                        failed.append(f"port {name}{f' to {bridge}' if bridge else ''}: "
                                      f"{error or 'ofport -1'}")
                    elif ofport is None:
                        pending.append(name)
        if failed:
            raise NotApplied("ovs-vswitchd could not add " + "; ".join(failed))
        if applied and not pending:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if not applied:
                raise NotApplied(f"ovs-vswitchd did not apply the configuration within "
                                 f"{timeout:g}s (is ovs-vswitchd running?)")
            raise NotApplied(f"{'port' if len(pending) == 1 else 'ports'} "
                             f"{', '.join(pending)} got no OpenFlow port number within "
                             f"{timeout:g}s")
        view.run(min(remaining, POLL_S))
