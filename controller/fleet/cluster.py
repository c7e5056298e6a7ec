"""A member of the fleet database's Raft cluster: its files, command lines and processes.

The cluster is 3 or 5 ``ovsdb-server`` processes, one per member host, talking
Raft over TLS on the members' mesh addresses (``ssl:ADDR:6643``). The first
member creates it (``ovsdb-tool create-cluster``, from a standalone seed
database that already holds the listener and RBAC rows, see ``schema``); every
other member joins it (``ovsdb-tool join-cluster``; the join completes once its
server reaches a member already in). Each server listens

* for hosts on ``pssl:6641`` (the ``Connection`` row of the database, role
  ``socknet-host``: RBAC, identity = client certificate CN), and
* for administrators on ``punix:<run_dir>/admin.sock`` (no role: full access,
  reachable only by root on that member).

The ``*_argv`` functions only compute command lines (pure); ``init_member``,
``join_member``, ``exec_server`` and ``cluster_status`` run them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.fleet.schema import DB_NAME, GLOBAL, SCHEMA_PATH, bootstrap_txn
from topology.config import FleetCfg

TOOL_TIMEOUT_S = 30.0
SSL_PROTOCOLS = "TLSv1.2"  # OVS 3.1 knows TLSv1, TLSv1.1, TLSv1.2: only the last is safe


class FleetClusterError(RuntimeError):
    """A member's database could not be created, joined or served."""


def ssl_target(address: str, port: int, scheme: str = "ssl") -> str:
    """``ssl:ADDR:PORT`` (IPv6 in brackets, as OVS wants it)."""
    if ipaddress.ip_address(address).version == 6:
        address = f"[{address}]"
    return f"{scheme}:{address}:{port}"


def client_remotes(members: Sequence[str], port: int) -> str:
    """The comma-separated remote list a host's IDL gets: every member, so it reads from
    whichever answers and fails over by itself."""
    return ",".join(ssl_target(a, port) for a in members)


def hosts_listener(port: int) -> str:
    """The hosts' listener. One ``Connection`` row serves every member (the row is
    replicated), so it names no address: each member listens on all of its own.
    Only clients with a certificate of the fleet CA get past TLS."""
    return f"pssl:{port}"


@dataclass(frozen=True)
class MemberSpec:
    """One member's files and addresses (from host.yaml's ``fleet`` section)."""

    db: Path
    run_dir: Path
    address: str  # this member's mesh address
    raft_port: int
    client_port: int
    key: Path
    cert: Path
    ca_cert: Path

    @property
    def raft_local(self) -> str:
        return ssl_target(self.address, self.raft_port)

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"

    @property
    def admin_remote(self) -> str:
        return f"unix:{self.admin_socket}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "ovsdb-server.pid"

    @property
    def ctl(self) -> Path:
        return self.run_dir / "ovsdb-server.ctl"

    @property
    def seed(self) -> Path:
        return self.db.with_name(self.db.name + ".seed")


def member_spec(fleet: FleetCfg) -> MemberSpec:
    """This host's member files and addresses; FleetClusterError if it is no member."""
    if fleet.member is None:
        raise FleetClusterError("this host is no fleet database member (host.yaml: "
                                "fleet.member is not set)")
    m = fleet.member
    return MemberSpec(db=Path(m.db), run_dir=Path(m.run_dir), address=m.address,
                      raft_port=fleet.raft_port, client_port=fleet.client_port,
                      key=Path(fleet.tls.key), cert=Path(fleet.tls.cert),
                      ca_cert=Path(fleet.tls.ca_cert))


def seed_argvs(spec: MemberSpec, schema: Path = SCHEMA_PATH) -> list[list[str]]:
    """Create the standalone seed database and write the first rows into it."""
    return [
        ["ovsdb-tool", "create", str(spec.seed), str(schema)],
        ["ovsdb-tool", "transact", str(spec.seed), bootstrap_txn(hosts_listener(spec.client_port))],
    ]


def create_cluster_argv(spec: MemberSpec) -> list[str]:
    return ["ovsdb-tool", "create-cluster", str(spec.db), str(spec.seed), spec.raft_local]


