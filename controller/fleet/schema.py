"""The fleet database's schema file, its RBAC rules and its first rows (data, no I/O).

RBAC (ovsdb-server checks writes only; reads are open to every authenticated
client): a connection arriving on the hosts' listener (the ``Connection`` row
with ``role = socknet-host``) is identified by the CN of its TLS client
certificate. For each table the role may write, one ``RBAC_Permission`` row says
which column must equal that CN in every row inserted, updated or deleted
(``authorization``), whether rows may be inserted and deleted at all, and which
columns may be updated (the identity column never is). Tables without a
permission row (``Policy``, ``Fleet_Global``, ``Connection``, the RBAC tables
themselves) are read-only for the role. Administrative writes (``policy push``)
come through the member's local unix socket, a listener with no role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("fleet.ovsschema")
DB_NAME = "Fleet"
HOST_ROLE = "socknet-host"

GLOBAL, CONNECTION = "Fleet_Global", "Connection"
HOST, HOST_STATUS, ENDPOINT, POLICY = "Host", "Host_Status", "Endpoint", "Policy"
RBAC_ROLE, RBAC_PERMISSION = "RBAC_Role", "RBAC_Permission"


@dataclass(frozen=True)
class Permission:
    """What the host role may do to one table: only rows whose ``owner`` column equals
    the client's certificate CN, inserting/deleting them, updating ``update``."""

    table: str
    owner: str
    update: tuple[str, ...]
    insert_delete: bool = True


HOST_PERMISSIONS: tuple[Permission, ...] = (
    Permission(HOST, "name", ("mesh_addresses", "wg_public_key", "version", "external_ids")),
    Permission(HOST_STATUS, "name", ("last_seen", "heartbeat_interval", "applied_generation",
                                     "applied_at", "error_generation", "apply_error")),
    Permission(ENDPOINT, "host", ("vmid", "ipv4", "ipv6", "port_class", "source",
                                  "claimed_at")),
)


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def bootstrap_ops(client_target: str) -> list[dict[str, Any]]:
    """The first rows of a new fleet database: the one global row, the hosts' listener
    ``client_target`` (e.g. ``pssl:6641``) with the host role, and that role's rules.
    ``ovsdb-tool transact`` applies them to the standalone seed database that
    ``create-cluster`` then copies."""
    perm_names = {p.table: f"perm_{p.table.lower()}" for p in HOST_PERMISSIONS}
    ops: list[dict[str, Any]] = [
        {"op": "insert", "table": GLOBAL,
         "row": {"connections": ["set", [["named-uuid", "hosts_listener"]]]}},
        {"op": "insert", "table": CONNECTION, "uuid-name": "hosts_listener",
         "row": {"target": client_target, "role": HOST_ROLE,
                 "inactivity_probe": 30_000}},
        {"op": "insert", "table": RBAC_ROLE,
         "row": {"name": HOST_ROLE, "permissions": ["map", [
             [p.table, ["named-uuid", perm_names[p.table]]] for p in HOST_PERMISSIONS]]}},
    ]
    for p in HOST_PERMISSIONS:
        ops.append({"op": "insert", "table": RBAC_PERMISSION, "uuid-name": perm_names[p.table],
                    "row": {"table": p.table, "authorization": ["set", [p.owner]],
                            "insert_delete": p.insert_delete,
                            "update": ["set", list(p.update)]}})
    return ops


def bootstrap_txn(client_target: str) -> str:
    """``bootstrap_ops`` as the JSON argument of ``ovsdb-tool transact``."""
    return json.dumps([DB_NAME, *bootstrap_ops(client_target)])
