"""Create (or repair) the two socknet bridges, their controller and the veth between them.

``bootstrap(cfg)`` is idempotent and transactional:

1. validate: config, OVSDB reachable, no foreign port/device in the way, and
   the veth pair either fully present or fully absent (nothing changes yet);
2. ensure the veth pair ``to-socket``/``from-mesh`` and TX offload off;
3. ONE OVSDB transaction: missing bridges (with their LOCAL port), drifted
   bridge/controller settings, the two veth ports, the ``SSL`` row when
   ``controller.listen`` is ``ssl:`` (see controller.tls; the per-host CA and
   certificates it names are made first, controller.pki), ``next_cfg`` increment;
4. wait until ovs-vswitchd applied it (``cur_cfg``) and check that both veth
   ports got an OpenFlow port number.

If any step fails, what this run did is undone (a second OVSDB transaction
removes created bridges/ports and restores drifted values; a veth created by
this run is deleted) and ``BootstrapError`` is raised with one line.

Everything goes through the python-ovs IDL and pyroute2: no ``ovs-vsctl``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import ovs.db.idl

from controller import links
from controller.ovsdb import COLUMNS, OvsdbError, OvsdbSnapshot, OvsdbView
from controller.ovsdb_txn import NotApplied, TxnError, root_row, transact, wait_applied
from controller.tls import ovs_ssl
from topology.config import HostConfig

log = logging.getLogger(__name__)

PROTOCOLS = ["OpenFlow13", "OpenFlow14"]
FAIL_MODE = "secure"
# A controller on the same host is reached over loopback, never through the
# bridge it controls: out-of-band. disable-in-band additionally stops OVS from
# installing its hidden in-band flows (ARP/DHCP to/from the LOCAL port, also
# used for manager connections), which would bypass our "secure" pipeline.
CONNECTION_MODE = "out-of-band"
BRIDGE_OTHER_CONFIG = {"disable-in-band": "true"}

Txn = ovs.db.idl.Transaction
Row = Any  # ovs.db.idl.Row: attribute access per column, no static types


class BootstrapError(RuntimeError):
    """Bootstrap failed; whatever this run created has been removed again."""


@dataclass
class BootstrapResult:
    """What ``bootstrap`` did. ``created`` and ``changed`` are empty on a no-op run."""

    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    snapshot: OvsdbSnapshot | None = None

    @property
    def changes(self) -> list[str]:
        return [*self.created, *self.changed]

    @property
    def unchanged(self) -> bool:
        return not self.created and not self.changed


# --------------------------------------------------------------------------- helpers


def _opt(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _find(idl: ovs.db.idl.Idl, table: str, name: str) -> Row | None:
    for row in idl.tables[table].rows.values():
        if row.name == name:
            return row
    return None


def _set(row: Row, column: str, value: Any) -> None:
    """``setattr`` that fails loudly.

    python-ovs drops a value that violates the schema (enum, range) and only
    logs that through ovs.vlog, which is silent unless ``Vlog.init()`` ran.
    Row references are not checked (their values are Row objects).
    """
    setattr(row, column, value)
    got = getattr(row, column)
    if isinstance(value, str | int | bool):
        ok = _opt(got) == value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        ok = sorted(got) == sorted(value)
    elif isinstance(value, dict):
        ok = got == value
    else:
        return
    if not ok:
        raise BootstrapError(f"OVSDB schema rejected {column}={value!r}")


def _wanted(cfg: HostConfig) -> list[tuple[str, str]]:
    """(bridge, veth port) in creation order."""
    return [
        (cfg.bridges.mesh.name, cfg.bridges.mesh.to_socket),
        (cfg.bridges.socket.name, cfg.bridges.socket.from_mesh),
    ]


def _controller_settings(cfg: HostConfig) -> dict[str, Any]:
    return {
        "target": cfg.controller.ovs_target,
        "max_backoff": cfg.controller.max_backoff_ms,
        "inactivity_probe": cfg.controller.inactivity_probe_ms,
        "connection_mode": CONNECTION_MODE,
    }


# --------------------------------------------------------------------------- undo log


@dataclass
class _Undo:
    """Inverse operations for one committed transaction (applied in reverse order)."""

    bridges: list[uuid.UUID] = field(default_factory=list)  # created Bridge rows
    ports: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)  # (bridge, port)
    columns: list[tuple[str, uuid.UUID, str, Any]] = field(default_factory=list)
    mapkeys: list[tuple[str, uuid.UUID, str, str, str | None]] = field(default_factory=list)
    controllers: list[tuple[uuid.UUID, list[dict[str, Any]]]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.bridges or self.ports or self.columns or self.mapkeys or self.controllers)


@dataclass
class BootstrapChanges:
    """The changes staged in bootstrap's one transaction, in words, and their undo log."""

    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    undo: _Undo = field(default_factory=_Undo)
    # temp uuids of inserted rows, resolved after commit
    new_bridges: list[uuid.UUID] = field(default_factory=list)
    new_ports: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)


