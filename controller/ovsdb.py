"""A live, read-mostly view of the local Open vSwitch database (python-ovs IDL).

``OvsdbView`` keeps an in-memory replica of the few OVSDB tables and columns
socknet needs (Open_vSwitch, Bridge, Port, Interface, Controller) and turns it
into an immutable ``OvsdbSnapshot``. ``watch()`` runs in its own thread and
calls back with a fresh snapshot whenever the snapshot changes.

Threading: the python-ovs ``Idl`` is not thread safe. Every method of
``OvsdbView`` takes an internal lock around IDL processing, so ``snapshot()``
may be called from any thread while ``watch()`` runs in another one. Writers
(``controller.bootstrap``) use their own ``OvsdbView`` / connection.

Nothing here shells out to ``ovs-vsctl``: everything goes over JSON-RPC.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import ovs.db.idl
import ovs.json
import ovs.jsonrpc
import ovs.poller
import ovs.stream

from topology.config import HostConfig
from topology.roles import Role, classify_port, configured_ports, no_role_reason

log = logging.getLogger(__name__)

DB_NAME = "Open_vSwitch"
SCHEMA_PATH = Path("/usr/share/openvswitch/vswitch.ovsschema")

OFPP_MAX = 0xFF00  # highest "physical" OpenFlow port number
OFPP_LOCAL = 0xFFFE  # the bridge's internal (LOCAL) port, 65534

DEBOUNCE_S = 0.020  # coalesce DB changes arriving within this window
STOP_CHECK_S = 0.1  # how often watch() looks at its stop_event while idle
RECONNECT_MIN_BACKOFF_MS = 1000  # python-ovs refuses anything below 1000
RECONNECT_MAX_BACKOFF_MS = 2000  # default would be 8000: too slow after a restart

# Only the columns socknet reads or writes. Status columns that change all the
# time (statistics, Controller.status, link_state, ...) are deliberately left
# out: they would wake every watcher for nothing.
COLUMNS: dict[str, list[str]] = {
    "Open_vSwitch": ["bridges", "next_cfg", "cur_cfg"],
    "Bridge": [
        "name",
        "datapath_id",
        "datapath_type",
        "fail_mode",
        "protocols",
        "controller",
        "ports",
        "other_config",
    ],
    "Port": ["name", "interfaces"],
    "Interface": ["name", "type", "ofport", "error"],
    "Controller": [
        "target",
        "is_connected",
        "connection_mode",
        "max_backoff",
        "inactivity_probe",
    ],
}


class OvsdbError(RuntimeError):
    """The OVSDB server could not be reached or answered with an error."""


# --------------------------------------------------------------------------- schema


def fetch_schema(remote: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the server at ``remote`` for the Open_vSwitch schema (``get_schema``).

    Raises ``OvsdbError`` if the server cannot be reached within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    error, stream = ovs.stream.Stream.open_block(
        ovs.stream.Stream.open(remote), int(timeout * 1000)
    )
    if error or stream is None:
        raise OvsdbError(f"cannot connect to OVSDB at {remote}: {os.strerror(error)}")
    rpc = ovs.jsonrpc.Connection(stream)
    try:
        request = ovs.jsonrpc.Message.create_request("get_schema", [DB_NAME])
        error = rpc.send(request)
        while not error:
            error, msg = rpc.recv()
            if error == errno.EAGAIN:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OvsdbError(f"OVSDB at {remote}: get_schema timed out")
                rpc.run()
                poller = ovs.poller.Poller()
                rpc.wait(poller)
                rpc.recv_wait(poller)
                poller.timer_wait(int(remaining * 1000) + 1)
                poller.block()
                error = 0
                continue
            if error:
                break
            if msg is not None and msg.id == request.id:
                if msg.type == ovs.jsonrpc.Message.T_ERROR:
                    raise OvsdbError(f"OVSDB at {remote}: get_schema failed: {msg.error}")
                result: dict[str, Any] = msg.result
                return result
        raise OvsdbError(f"OVSDB at {remote}: get_schema failed: {os.strerror(error)}")
    finally:
        rpc.close()


def schema_helper(
    remote: str,
    columns: Mapping[str, list[str]] = COLUMNS,
    *,
    timeout: float = 5.0,
    schema_path: Path = SCHEMA_PATH,
) -> ovs.db.idl.SchemaHelper:
    """A SchemaHelper with ``columns`` registered.

    The schema comes from the server itself; if the server cannot be asked,
    from ``schema_path`` (the PyPI ``ovs`` package looks under /usr/local by
    default and fails, so the path is always explicit). Columns missing from
    the schema (older OVS) are skipped instead of tripping python-ovs'
    assertion.
    """
    try:
        schema_json = fetch_schema(remote, timeout)
    except OvsdbError as exc:
        log.warning("%s; falling back to %s", exc, schema_path)
        schema_json = ovs.json.from_file(str(schema_path))
        if isinstance(schema_json, str):
            raise OvsdbError(f"cannot read OVSDB schema {schema_path}: {schema_json}") from exc
    helper = ovs.db.idl.SchemaHelper(schema_json=schema_json)
    tables = schema_json.get("tables", {})
    for table, wanted in columns.items():
        if table not in tables:
            raise OvsdbError(f"OVSDB schema has no table {table!r}")
        present = [c for c in wanted if c in tables[table]["columns"]]
        missing = sorted(set(wanted) - set(present))
        if missing:
            log.warning("OVSDB schema: table %s lacks columns %s", table, missing)
        helper.register_columns(table, present)
    return helper


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class OvsdbSnapshot:
    """What the controller needs to know about the switch, at one instant.

    Treat the dicts as read-only. Keys of ``ports[bridge]`` are interface names
    (for the usual one-interface ports that is also the port name); only
    interfaces with a valid OpenFlow port number (1..0xff00) are listed, so the
    bridge's internal LOCAL port and ports OVS failed to open (ofport -1) are
    absent.
    """

    ports: dict[str, dict[str, int]] = field(default_factory=dict)
    dpids: dict[str, int] = field(default_factory=dict)
    controllers: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    fail_modes: dict[str, str | None] = field(default_factory=dict)
    datapath_types: dict[str, str] = field(default_factory=dict)

    def ofport(self, bridge: str, name: str) -> int | None:
        """OpenFlow port number of ``name`` on ``bridge``, None if absent."""
        return self.ports.get(bridge, {}).get(name)

    def port_name(self, bridge: str, ofport: int) -> str | None:
        """Interface name of OpenFlow port ``ofport`` on ``bridge``, None if unknown."""
        for name, num in self.ports.get(bridge, {}).items():
            if num == ofport:
                return name
        return None

    def bridge_of_dpid(self, dpid: int) -> str | None:
        """Name of the bridge with datapath id ``dpid``, None if unknown."""
        for name, value in self.dpids.items():
            if value == dpid:
                return name
        return None


def _opt(value: Any) -> Any:
    """python-ovs returns optional columns (min 0, max 1) as a 0/1-element list."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rows(values: Any) -> list[Any]:
    """Referenced rows of a set column, without dangling references."""
    return [row for row in values if row is not None]