def join_cluster_argv(spec: MemberSpec, members: Sequence[str]) -> list[str]:
    """Join through every other member's Raft address (any one that answers will do)."""
    others = [ssl_target(a, spec.raft_port) for a in members if a != spec.address]
    if not others:
        raise FleetClusterError("join: no other member to join (fleet.members lists only "
                                "this host)")
    return ["ovsdb-tool", "join-cluster", str(spec.db), DB_NAME, spec.raft_local, *others]


def server_argv(spec: MemberSpec, *, detach: bool = False,
                log_file: Path | None = None) -> list[str]:
    """The member's ovsdb-server. Without ``detach`` it stays in the foreground and logs
    to stderr (systemd); with it, it forks and logs to ``log_file`` (labs)."""
    argv = [
        "ovsdb-server", str(spec.db),
        f"--remote=db:{DB_NAME},{GLOBAL},connections",
        f"--remote=punix:{spec.admin_socket}",
        f"--private-key={spec.key}", f"--certificate={spec.cert}", f"--ca-cert={spec.ca_cert}",
        f"--ssl-protocols={SSL_PROTOCOLS}",
        f"--pidfile={spec.pidfile}", f"--unixctl={spec.ctl}", "--no-chdir",
    ]
    if detach:
        argv.append("--detach")
        if log_file is not None:
            argv.append(f"--log-file={log_file}")
    else:
        argv += ["-vconsole:info", "-vsyslog:off"]
    return argv


# --------------------------------------------------------------------------- running


def run_tool(argv: Sequence[str], timeout_s: float = TOOL_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise FleetClusterError(f"{argv[0]} not found (install openvswitch-switch)") from None
    except subprocess.TimeoutExpired:
        raise FleetClusterError(f"{argv[0]} {argv[1]}: timed out after {timeout_s:g}s") from None
    if proc.returncode != 0:
        raise FleetClusterError(f"{' '.join(argv[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout


def _fresh_db(spec: MemberSpec) -> None:
    if spec.db.exists():
        raise FleetClusterError(f"{spec.db} exists: this host already is a member "
                                "(remove it only to leave the cluster for good)")
    spec.db.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    for path in (spec.key, spec.cert, spec.ca_cert):
        if not path.is_file():
            raise FleetClusterError(f"{path}: no such file (see `socknet fleet cert`)")


def init_member(spec: MemberSpec) -> None:
    """Create the cluster with this host as its first member."""
    _fresh_db(spec)
    spec.seed.unlink(missing_ok=True)
    try:
        for argv in seed_argvs(spec):
            run_tool(argv)
        run_tool(create_cluster_argv(spec))
    finally:
        spec.seed.unlink(missing_ok=True)


def join_member(spec: MemberSpec, members: Sequence[str]) -> None:
    """Make this host's database a joining member (complete once its server runs)."""
    _fresh_db(spec)
    run_tool(join_cluster_argv(spec, members))


def exec_server(spec: MemberSpec) -> None:
    """Replace this process with the member's ovsdb-server (``socknet fleet serve``)."""
    if not spec.db.exists():
        raise FleetClusterError(f"{spec.db}: no database (run `socknet fleet init` on the "
                                "first member, `socknet fleet join` on the others)")
    spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    argv = server_argv(spec)
    os.execvp(argv[0], argv)


_STATUS_LINE = re.compile(r"^(?P<key>[A-Za-z][A-Za-z ]*):\s*(?P<value>.*)$")


def parse_cluster_status(text: str) -> dict[str, str]:
    """The ``Key: value`` lines of ``ovs-appctl cluster/status`` (Role, Term, Leader,
    Status, ...), keys lower-case with underscores."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _STATUS_LINE.match(line)
        if m:
            out.setdefault(m.group("key").strip().lower().replace(" ", "_"),
                           m.group("value").strip())
    return out


def cluster_status(ctl: Path, timeout_s: float = 5.0) -> dict[str, str]:
    """This member's view of the cluster (role, term, leader, ...)."""
    return parse_cluster_status(run_tool(
        ["ovs-appctl", "-t", str(ctl), f"--timeout={int(timeout_s)}", "cluster/status",
         DB_NAME], timeout_s + 2))