# --------------------------------------------------------------------------- validation


def _validate(cfg: HostConfig, view: OvsdbView, netns: str | None) -> bool:
    """Check everything before changing anything; returns True if the veth exists."""
    mesh, sock = cfg.bridges.mesh, cfg.bridges.socket
    names = [mesh.name, sock.name, mesh.to_socket, sock.from_mesh]
    if len(set(names)) != len(names):
        raise BootstrapError(f"bridge and veth names must all differ: {', '.join(names)}")
    if cfg.datapath_type not in ("system", "netdev"):
        raise BootstrapError(f"unsupported datapath_type {cfg.datapath_type!r}")

    idl = view.idl
    with view.lock:
        roots = list(idl.tables["Open_vSwitch"].rows.values())
        if len(roots) != 1:
            raise BootstrapError(
                f"OVSDB at {cfg.ovsdb} has {len(roots)} Open_vSwitch rows, expected 1 "
                "(was the database initialised?)"
            )
        missing_bridges = []
        for br_name, port_name in _wanted(cfg):
            br = _find(idl, "Bridge", br_name)
            if br is None:
                missing_bridges.append(br_name)
                for other in idl.tables["Bridge"].rows.values():
                    if any(p.name == br_name for p in other.ports if p is not None):
                        raise BootstrapError(
                            f"cannot create bridge {br_name}: a port of that name is on "
                            f"bridge {other.name}"
                        )
            # The veth port must not be owned by some other bridge or port.
            for other in idl.tables["Bridge"].rows.values():
                for port in (p for p in other.ports if p is not None):
                    iface_names = {i.name for i in port.interfaces if i is not None}
                    if port.name == port_name and other.name != br_name:
                        raise BootstrapError(
                            f"port {port_name} is already on bridge {other.name}, "
                            f"expected on {br_name}; refusing to move it"
                        )
                    if port_name in iface_names and port.name != port_name:
                        raise BootstrapError(
                            f"interface {port_name} belongs to port {port.name} on bridge "
                            f"{other.name}; refusing to take it over"
                        )

    try:
        for br_name in missing_bridges:
            # OVS creates a network device named after the bridge (its LOCAL
            # port). A device of that name that OVS does not know about, e.g. a
            # Linux bridge vmbr0 on Proxmox, would make ovs-vswitchd fail.
            if links.link_exists(br_name, netns=netns):
                raise BootstrapError(
                    f"cannot create OVS bridge {br_name}: a network device {br_name} "
                    "already exists (a Linux bridge?)"
                )
        return links.veth_pair_exists(mesh.to_socket, sock.from_mesh, netns=netns)
    except links.LinkError as exc:
        raise BootstrapError(f"veth {mesh.to_socket}/{sock.from_mesh}: {exc}") from exc


# --------------------------------------------------------------------------- transaction