def build_snapshot(idl: ovs.db.idl.Idl) -> OvsdbSnapshot:
    """An ``OvsdbSnapshot`` of the IDL's current replica (caller holds the IDL)."""
    ports: dict[str, dict[str, int]] = {}
    dpids: dict[str, int] = {}
    controllers: dict[str, list[tuple[str, bool]]] = {}
    fail_modes: dict[str, str | None] = {}
    datapath_types: dict[str, str] = {}
    for bridge in idl.tables["Bridge"].rows.values():
        name: str = bridge.name
        bridge_ports: dict[str, int] = {}
        for port in _rows(bridge.ports):
            for iface in _rows(port.interfaces):
                ofport = _opt(iface.ofport)
                if isinstance(ofport, int) and 1 <= ofport <= OFPP_MAX:
                    bridge_ports[iface.name] = ofport
        ports[name] = dict(sorted(bridge_ports.items()))
        dpid = _opt(bridge.datapath_id)
        if dpid:
            try:
                dpids[name] = int(dpid, 16)
            except ValueError:
                log.warning("bridge %s: unparsable datapath_id %r", name, dpid)
        controllers[name] = sorted(
            (str(c.target), bool(c.is_connected)) for c in _rows(bridge.controller)
        )
        fail_modes[name] = _opt(bridge.fail_mode)
        datapath_types[name] = bridge.datapath_type or "system"
    return OvsdbSnapshot(
        ports=dict(sorted(ports.items())),
        dpids=dict(sorted(dpids.items())),
        controllers=dict(sorted(controllers.items())),
        fail_modes=dict(sorted(fail_modes.items())),
        datapath_types=dict(sorted(datapath_types.items())),
    )


# --------------------------------------------------------------------------- view


