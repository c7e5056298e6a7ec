"""A fleet database cluster for tests: real ovsdb-server Raft members over TLS.

Every name and address lives in namespaces the lab creates (P = the prefix)::

    P f       the fabric: Linux bridge `fb`, one port per namespace below
    P m<N>    member N (N = 1..members): its ovsdb-server (Raft on
              ssl:198.51.100.N:6643, hosts on pssl:6641, admin on the unix
              socket <workdir>/m<N>/admin.sock), address 198.51.100.N/24 on eth0;
              also simulated host N's namespace (a member is a host too)
    P h<N>    extra simulated hosts (N = members+1..), no database member

Host N's name (its certificate's CN, its RBAC identity) is ``host<N>``. The PKI
(``controller.fleet.pki``: one CA, one certificate per host) is in
<workdir>/pki. The cluster is made the way ``socknet fleet init`` / ``join``
make it (``controller.fleet.cluster``): the first member creates it, the
others join, each server started detached inside its namespace.

Admin sockets are unix sockets: reachable from the test process in the root
namespace. Hosts' TLS clients must run inside a lab namespace:
``in_netns(ns)`` gives a thread setup function for ``FleetClient.start``, and
``ovsdb_client(n, ...)`` runs ``ovsdb-client`` as host n inside its namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.fleet import pki
from controller.fleet.client import FleetClient
from controller.fleet.cluster import (
    FleetClusterError,
    MemberSpec,
    client_remotes,
    cluster_status,
    init_member,
    join_member,
    server_argv,
)
from labs import netns as nsl
from labs.waiting import eventually
from topology.check import check_policy_text
from topology.fleet import ApplyReport, HostRecord, PolicyGeneration

FABRIC_NET = ipaddress.ip_network("198.51.100.0/24")  # TEST-NET-2
FABRIC_BRIDGE = "fb"
RAFT_PORT, CLIENT_PORT = 6643, 6641
PREFIX_MAX = 9
READY_TIMEOUT_S = 20.0


class FleetLabError(RuntimeError):
    """A step of the lab failed."""


def in_netns(ns: str) -> Callable[[], None]:
    """A function that moves the calling thread into namespace ``ns`` (Linux keeps the
    network namespace per thread: sockets the thread opens afterwards live there)."""
    def enter() -> None:
        from pyroute2 import netns

        netns.setns(ns, flags=0)

    return enter


class FleetLab:
    """``FleetLab(prefix, workdir, members=3, hosts=0).up()``; ``down()`` removes all."""

    def __init__(self, prefix: str, workdir: Path, members: int = 3, hosts: int = 0) -> None:
        if not 1 <= len(prefix) <= PREFIX_MAX or not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
            raise ValueError(f"prefix must be 1-{PREFIX_MAX} lower-case letters/digits")
        if members not in (1, 3, 5):
            raise ValueError("members: 1, 3 or 5")
        self.prefix = prefix
        self.workdir = Path(workdir).absolute()
        self.members = members
        self.hosts = hosts

    # ------------------------------------------------------------ names

    @property
    def fabric_ns(self) -> str:
        return f"{self.prefix}f"

    def ns(self, n: int) -> str:
        return f"{self.prefix}m{n}" if n <= self.members else f"{self.prefix}h{n}"

    @staticmethod
    def host_name(n: int) -> str:
        return f"host{n}"

    @staticmethod
    def address(n: int) -> str:
        return str(FABRIC_NET.network_address + n)

    @property
    def member_addresses(self) -> list[str]:
        return [self.address(n) for n in range(1, self.members + 1)]

    @property
    def remotes(self) -> str:
        """Every member's hosts' listener, as a host's client gets them."""
        return client_remotes(self.member_addresses, CLIENT_PORT)

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def ca_dir(self) -> Path:
        return self.pki_dir / "ca"

    def identity(self, name: str) -> pki.CertFiles:
        """Key, certificate (CN = ``name``) and CA of a client; issued on first use."""
        files = pki.host_files(self.pki_dir, name)
        if not files.cert.exists():
            pki.issue_cert(self.ca_dir, name, files)
        return files

    def tls(self, n: int) -> tuple[Path, Path, Path]:
        """Host n's (key, cert, ca_cert), as FleetClient takes them."""
        f = self.identity(self.host_name(n))
        return (f.key, f.cert, f.ca_cert)

    def spec(self, n: int) -> MemberSpec:
        f = self.identity(self.host_name(n))
        run_dir = self.workdir / f"m{n}"
        return MemberSpec(db=run_dir / "fleet.db", run_dir=run_dir, address=self.address(n),
                          raft_port=RAFT_PORT, client_port=CLIENT_PORT,
                          key=f.key, cert=f.cert, ca_cert=f.ca_cert)

    def admin_remote(self, n: int = 1) -> str:
        return self.spec(n).admin_remote

    def log_file(self, n: int) -> Path:
        return self.spec(n).run_dir / "ovsdb-server.log"

    @property
    def namespaces(self) -> list[str]:
        return [self.fabric_ns, *(self.ns(n) for n in range(1, self.members + self.hosts + 1))]

    # ------------------------------------------------------------ lifecycle

    def up(self) -> FleetLab:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki.create_ca(self.ca_dir, f"socknet lab {self.prefix} CA")
        nsl.create_netns(self.fabric_ns)
        nsl.run(self.fabric_ns, ["ip", "link", "add", FABRIC_BRIDGE, "type", "bridge",
                                 "stp_state", "0"], check=True)
        nsl.link_up(self.fabric_ns, FABRIC_BRIDGE)
        for n in range(1, self.members + self.hosts + 1):
            ns = self.ns(n)
            nsl.create_netns(ns)
            nsl.add_veth("eth0", f"p{n}", ns, self.fabric_ns)
            nsl.run(self.fabric_ns, ["ip", "link", "set", f"p{n}", "master", FABRIC_BRIDGE],
                    check=True)
            nsl.add_addr(ns, "eth0", f"{self.address(n)}/{FABRIC_NET.prefixlen}")
            self.identity(self.host_name(n))
        init_member(self.spec(1))
        self.start(1)
        for n in range(2, self.members + 1):
            join_member(self.spec(n), self.member_addresses)
            self.start(n)
        if not eventually(self._all_joined, READY_TIMEOUT_S, 0.1):
            raise FleetLabError(f"cluster did not form:\n{self.describe()}")

    def _all_joined(self) -> bool:
        try:
            statuses = [self.status(n) for n in range(1, self.members + 1)]
        except FleetClusterError:
            return False
        return (all(s.get("status") == "cluster member" for s in statuses)
                and sum(s.get("role") == "leader" for s in statuses) == 1)

    def start(self, n: int) -> None:
        """Start member n's ovsdb-server (detached, inside its namespace)."""
        spec = self.spec(n)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        argv = server_argv(spec, detach=True, log_file=self.log_file(n))
        proc = nsl.run(self.ns(n), argv, timeout=15)
        if proc.returncode != 0:
            raise FleetLabError(f"member {n}: ovsdb-server exited {proc.returncode}: "
                                f"{proc.stderr.strip()}\n{self._log_tail(n)}")

    def pid(self, n: int) -> int | None:
        try:
            pid = int(self.spec(n).pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if nsl.pid_alive(pid) else None

    def kill(self, n: int, sig: int = signal.SIGKILL) -> None:
        """Kill member n's server (SIGKILL: as a crash) and wait until it is gone."""
        pid = self.pid(n)
        if pid is None:
            return
        os.kill(pid, sig)
        if not eventually(lambda: not nsl.pid_alive(pid), 5.0, 0.02):
            os.kill(pid, signal.SIGKILL)
        self.spec(n).pidfile.unlink(missing_ok=True)

    def status(self, n: int) -> dict[str, str]:
        return cluster_status(self.spec(n).ctl)

    def leader(self) -> int | None:
        """The member that says it leads (None during an election)."""
        for n in range(1, self.members + 1):
            if self.pid(n) is None:
                continue
            try:
                if self.status(n).get("role") == "leader":
                    return n
            except FleetClusterError:
                continue
        return None

    def down(self) -> None:
        for n in range(1, self.members + 1):
            try:
                self.kill(n, signal.SIGTERM)
            except OSError:
                pass
        for ns in reversed(self.namespaces):
            nsl.delete_netns(ns, kill_procs=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ clients

    def ovsdb_client(self, n: int, *args: str, identity: str | None = None,
                     timeout_s: float = 15.0) -> subprocess.CompletedProcess[str]:
        """``ovsdb-client ARGS`` inside host n's namespace, presenting the certificate of
        ``identity`` (default: host n's own)."""
        f = self.identity(identity or self.host_name(n))
        argv = ["ovsdb-client", f"--private-key={f.key}", f"--certificate={f.cert}",
                f"--ca-cert={f.ca_cert}", *args]
        result: subprocess.CompletedProcess[str] = nsl.run(self.ns(n), argv, timeout=timeout_s)
        return result

    def transact_as(self, n: int, ops: list[dict[str, Any]], member: int = 1,
                    identity: str | None = None) -> list[Any]:
        """One transaction from host n (TLS, its certificate) to ``member``; the reply."""
        remote = f"ssl:{self.address(member)}:{CLIENT_PORT}"
        proc = self.ovsdb_client(n, "transact", remote, json.dumps(["Fleet", *ops]),
                                 identity=identity)
        if proc.returncode != 0 and not proc.stdout.strip():
            raise FleetLabError(f"ovsdb-client transact failed: {proc.stderr.strip()}")
        reply: list[Any] = json.loads(proc.stdout)
        return reply

    def admin_transact(self, ops: list[dict[str, Any]], member: int = 1) -> list[Any]:
        proc = subprocess.run(["ovsdb-client", "transact", self.admin_remote(member),
                               json.dumps(["Fleet", *ops])],
                              capture_output=True, text=True, timeout=15)
        if proc.returncode != 0 and not proc.stdout.strip():
            raise FleetLabError(f"ovsdb-client transact failed: {proc.stderr.strip()}")
        reply: list[Any] = json.loads(proc.stdout)
        return reply

    def select(self, table: str, where: list[Any] | None = None, member: int = 1
               ) -> list[dict[str, Any]]:
        """Rows of ``table`` as ``member`` has them (admin socket, no TLS)."""
        reply = self.admin_transact([{"op": "select", "table": table, "where": where or []}],
                                    member)
        rows: list[dict[str, Any]] = reply[0]["rows"]
        return rows

    # ------------------------------------------------------------ diagnostics

    def _log_tail(self, n: int, lines: int = 20) -> str:
        try:
            text = self.log_file(n).read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        out = []
        for n in range(1, self.members + 1):
            try:
                st = self.status(n)
            except FleetClusterError as exc:
                st = {"error": str(exc)}
            out.append(f"member {n} pid={self.pid(n)} {st}\n{self._log_tail(n, 8)}")
        return "\n".join(out)


def fake_wg_key(name: str) -> str:
    """A stand-in WireGuard public key, unique per host name (base64 of 32 bytes)."""
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(f"wg:{name}".encode()).digest()).decode()


class SimHost:
    """A simulated host: a FleetClient in host n's namespace that applies every policy
    generation it sees the way a controller re-checks it (parse, validate, tests) and
    reports the result. ``refuse(gen)`` may return a reason to refuse anyway (a host
    that cannot apply it); ``answer=False``: it never reports (a hung controller)."""

    def __init__(self, lab: FleetLab, n: int, *, heartbeat_s: float = 1.0,
                 refuse: Callable[[PolicyGeneration], str | None] | None = None,
                 answer: bool = True, version: str = "0.1.0") -> None:
        self.lab, self.n = lab, n
        self.name = lab.host_name(n)
        self.refuse, self.answer = refuse, answer
        self.record = HostRecord(self.name, fake_wg_key(self.name), (lab.address(n),), version)
        self.client = FleetClient(lab.remotes, self.record, tls=lab.tls(n),
                                  heartbeat_s=heartbeat_s)
        self.applied: list[int] = []
        self.client.on_policy(self._apply)

    def _apply(self, gen: PolicyGeneration) -> None:
        if not self.answer:
            return
        reason = self.refuse(gen) if self.refuse is not None else None
        if reason is None:
            _, problems = check_policy_text(gen.text, f"generation {gen.generation}")
            reason = "; ".join(problems) or None
        if reason is None:
            self.applied.append(gen.generation)
        self.client.report(ApplyReport(gen.generation, reason))

    def start(self) -> SimHost:
        self.client.start(in_netns(self.lab.ns(self.n)))
        return self

    def stop(self) -> None:
        self.client.stop()

    def member(self) -> int | None:
        """The member this host's client talks to."""
        addr = self.client.current_remote.split(":")[1]
        for m in range(1, self.lab.members + 1):
            if self.lab.address(m) == addr:
                return m
        return None


def wait_for(pred: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    """``eventually`` that raises with ``what`` (labs and tests)."""
    started = time.monotonic()
    if not eventually(pred, timeout_s):
        raise AssertionError(f"{what}: not within {timeout_s:g}s "
                             f"(waited {time.monotonic() - started:.1f}s)")