def _stage(cfg: HostConfig, idl: ovs.db.idl.Idl, txn: Txn) -> BootstrapChanges:
    """Stage every needed change in ``txn``; record how to undo it."""
    plan = BootstrapChanges()
    undo = plan.undo
    root = next(iter(idl.tables["Open_vSwitch"].rows.values()))
    want_ctrl = _controller_settings(cfg)
    new_bridges: list[Row] = []

    for br_name, port_name in _wanted(cfg):
        br = _find(idl, "Bridge", br_name)
        if br is None:
            # Same rows as `ovs-vsctl add-br`: Bridge + Port + internal Interface.
            local_if = txn.insert(idl.tables["Interface"])
            _set(local_if, "name", br_name)
            _set(local_if, "type", "internal")
            local_port = txn.insert(idl.tables["Port"])
            _set(local_port, "name", br_name)
            local_port.interfaces = [local_if]
            br = txn.insert(idl.tables["Bridge"])
            _set(br, "name", br_name)
            _set(br, "datapath_type", cfg.datapath_type)
            _set(br, "protocols", list(PROTOCOLS))
            _set(br, "fail_mode", FAIL_MODE)
            _set(br, "other_config", dict(BRIDGE_OTHER_CONFIG))
            ctrl = txn.insert(idl.tables["Controller"])
            for column, value in want_ctrl.items():
                _set(ctrl, column, value)
            br.controller = [ctrl]
            port_rows = [local_port]
            new_bridges.append(br)
            plan.new_bridges.append(br.uuid)
            plan.created.append(
                f"bridge {br_name} (datapath {cfg.datapath_type}, controller {want_ctrl['target']})"
            )
            existing_ports: list[Row] = []
        else:
            _fix_bridge(cfg, br, txn, idl, plan)
            existing_ports = [p for p in br.ports if p is not None]
            port_rows = list(existing_ports)

        port = next((p for p in existing_ports if p.name == port_name), None)
        if port is None:
            iface = txn.insert(idl.tables["Interface"])
            _set(iface, "name", port_name)
            _set(iface, "type", "")
            port = txn.insert(idl.tables["Port"])
            _set(port, "name", port_name)
            port.interfaces = [iface]
            if existing_ports:
                br.verify("ports")
            br.ports = [*port_rows, port]
            if br.uuid not in plan.new_bridges:
                plan.new_ports.append((br.uuid, port.uuid))
            plan.created.append(f"port {port_name} on {br_name}")
        else:
            for iface in (i for i in port.interfaces if i is not None):
                if iface.name == port_name and iface.type not in ("", "system"):
                    undo.columns.append(("Interface", iface.uuid, "type", iface.type))
                    plan.changed.append(f"interface {port_name}: type {iface.type} -> system")
                    _set(iface, "type", "")

    _fix_ssl(cfg, root, txn, idl, plan)
    if new_bridges:
        root.verify("bridges")
        root.bridges = [*(b for b in root.bridges if b is not None), *new_bridges]
    if plan.created or plan.changed:
        root.increment("next_cfg")
    return plan


def _fix_ssl(cfg: HostConfig, root: Row, txn: Txn, idl: ovs.db.idl.Idl,
             plan: BootstrapChanges) -> None:
    """The switch side of the TLS channel: OVSDB's one SSL row (ovs-vsctl set-ssl).

    Only with ``controller.listen: ssl:``; with plain tcp the SSL table is left
    alone (it may serve other connections, e.g. an ssl: manager).
    """
    want = ovs_ssl(cfg)
    if want is None:
        return
    row = _opt(root.ssl)
    if row is None:
        row = txn.insert(idl.tables["SSL"])
        for column, value in want.items():
            _set(row, column, value)
        plan.undo.columns.append(("Open_vSwitch", root.uuid, "ssl", list(root.ssl)))
        root.verify("ssl")
        root.ssl = row
        plan.created.append(f"OVS SSL: certificate {want['certificate']}, ca_cert "
                            f"{want['ca_cert']}")
        return
    for column, value in want.items():
        current = getattr(row, column)
        if current != value:
            plan.undo.columns.append(("SSL", row.uuid, column, current))
            _set(row, column, value)
            plan.changed.append(f"OVS SSL: {column} {current or 'unset'} -> {value}")


