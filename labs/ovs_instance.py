"""A private Open vSwitch instance (own ovsdb-server + ovs-vswitchd, own run dir).

Nothing touches the system instance: every path (database, sockets, pidfiles,
logs) lives in ``rundir`` and the ``OVS_*DIR`` variables point there too. When
``netns`` is given both daemons run inside that network namespace; with the
netdev (userspace) datapath ovs-vswitchd opens its ports in that namespace.

    with OvsInstance("hostA", Path("/tmp/x/hostA"), netns="hostA") as ovs:
        ovs.vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev")
        ovs.ofctl("add-flow", ovs.mgmt("br0"), "actions=NORMAL")
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from labs.netns import ns_argv, pid_alive

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVS_SAVE = Path("/usr/share/openvswitch/scripts/ovs-save")  # what ovs-ctl restart runs
OF_VERSION = "OpenFlow14"
CMD_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 25


class OvsError(RuntimeError):
    """An OVS command failed."""


class OvsStartError(OvsError):
    """A daemon of the instance did not start; the message carries its log tail."""


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_daemon(pid: int, daemon: str) -> bool:
    """True if ``pid`` is alive and really is ``daemon`` (guards against PID reuse)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == daemon[:15] and pid_alive(pid)


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class OvsInstance:
    """One private OVS: ``start()``, use ``vsctl``/``ofctl``/``appctl``, ``stop()``."""

    def __init__(self, name: str, rundir: Path, netns: str | None = None) -> None:
        self.name = name
        self.rundir = Path(rundir).absolute()
        self.netns = netns

    # ------------------------------------------------------------------ paths

    @property
    def db_path(self) -> Path:
        return self.rundir / "conf.db"

    @property
    def db_sock(self) -> Path:
        return self.rundir / "db.sock"

    @property
    def db_remote(self) -> str:
        """OVSDB remote of this instance, ``unix:<rundir>/db.sock``."""
        return f"unix:{self.db_sock}"

    @property
    def vswitchd_ctl(self) -> Path:
        return self.rundir / "ovs-vswitchd.ctl"

    @property
    def ovsdb_ctl(self) -> Path:
        return self.rundir / "ovsdb-server.ctl"

    @property
    def vswitchd_log(self) -> Path:
        return self.rundir / "ovs-vswitchd.log"

    @property
    def ovsdb_log(self) -> Path:
        return self.rundir / "ovsdb-server.log"

    def pidfile(self, daemon: str) -> Path:
        """Pidfile of ``daemon`` (``"ovsdb-server"`` or ``"ovs-vswitchd"``)."""
        return self.rundir / f"{daemon}.pid"

    def pid(self, daemon: str) -> int | None:
        """PID of ``daemon`` if it is running, else None."""
        pid = _read_pid(self.pidfile(daemon))
        return pid if pid is not None and _is_daemon(pid, daemon) else None

    @property
    def vswitchd_pid(self) -> int | None:
        return self.pid("ovs-vswitchd")

    @property
    def ovsdb_pid(self) -> int | None:
        return self.pid("ovsdb-server")

    @property
    def running(self) -> bool:
        """True if both daemons are alive."""
        return self.ovsdb_pid is not None and self.vswitchd_pid is not None

    def mgmt(self, bridge: str) -> str:
        """OpenFlow management target of ``bridge``, ``unix:<rundir>/<bridge>.mgmt``."""
        return f"unix:{self.rundir / bridge}.mgmt"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points every OVS default path at ``rundir``."""
        env = dict(os.environ)
        for var in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"):
            env[var] = str(self.rundir)
        return env

    # ------------------------------------------------------------------ commands

    def _run(self, argv: list[str], timeout_s: float = CMD_TIMEOUT_S) -> str:
        try:
            proc = subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise OvsError(f"[{self.name}] timed out after {timeout_s}s: {argv}") from exc
        if proc.returncode != 0:
            raise OvsError(
                f"[{self.name}] {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout

    def vsctl(self, *args: str, timeout_s: float = 10.0) -> str:
        """Run ``ovs-vsctl`` against this instance's database; return stdout."""
        argv = ["ovs-vsctl", f"--db={self.db_remote}", f"--timeout={int(timeout_s)}", *args]
        return self._run(argv, timeout_s + 5)

    def ofctl(self, *args: str) -> str:
        """Run ``ovs-ofctl -O OpenFlow14 <args>``; pass the target, e.g. ``mgmt(br)``."""
        return self._run(["ovs-ofctl", "-O", OF_VERSION, *args])

    def appctl(self, *args: str) -> str:
        """Run ``ovs-appctl`` against this instance's ovs-vswitchd."""
        return self._run(["ovs-appctl", "-t", str(self.vswitchd_ctl), *args])

    def dump_flows(self, bridge: str, *, no_stats: bool = True) -> list[str]:
        """Flows of ``bridge``, one string each, without the reply header line."""
        opts = ["--no-stats"] if no_stats else []
        out = self.ofctl(*opts, "dump-flows", self.mgmt(bridge))
        return [
            line.strip()
            for line in out.splitlines()
            if line.strip() and not line.lstrip().startswith(("OFPST_", "NXST_"))
        ]

    def add_bridge(self, bridge: str, *, fail_mode: str = "secure") -> None:
        """Create a netdev (userspace datapath) bridge with the given fail mode."""
        self.vsctl(
            "add-br", bridge, "--", "set", "bridge", bridge,
            "datapath_type=netdev", f"fail_mode={fail_mode}",
        )  # fmt: skip

    def add_port(self, bridge: str, port: str, ofport: int | None = None) -> int:
        """Add an existing interface of the namespace as a port; return its ofport."""
        args = ["add-port", bridge, port]
        if ofport is not None:
            args += ["--", "set", "interface", port, f"ofport_request={ofport}"]
        self.vsctl(*args)
        return self.ofport(port)

    def ofport(self, port: str) -> int:
        """OpenFlow port number of interface ``port`` (-1 if OVS could not open it).
        OvsError while the row exists but vswitchd has not numbered it yet (``[]``)."""
        value = self.vsctl("get", "interface", port, "ofport").strip()
        if value == "[]":
            raise OvsError(f"interface {port}: no ofport yet")
        return int(value)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 10.0) -> OvsInstance:
        """Create the database, start both daemons and wait until they answer.

        A no-op if both are already running. On failure the daemons are killed,
        the run dir (logs) is kept until ``stop()``, and OvsStartError is raised.
        """
        if self.running:
            return self
        self.rundir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.db_path.exists():
                self._run(["ovsdb-tool", "create", str(self.db_path), str(SCHEMA)])
            self._start_ovsdb(timeout_s)
            self.vsctl("--no-wait", "init", "--", "set", "Open_vSwitch", ".",
                       f"external_ids:system-id={self.name}")  # fmt: skip
            self._start_vswitchd(timeout_s)
        except Exception:
            self._kill_daemons()
            raise
        return self

    def restart_vswitchd(self, timeout_s: float = 10.0) -> None:
        """Stop ovs-vswitchd and start it again (the database keeps running)."""
        self._stop_daemon("ovs-vswitchd")
        self._start_vswitchd(timeout_s)

    def restart_vswitchd_restoring_flows(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Restart ovs-vswitchd the way ``ovs-ctl restart`` does (package upgrades): the
        distribution's ovs-save writes a script that restores every bridge's flows; the
        new ovs-vswitchd starts with other_config:flow-restore-wait=true (it processes no
        packets and connects to no controller), the script restores the flows, then
        flow-restore-wait is removed. Returns the monotonic time of each step."""
        bridges = self.vsctl("list-br").split()
        env = {**self.env, "TMPDIR": str(self.rundir)}  # ovs-save's dumps live there
        saved = subprocess.run([str(OVS_SAVE), "save-flows", *bridges], env=env,
                               capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if saved.returncode != 0:
            raise OvsError(f"[{self.name}] ovs-save failed: {saved.stderr.strip()}")
        script = self.rundir / "restore-flows.sh"
        script.write_text(saved.stdout)
        steps = {"stop": time.monotonic()}
        self._stop_daemon("ovs-vswitchd")
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:flow-restore-wait=true")
        self._start_vswitchd(timeout_s)
        steps["started"] = time.monotonic()
        restored = subprocess.run(["sh", "-e", str(script)], env=env, capture_output=True,
                                  text=True, timeout=CMD_TIMEOUT_S)
        steps["restored"] = time.monotonic()
        self.vsctl("--if-exists", "remove", "Open_vSwitch", ".", "other_config",
                   "flow-restore-wait=true")
        steps["cleared"] = time.monotonic()
        if restored.returncode != 0:
            raise OvsError(f"[{self.name}] restoring saved flows failed: "
                           f"{restored.stderr.strip()[-2000:]}")
        return steps

    def stop(self, *, remove_rundir: bool = True) -> None:
        """Kill both daemons (SIGTERM, then SIGKILL) and remove the run dir.

        Safe to call twice and after a failed ``start()``.
        """
        self._kill_daemons()
        if remove_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> OvsInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OvsInstance({self.name!r}, {str(self.rundir)!r}, netns={self.netns!r})"

    # ------------------------------------------------------------------ internals

    def _kill_daemons(self) -> None:
        self._stop_daemon("ovs-vswitchd")
        self._stop_daemon("ovsdb-server")

    def _stop_daemon(self, daemon: str, grace_s: float = 2.0) -> None:
        pid = self.pid(daemon)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _wait_dead(pid, grace_s):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_dead(pid, grace_s)
        self.pidfile(daemon).unlink(missing_ok=True)

    def _spawn(self, daemon: str, args: list[str], timeout_s: float) -> None:
        """Start ``daemon --detach`` inside the namespace; raise with its log on failure."""
        log = self.rundir / f"{daemon}.log"
        out = self.rundir / f"{daemon}.out"
        argv = [
            daemon,
            *args,
            f"--pidfile={self.pidfile(daemon)}",
            f"--unixctl={self.rundir / daemon}.ctl",
            f"--log-file={log}",
            "--detach",
            "--no-chdir",
        ]
        with out.open("ab") as fh:
            try:
                rc = subprocess.run(
                    ns_argv(self.netns, argv),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        if rc != 0:
            raise self._start_error(daemon, f"exited with {rc}")

    def _start_error(self, daemon: str, why: str) -> OvsStartError:
        log = self.rundir / f"{daemon}.log"
        out = self.rundir / f"{daemon}.out"
        return OvsStartError(
            f"[{self.name}] {daemon} failed to start (netns={self.netns}): {why}\n"
            f"--- {log} (tail) ---\n{_tail(log)}\n--- {out} (tail) ---\n{_tail(out)}"
        )

    def _wait_until(self, daemon: str, probe: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            try:
                self._run(probe, timeout_s=max(1.0, deadline - time.monotonic()))
                return
            except OvsError as exc:
                last = str(exc)
            if time.monotonic() >= deadline or self.pid(daemon) is None:
                raise self._start_error(daemon, f"not ready: {last}")
            time.sleep(0.05)

    def _start_ovsdb(self, timeout_s: float) -> None:
        self._spawn(
            "ovsdb-server", [str(self.db_path), f"--remote=punix:{self.db_sock}"], timeout_s
        )
        # --no-wait: on a fresh database vsctl would otherwise wait for (absent) vswitchd.
        probe = ["ovs-vsctl", f"--db={self.db_remote}", "--timeout=5", "--no-wait", "show"]
        self._wait_until("ovsdb-server", probe, timeout_s)

    def _start_vswitchd(self, timeout_s: float) -> None:
        self._spawn("ovs-vswitchd", [self.db_remote], timeout_s)
        self._wait_until(
            "ovs-vswitchd", ["ovs-appctl", "-t", str(self.vswitchd_ctl), "version"], timeout_s
        )
        # Without --no-wait, vsctl returns only once vswitchd has applied the config.
        probe = ["ovs-vsctl", f"--db={self.db_remote}", "--timeout=5", "init"]
        self._wait_until("ovs-vswitchd", probe, timeout_s)