class OvsdbView:
    """An IDL replica of the OVSDB at ``remote`` (e.g. ``unix:/run/openvswitch/db.sock``).

    Construction does not wait for the initial contents: call
    ``wait_connected()`` (or use ``watch()``, which waits by itself).
    """

    def __init__(
        self,
        remote: str,
        *,
        columns: Mapping[str, list[str]] = COLUMNS,
        schema_timeout: float = 5.0,
        schema_path: Path = SCHEMA_PATH,
    ) -> None:
        self.remote = remote
        helper = schema_helper(remote, columns, timeout=schema_timeout, schema_path=schema_path)
        self._idl = ovs.db.idl.Idl(remote, helper)
        # Reconnect quickly after an ovsdb-server restart (default max is 8 s).
        reconnect = getattr(self._idl._session, "reconnect", None)
        if reconnect is not None:
            reconnect.set_backoff(RECONNECT_MIN_BACKOFF_MS, RECONNECT_MAX_BACKOFF_MS)
        self._lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False

    # ------------------------------------------------------------ basics

    @property
    def idl(self) -> ovs.db.idl.Idl:
        """The underlying IDL. Hold ``lock`` while touching it if ``watch()`` runs."""
        return self._idl

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def connected(self) -> bool:
        """True while the session is up and the IDL holds the server's contents."""
        with self._lock:
            return (
                self._idl._session.is_connected()
                and self._idl.state == ovs.db.idl.Idl.IDL_S_MONITORING
                and self._idl.has_ever_connected()
            )

    def close(self) -> None:
        """Close the connection (idempotent). Stop ``watch()`` first."""
        if self._closed:
            return
        self._closed = True
        self.wakeup()
        with self._lock:
            self._idl.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> OvsdbView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wakeup(self) -> None:
        """Make a thread blocked in ``run()``/``watch()`` return from its poll now."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # pipe full (a wakeup is already pending) or closed

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------ processing

    def run_once(self) -> bool:
        """Process whatever the server sent; True if the replica changed."""
        with self._lock:
            seqno = self._idl.change_seqno
            self._idl.run()
            return bool(self._idl.change_seqno != seqno)

    def _block(self, timeout: float | None) -> None:
        poller = ovs.poller.Poller()
        with self._lock:
            self._idl.wait(poller)
        poller.fd_wait(self._wake_r, ovs.poller.POLLIN)
        if timeout is not None:
            poller.timer_wait(max(0, int(timeout * 1000)))
        poller.block()
        self._drain_wakeups()

    def run(self, until_change_timeout: float) -> bool:
        """Process messages until the replica changes or the timeout expires.

        Returns True if it changed. Blocks on the IDL's sockets, not in a sleep loop.
        """
        deadline = time.monotonic() + until_change_timeout
        while True:
            if self.run_once():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._block(remaining)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until the initial contents arrived; ``OvsdbError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.run_once()
            if self.connected:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OvsdbError(
                    f"OVSDB at {self.remote}: no database contents after {timeout:g}s "
                    "(is ovsdb-server running?)"
                )
            self._block(min(remaining, STOP_CHECK_S))

    def snapshot(self) -> OvsdbSnapshot:
        """An immutable snapshot of the current replica (does not talk to the server)."""
        with self._lock:
            return build_snapshot(self._idl)

    # ------------------------------------------------------------ watch

    def watch(
        self,
        callback: Callable[[OvsdbSnapshot], None],
        stop_event: threading.Event,
        *,
        debounce: float = DEBOUNCE_S,
        initial: bool = True,
    ) -> None:
        """Call ``callback(snapshot)`` whenever the snapshot changes, until ``stop_event``.

        Meant to run in its own thread. Blocks on the IDL's poller; changes that
        arrive within ``debounce`` seconds of the first one are coalesced into one
        callback. With ``initial`` the first snapshot after connecting is
        delivered too. If ovsdb-server goes away the IDL reconnects by itself
        (1-2 s backoff); after a reconnect a callback fires only if something
        actually differs. Exceptions raised by ``callback`` are logged, not
        propagated. Call ``wakeup()`` after setting ``stop_event`` to stop
        without waiting up to 100 ms.
        """
        last: OvsdbSnapshot | None = None
        seen_seqno = -1
        pending_since: float | None = None
        while not stop_event.is_set():
            snap: OvsdbSnapshot | None = None
            with self._lock:
                self._idl.run()
                now = time.monotonic()
                if self._idl.change_seqno != seen_seqno:
                    seen_seqno = self._idl.change_seqno
                    if pending_since is None:
                        pending_since = now
                ready = self._idl.has_ever_connected()
                if ready and pending_since is not None and now - pending_since >= debounce:
                    pending_since = None
                    current = build_snapshot(self._idl)
                    if current != last:
                        if last is not None or initial:
                            snap = current
                        last = current
            if snap is not None:
                try:
                    callback(snap)
                except Exception:
                    log.exception("OVSDB watch callback failed")
                continue  # the callback took time: look at the IDL again first
            if stop_event.is_set():
                break
            if pending_since is not None:
                self._block(max(0.0, pending_since + debounce - time.monotonic()))
            else:
                self._block(STOP_CHECK_S)


# --------------------------------------------------------------------------- transactions


def commit(idl: ovs.db.idl.Idl, txn: ovs.db.idl.Transaction, timeout: float = 10.0) -> str:
    """Commit ``txn`` like ``Transaction.commit_block()``, but give up after ``timeout``.

    Returns the final status (``Transaction.SUCCESS``, ``UNCHANGED``, ``TRY_AGAIN``,
    ``ERROR``, ...). On timeout the transaction is aborted and ``OvsdbError`` raised.
    """
    deadline = time.monotonic() + timeout
    while True:
        status: str = txn.commit()
        if status != ovs.db.idl.Transaction.INCOMPLETE:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            txn.abort()
            raise OvsdbError(f"OVSDB transaction did not complete within {timeout:g}s")
        idl.run()
        poller = ovs.poller.Poller()
        idl.wait(poller)
        txn.wait(poller)
        poller.timer_wait(int(remaining * 1000) + 1)
        poller.block()


# --------------------------------------------------------------------------- status


def status_data(cfg: HostConfig, snap: OvsdbSnapshot) -> dict[str, Any]:
    """JSON-ready status of the two socknet bridges as seen in ``snap``.

    ``{"bridges": {name: {...}}, "problems": [...]}``; each bridge lists its
    ports with role (``topology.roles.classify_port``) and ofport, its
    controllers with their connection state, fail_mode and datapath. Flow
    counts are added elsewhere (over OpenFlow).
    """
    target = cfg.controller.ovs_target
    bridges: dict[str, Any] = {}
    problems: list[str] = []
    expected_ports = configured_ports(cfg)
    for kind, name in (("mesh", cfg.bridges.mesh.name), ("socket", cfg.bridges.socket.name)):
        present = name in snap.ports
        dpid = snap.dpids.get(name)
        ports: dict[str, Any] = {}
        for pname, ofport in snap.ports.get(name, {}).items():
            role = classify_port(cfg, name, pname)
            ports[pname] = {"ofport": ofport, "role": role.role.value, "vmid": role.vmid}
        ctrls = [
            {"target": t, "connected": connected} for t, connected in snap.controllers.get(name, [])
        ]
        fail_mode = snap.fail_modes.get(name)
        datapath_type = snap.datapath_types.get(name)
        bridges[name] = {
            "kind": kind,
            "present": present,
            "dpid": dpid,
            "dpid_hex": f"{dpid:016x}" if dpid is not None else None,
            "datapath_type": datapath_type,
            "fail_mode": fail_mode,
            "controllers": ctrls,
            "ports": ports,
        }
        if not present:
            problems.append(f"bridge {name} does not exist")
            continue
        if fail_mode != "secure":
            problems.append(f"bridge {name}: fail_mode is {fail_mode or 'unset'}, not secure")
        if datapath_type != cfg.datapath_type:
            problems.append(
                f"bridge {name}: datapath_type is {datapath_type}, not {cfg.datapath_type}"
            )
        targets = {c["target"]: c["connected"] for c in ctrls}
        if target not in targets:
            problems.append(f"bridge {name}: no controller {target}")
        elif not targets[target]:
            problems.append(f"bridge {name}: controller {target} not connected")
        for pname, key in expected_ports[name].items():
            if pname not in ports:
                problems.append(f"bridge {name}: port {pname} does not exist or has no ofport "
                                f"(host.yaml {key}: {pname})")
        for pname, port in ports.items():
            if port["role"] == Role.UNKNOWN.value:
                problems.append(f"bridge {name}: port {pname} has no role, its packets are "
                                f"dropped ({no_role_reason(cfg, name, pname)})")
    return {"bridges": bridges, "problems": problems}