def _fix_bridge(cfg: HostConfig, br: Row, txn: Txn, idl: ovs.db.idl.Idl,
                plan: BootstrapChanges) -> None:
    """Stage fixes for drifted settings of an existing bridge."""
    name = br.name
    undo = plan.undo
    if (br.datapath_type or "system") != cfg.datapath_type:
        plan.changed.append(
            f"bridge {name}: datapath_type {br.datapath_type or 'system'} -> {cfg.datapath_type}"
        )
        undo.columns.append(("Bridge", br.uuid, "datapath_type", br.datapath_type))
        _set(br, "datapath_type", cfg.datapath_type)
    if sorted(br.protocols) != sorted(PROTOCOLS):
        plan.changed.append(
            f"bridge {name}: protocols {','.join(sorted(br.protocols)) or 'default'} -> "
            f"{','.join(PROTOCOLS)}"
        )
        undo.columns.append(("Bridge", br.uuid, "protocols", list(br.protocols)))
        _set(br, "protocols", list(PROTOCOLS))
    fail_mode = _opt(br.fail_mode)
    if fail_mode != FAIL_MODE:
        plan.changed.append(f"bridge {name}: fail_mode {fail_mode or 'unset'} -> {FAIL_MODE}")
        undo.columns.append(("Bridge", br.uuid, "fail_mode", list(br.fail_mode)))
        _set(br, "fail_mode", FAIL_MODE)
    other = dict(br.other_config)
    for key, value in BRIDGE_OTHER_CONFIG.items():
        if other.get(key) != value:
            plan.changed.append(f"bridge {name}: other_config:{key} {other.get(key)} -> {value}")
            undo.mapkeys.append(("Bridge", br.uuid, "other_config", key, other.get(key)))
            br.setkey("other_config", key, value)

    want = _controller_settings(cfg)
    ctrls = [c for c in br.controller if c is not None]
    matching = [c for c in ctrls if c.target == want["target"]]
    if len(ctrls) == 1 and matching:
        ctrl = matching[0]
        for column, value in want.items():
            current = _opt(getattr(ctrl, column))
            if current != value:
                plan.changed.append(f"bridge {name}: controller {column} {current} -> {value}")
                undo.columns.append(("Controller", ctrl.uuid, column, getattr(ctrl, column)))
                _set(ctrl, column, value)
        return
    # Missing, wrong target, or extra controllers: this bridge gets exactly ours.
    old = [{col: getattr(c, col) for col in _CONTROLLER_WRITABLE} for c in ctrls]
    plan.changed.append(
        f"bridge {name}: controller {','.join(c.target for c in ctrls) or 'none'} -> "
        f"{want['target']}"
    )
    undo.controllers.append((br.uuid, old))
    ctrl = txn.insert(idl.tables["Controller"])
    for column, value in want.items():
        _set(ctrl, column, value)
    br.verify("controller")
    br.controller = [ctrl]


_CONTROLLER_WRITABLE = ("target", "max_backoff", "inactivity_probe", "connection_mode")
# bootstrap also owns the SSL row of the TLS channel (controller.tls)
BOOTSTRAP_COLUMNS: dict[str, list[str]] = {
    **COLUMNS,
    "Open_vSwitch": [*COLUMNS["Open_vSwitch"], "ssl"],
    "SSL": ["private_key", "certificate", "ca_cert"],
}


def _resolve(plan: BootstrapChanges, txn: Txn) -> None:
    """Replace temporary uuids of inserted rows by the server's, after commit."""
    for temp in plan.new_bridges:
        real = txn.get_insert_uuid(temp)
        if real is not None:
            plan.undo.bridges.append(real)
    for br_uuid, temp in plan.new_ports:
        real = txn.get_insert_uuid(temp)
        if real is not None:
            plan.undo.ports.append((br_uuid, real))


def _apply_undo(view: OvsdbView, undo: _Undo, timeout: float) -> None:
    """Second transaction: revert what ``undo`` describes (best effort, logged)."""

    def stage(idl: ovs.db.idl.Idl, txn: Txn) -> bool:
        root = root_row(idl)
        if root is not None and undo.bridges:
            drop = set(undo.bridges)
            root.verify("bridges")
            root.bridges = [b for b in root.bridges if b is not None and b.uuid not in drop]
        bridges = idl.tables["Bridge"].rows
        for br_uuid, port_uuid in undo.ports:
            br = bridges.get(br_uuid)
            if br is not None:
                br.verify("ports")
                br.ports = [p for p in br.ports if p is not None and p.uuid != port_uuid]
        for table, row_uuid, column, old in reversed(undo.columns):
            row = idl.tables[table].rows.get(row_uuid)
            if row is not None:
                setattr(row, column, old)
        for table, row_uuid, column, key, old_value in reversed(undo.mapkeys):
            row = idl.tables[table].rows.get(row_uuid)
            if row is None:
                continue
            if old_value is None:
                row.delkey(column, key)
            else:
                row.setkey(column, key, old_value)
        for br_uuid, saved in undo.controllers:
            br = bridges.get(br_uuid)
            if br is None:
                continue
            rows = []
            for values in saved:
                ctrl = txn.insert(idl.tables["Controller"])
                for column, value in values.items():
                    setattr(ctrl, column, value)
                rows.append(ctrl)
            br.controller = rows
        if root is not None:
            root.increment("next_cfg")
        return True

    try:
        transact(view, stage, comment="socknet bootstrap: rollback", timeout=timeout)
    except TxnError as exc:
        log.error("rollback transaction failed: %s", exc)


def _remove_stale_ports(cfg: HostConfig, view: OvsdbView, timeout: float) -> list[str]:
    """Drop our veth ports from OVS if their devices are gone (before re-creating them).

    On the netdev datapath ovs-vswitchd keeps a port whose device was deleted
    (same ofport, old ifindex) and does not re-bind when a device of the same
    name reappears: packets never arrive. Removing the Port rows first (and
    waiting until ovs-vswitchd dropped them) makes the main transaction add
    them afresh. Not undone on rollback: those ports were dead anyway.
    """

    def stage(idl: ovs.db.idl.Idl, txn: Txn) -> list[str] | None:
        removed = []
        for br_name, port_name in _wanted(cfg):
            br = _find(idl, "Bridge", br_name)
            if br is None:
                continue
            ports = [p for p in br.ports if p is not None]
            keep = [p for p in ports if p.name != port_name]
            if len(keep) != len(ports):
                br.verify("ports")
                br.ports = keep
                removed.append(f"removed stale port {port_name} from {br_name} (device gone)")
        if not removed:
            return None
        root_row(idl).increment("next_cfg")
        return removed

    try:
        done = transact(view, stage, comment="socknet bootstrap: drop ports of vanished veth",
                        timeout=timeout)
        if done is None:
            return []
        wait_applied(view, done.next_cfg, timeout)
    except OvsdbError as exc:
        raise BootstrapError(str(exc)) from exc
    return done.staged


def _transact(
    cfg: HostConfig, view: OvsdbView, result: BootstrapResult, timeout: float
) -> tuple[_Undo, int | None]:
    """Stage, commit (retrying on conflicts); returns the undo log and next_cfg."""

    def stage(idl: ovs.db.idl.Idl, txn: Txn) -> BootstrapChanges | None:
        changes = _stage(cfg, idl, txn)
        return changes if changes.created or changes.changed else None

    try:
        done = transact(view, stage, comment="socknet bootstrap", timeout=timeout)
    except OvsdbError as exc:
        raise BootstrapError(str(exc)) from exc
    if done is None:
        return _Undo(), None
    _resolve(done.staged, done.txn)
    result.created.extend(done.staged.created)
    result.changed.extend(done.staged.changed)
    return done.staged.undo, done.next_cfg


def _wait_applied(view: OvsdbView, cfg: HostConfig, next_cfg: int | None,
                  timeout: float) -> None:
    """Wait until ovs-vswitchd reached ``next_cfg`` and both veth ports have an ofport."""
    try:
        wait_applied(view, next_cfg, timeout, ports=[port for _, port in _wanted(cfg)])
    except OvsdbError as exc:
        raise BootstrapError(str(exc)) from exc


# --------------------------------------------------------------------------- entry points


def _open_view(cfg: HostConfig, timeout: float) -> OvsdbView:
    try:
        view = OvsdbView(cfg.ovsdb, columns=BOOTSTRAP_COLUMNS, schema_timeout=timeout)
    except OvsdbError as exc:
        raise BootstrapError(str(exc)) from exc
    try:
        view.wait_connected(timeout)
    except OvsdbError as exc:
        view.close()
        raise BootstrapError(str(exc)) from exc
    return view


def bootstrap(
    cfg: HostConfig, *, netns: str | None = None, timeout: float = 10.0
) -> BootstrapResult:
    """Create or repair bridges, controller and veth as ``cfg`` says; idempotent.

    ``netns`` names the network namespace in which ovs-vswitchd runs (labs);
    None means the caller's own namespace. ``timeout`` bounds each wait (OVSDB
    connect, commit, ovs-vswitchd applying the change).
    """
    result = BootstrapResult()
    mesh, sock = cfg.bridges.mesh, cfg.bridges.socket
    view = _open_view(cfg, timeout)
    veth_created = False
    undo = _Undo()
    try:
        try:
            veth_present = _validate(cfg, view, netns)
            _ensure_pki(cfg, result)
            if not veth_present:
                result.changed.extend(_remove_stale_ports(cfg, view, timeout))
            # ---- step 2: the veth pair, outside OVSDB
            try:
                veth = links.ensure_veth_pair(mesh.to_socket, sock.from_mesh, netns=netns)
                veth_created = veth.created
                if veth.created:
                    result.created.append(f"veth pair {mesh.to_socket}/{sock.from_mesh}")
                else:
                    result.changed.extend(veth.changes)
                for end in (mesh.to_socket, sock.from_mesh):
                    if links.disable_tx_offload(end, netns=netns) and veth_present:
                        result.changed.append(f"{end}: TX checksum offload off")
            except links.LinkError as exc:
                raise BootstrapError(str(exc)) from exc
            # ---- step 3: one OVSDB transaction
            undo, next_cfg = _transact(cfg, view, result, timeout)
            # ---- step 4: ovs-vswitchd applied it?
            _wait_applied(view, cfg, next_cfg, timeout)
        except BaseException as exc:
            _rollback(view, undo, veth_created, cfg, netns, timeout)
            if isinstance(exc, BootstrapError):
                raise
            if isinstance(exc, Exception):
                raise BootstrapError(f"bootstrap failed: {type(exc).__name__}: {exc}") from exc
            raise
        result.snapshot = view.snapshot()
        return result
    finally:
        view.close()


def _ensure_pki(cfg: HostConfig, result: BootstrapResult) -> None:
    """The per-host CA and certificates of the TLS channel (controller.pki), before the
    transaction that points OVS's SSL row at them. Not undone on rollback: keys that
    nothing uses yet are harmless, and the next run keeps them."""
    from controller.pki import PkiError, ensure_pki

    try:
        made = ensure_pki(cfg)
    except PkiError as exc:
        raise BootstrapError(str(exc)) from exc
    result.created.extend(made.created)
    result.changed.extend(made.changed)


def _rollback(
    view: OvsdbView,
    undo: _Undo,
    veth_created: bool,
    cfg: HostConfig,
    netns: str | None,
    timeout: float,
) -> None:
    if not undo.empty():
        try:
            _apply_undo(view, undo, timeout)
        except Exception:
            log.exception("rollback of OVSDB changes failed")
    if veth_created:
        try:
            links.delete_link(cfg.bridges.mesh.to_socket, netns=netns)
        except links.LinkError:
            log.exception("rollback: could not delete veth %s", cfg.bridges.mesh.to_socket)


def teardown(cfg: HostConfig, *, netns: str | None = None, timeout: float = 10.0) -> list[str]:
    """Remove both bridges (with all their ports) and the veth pair. For labs.

    Idempotent; returns what was removed.
    """
    removed: list[str] = []
    view = _open_view(cfg, timeout)
    try:
        names = {cfg.bridges.mesh.name, cfg.bridges.socket.name}

        def stage(idl: ovs.db.idl.Idl, txn: Txn) -> list[str] | None:
            root = root_row(idl)
            present = {b.name for b in idl.tables["Bridge"].rows.values()} & names
            if root is None or not present:
                return None
            root.verify("bridges")
            root.bridges = [b for b in root.bridges if b is not None and b.name not in names]
            root.increment("next_cfg")
            return [f"bridge {b}" for b in sorted(present)]

        try:
            done = transact(view, stage, comment="socknet teardown", timeout=timeout)
        except OvsdbError as exc:
            raise BootstrapError(str(exc)) from exc
        if done is not None:
            removed.extend(done.staged)
            try:
                wait_applied(view, done.next_cfg, timeout)
            except NotApplied:
                log.warning("ovs-vswitchd did not apply the change within %gs", timeout)
        try:
            if links.delete_link(cfg.bridges.mesh.to_socket, netns=netns):
                removed.append(
                    f"veth pair {cfg.bridges.mesh.to_socket}/{cfg.bridges.socket.from_mesh}"
                )
            # A lone from-mesh (peer gone) would block the next bootstrap.
            elif links.delete_link(cfg.bridges.socket.from_mesh, netns=netns):
                removed.append(f"link {cfg.bridges.socket.from_mesh}")
        except links.LinkError as exc:
            raise BootstrapError(str(exc)) from exc
        return removed
    finally:
        view.close()

