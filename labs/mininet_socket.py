"""One Proxmox host's socket network in Mininet, programmed by socknet.

    make mininet                                # = python -m labs.mininet_socket --check
    python -m labs.mininet_socket --check       # up, check the verdicts, down; exit 0 if all hold
    python -m labs.mininet_socket --check --json    # the same, one JSON object on stdout
    python -m labs.mininet_socket --cli         # up, Mininet's CLI, down when you leave it
    python -m labs.mininet_socket --clean       # remove what a killed run left behind

Topology (the names are the ones Proxmox and socknet use)::

    mpeer eth0 -- nm-privacy [mesh] to-socket == from-mesh [vmbr0] warp0 -- eth0 warp up0 -- inet
                                                             |  veth100i0 -- c100 (privacy)
                                                             |  veth102i0 -- c102 (privacy)
                                                             |  veth200i0 -- c200 (service)
                                                             |  veth201i0 -- c201 (service)

``mesh`` and ``vmbr0`` are Mininet ``OVSSwitch`` es on the userspace datapath
(``datapath='user'``: there is no OVS kernel module here), ``fail_mode=secure``,
OpenFlow 1.3 + 1.4; the ``to-socket``/``from-mesh`` veth pair between them is a
Mininet link. The containers, the mesh peer (``mpeer``: a remote service
container 10.0.0.210 and a mesh user 10.101.0.5), the WARP exit (``warp``,
10.0.0.1) and a stand-in internet host behind it (``inet``, 198.18.0.2) are
Mininet hosts. socknet is the ``RemoteController``: ``python -m controller.cli
run`` with a generated host.yaml (OVSDB of the system Open vSwitch, a free
loopback port), started as a subprocess before the switches.

Mininet uses the system Open vSwitch (``/var/run/openvswitch``). If its daemons
are not running they are started here without the kernel module (the
``ovs-ctl`` script would load it): ``ovsdb-server`` on a throw-away database in
the state dir, serving the default socket, and ``ovs-vswitchd`` with the default
pidfile and control socket; both are stopped again at the end.

Only what this run created is removed, never with ``mn -c`` (which deletes every
OVS bridge and kills every controller on the machine). Before changing anything
the run refuses if a bridge, port or network device it would create already
exists (Mininet itself would delete it). What it creates is recorded in
``$SOCKNET_MININET_DIR/state.json`` (default ``/run/socknet-mininet``) as it
goes, so ``--clean`` (and the next run) can remove what a killed run left.
Runs are serialised by the lock file ``/run/socknet-mininet.lock``.

The Debian package ``mininet`` installs the module for Debian's python3 in
``/usr/lib/python3/dist-packages``; it is pure Python, so this script (and the
controller) run in the project's venv and only that directory is appended to
``sys.path`` when ``import mininet`` fails.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labs.lab import (
    EXIT_UPLINK_IP,
    GATEWAY,
    INTERNET_IP,
    MESH_SERVICE_IP,
    MESH_USER_IP,
    PRIVACY_IDS,
    SERVICE_IDS,
    container_ip,
    container_mac,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("SOCKNET_MININET_DIR", "/run/socknet-mininet"))
# one lock for every run whatever its state dir: they all share the system OVS and the names
LOCK_PATH = Path("/run/socknet-mininet.lock")
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
OVS_RUNDIR = Path("/var/run/openvswitch")
OVS_DB_SOCK = OVS_RUNDIR / "db.sock"
OVSDB_REMOTE = f"unix:{OVS_DB_SOCK}"
OVS_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVS_DAEMONS = ("ovsdb-server", "ovs-vswitchd")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

MESH, SOCKET = "mesh", "vmbr0"
UPLINK, TO_SOCKET, FROM_MESH, WARP = "nm-privacy", "to-socket", "from-mesh", "warp0"
PROTOCOLS = "OpenFlow13,OpenFlow14"
DPIDS = {MESH: "00000000000a0001", SOCKET: "00000000000a0002"}
MESH_PEER_MAC = "02:00:00:00:ee:01"
WARP_MAC = "02:00:00:00:ff:01"


def port_name(vmid: int) -> str:
    """Proxmox's host-side name of a container's first NIC."""
    return f"veth{vmid}i0"


# Every network device the run creates in the root namespace: the switch side of
# each link and the bridges' own devices. Mininet deletes a device of the same name
# before creating its veth, so the run refuses to start if any of them exists.
ROOT_LINKS = (UPLINK, TO_SOCKET, FROM_MESH, WARP,
              *(port_name(v) for v in (*PRIVACY_IDS, *SERVICE_IDS)))
BRIDGES = (MESH, SOCKET)


def host_config_text(controller_port: int, metrics_port: int,
                     ovsdb: str = OVSDB_REMOTE) -> str:
    """host.yaml of the Mininet host (the same bridges, ports and containers as labs.lab)."""
    containers = "\n".join(
        f'  {vmid}: {{mac: "{container_mac(vmid)}", ip: {container_ip(vmid)}/24}}'
        for vmid in (*PRIVACY_IDS, *SERVICE_IDS)
    )
    return (
        "host: mininet\n"
        f"ovsdb: {ovsdb}\n"
        "datapath_type: netdev\n"
        f"controller: {{listen: 'tcp:127.0.0.1:{controller_port}'}}\n"
        f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n"
        "bridges:\n"
        f"  mesh: {{name: {MESH}, uplinks: [{UPLINK}], to_socket: {TO_SOCKET}}}\n"
        f"  socket: {{name: {SOCKET}, from_mesh: {FROM_MESH}, warp: {WARP}}}\n"
        f"containers:\n{containers}\n"
        "pve: null\n"  # every container is declared above; never the machine's /etc/pve
    )


class MininetMissing(RuntimeError):
    """The mininet module (Debian package ``mininet``) cannot be imported."""


class Refused(RuntimeError):
    """Something the run would create already exists; nothing was changed."""


def import_mininet() -> Any:
    """``import mininet``, from Debian's dist-packages if the running Python lacks it."""
    try:
        import mininet
    except ImportError:
        if DEBIAN_DIST_PACKAGES not in sys.path and Path(DEBIAN_DIST_PACKAGES, "mininet").is_dir():
            # appended: the venv's own packages (ovs, yaml, ...) keep precedence
            sys.path.append(DEBIAN_DIST_PACKAGES)
        try:
            import mininet
        except ImportError as exc:
            raise MininetMissing(f"cannot import mininet ({exc}): apt-get install mininet "
                                 "(Mininet 2.3.0 needs Python <= 3.11: distutils)") from exc
    if shutil.which("mnexec", path=SBIN_PATH) is None:
        raise MininetMissing("mnexec is not installed (apt-get install mininet)")
    return mininet


# ---------------------------------------------------------------------------- helpers


def _run(argv: list[str], timeout: float = 15.0, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
    return res.stdout


def _vsctl(*args: str, timeout: int = 5, check: bool = True) -> str:
    return _run(["ovs-vsctl", f"--db={OVSDB_REMOTE}", f"--timeout={timeout}", *args],
                timeout=timeout + 5, check=check)


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True,
                          check=False).returncode == 0


def _delete_link(name: str) -> None:
    if _link_exists(name):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False  # a zombie: dead, not yet reaped by its parent
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pid: int, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL if still alive after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.02)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVS_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    env["PATH"] = SBIN_PATH
    return env


# ---------------------------------------------------------------------------- state


class State:
    """What the run created, on disk as soon as it is created (for ``--clean``)."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir).resolve() / "state.json"
        self.data: dict[str, Any] = {
            "daemons": {},  # daemon -> pid, the ones this run started
            "rundir_created": False,
            "controller_pid": None,
            "node_pids": [],  # Mininet's shells (hosts, switches, controller node)
            "bridges": [],
            "links": [],
            "devices": [],  # left by a killed ovs-vswitchd: the bridges' taps, ovs-netdev
            "ifindex": {},  # device -> ifindex when created
        }

    def load(self) -> bool:
        try:
            self.data.update(json.loads(self.path.read_text()))
            return True
        except (OSError, ValueError):
            return False

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def add(self, key: str, value: Any) -> None:
        if value not in self.data[key]:
            self.data[key].append(value)
            self.save()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()


@contextlib.contextmanager
def run_lock(timeout_s: float = 180.0) -> Iterator[None]:
    """One run at a time on this machine (they share the system OVS and the names)."""
    with LOCK_PATH.open("w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Refused(f"another Mininet socket run holds {LOCK_PATH}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- system OVS


def ovsdb_answers() -> bool:
    if not OVS_DB_SOCK.exists():
        return False
    return subprocess.run(["ovs-vsctl", f"--db={OVSDB_REMOTE}", "--timeout=2", "--no-wait",
                           "show"], capture_output=True, check=False).returncode == 0


def daemon_pid(daemon: str) -> int | None:
    """PID of the system ``daemon`` (default pidfile), None if it is not running."""
    pid = _read_pidfile(OVS_RUNDIR / f"{daemon}.pid")
    if pid is not None and _pid_alive(pid) and _comm(pid) == daemon[:15]:
        return pid
    return None


def _spawn_daemon(daemon: str, args: list[str], workdir: Path) -> int:
    argv = [daemon, *args, "--pidfile", "--detach", "--no-chdir",
            f"--log-file={workdir / daemon}.log"]
    res = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=20,
                         stdin=subprocess.DEVNULL)
    pid = daemon_pid(daemon)
    if res.returncode != 0 or pid is None:
        raise RuntimeError(f"{daemon} did not start ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
    return pid


def start_system_ovs(state: State, workdir: Path, timeout_s: float = 10.0) -> None:
    """Make sure the system OVS answers on its default paths; start what is missing.

    No kernel module: only the userspace (netdev) datapath is used. The database
    of a started ovsdb-server is a fresh file in ``workdir``, removed at the end.
    """
    if not OVS_RUNDIR.exists():
        OVS_RUNDIR.mkdir(parents=True)
        state.set("rundir_created", True)
    if not ovsdb_answers():
        if daemon_pid("ovsdb-server") is not None:
            raise Refused("ovsdb-server is running but does not answer on "
                          f"{OVS_DB_SOCK}; not touching it")
        db = workdir / "conf.db"
        db.unlink(missing_ok=True)
        _run(["ovsdb-tool", "create", str(db), str(OVS_SCHEMA)])
        pid = _spawn_daemon("ovsdb-server", [str(db), f"--remote=punix:{OVS_DB_SOCK}"], workdir)
        state.data["daemons"]["ovsdb-server"] = pid
        state.save()
        _vsctl("--no-wait", "init")
    if daemon_pid("ovs-vswitchd") is None:
        pid = _spawn_daemon("ovs-vswitchd", [OVSDB_REMOTE], workdir)
        state.data["daemons"]["ovs-vswitchd"] = pid
        state.save()
        deadline = time.monotonic() + timeout_s
        while subprocess.run(["ovs-vsctl", f"--db={OVSDB_REMOTE}", "--timeout=2", "init"],
                             capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("ovs-vswitchd did not apply the database: see "
                                   f"{workdir / 'ovs-vswitchd.log'}")
            time.sleep(0.1)


def preflight() -> None:
    """Refuse (changing nothing) if a bridge, port or device the run creates exists."""
    if os.geteuid() != 0:
        raise Refused("needs root (Mininet, Open vSwitch)")
    missing = [b for b in ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ip",
                           "ping") if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        raise Refused(f"not installed: {', '.join(missing)} (make deps)")
    taken = [n for n in (*ROOT_LINKS, *BRIDGES) if _link_exists(n)]
    if taken:
        raise Refused(f"network devices already exist: {', '.join(taken)}; they are not "
                      "this run's (a real Proxmox host, or another lab?)")
    if ovsdb_answers():
        names = set(_vsctl("--no-wait", "--format=csv", "--no-headings", "--columns=name",
                           "list", "Port").replace('"', "").split())
        names |= set(_vsctl("--no-wait", "list-br").split())
        clash = sorted(names & {*ROOT_LINKS, *BRIDGES})
        if clash:
            raise Refused(f"the system OVS already has bridges/ports named {', '.join(clash)}")


# ---------------------------------------------------------------------------- cleanup


def _ifindex(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except (OSError, ValueError):
        return None


def _bridge_dpid(bridge: str) -> str:
    out = _vsctl("--no-wait", "--if-exists", "get", "Bridge", bridge,
                 "other_config:datapath-id", check=False)
    return out.strip().strip('"')


def cleanup(state: State, *, live: bool = False) -> list[str]:
    """Undo exactly what ``state`` records; idempotent. Returns what it removed.

    ``live``: called by the run that made the state, which held the lock since its
    preflight found none of the names in use, so every recorded name is its own. A
    state left by a killed run (``--clean``, the next run) may be old: a bridge is
    removed only if it still carries this lab's datapath id, a device only if it
    still has the ifindex recorded when the run created it, a process only if its
    command line is the one the run started.
    """
    done: list[str] = []
    d = state.data
    workdir = str(state.path.parent)
    pid = d.get("controller_pid")
    if pid and _pid_alive(pid) and f"controller.cli run -c {workdir}/" in _cmdline(pid):
        _kill(pid)
        done.append(f"controller pid {pid}")
    for pid in d.get("node_pids", []):
        if _pid_alive(pid) and "mininet:" in _cmdline(pid):
            _kill(pid, grace_s=1.0)
            done.append(f"mininet node pid {pid}")
    if d.get("bridges") and ovsdb_answers():
        present = set(_vsctl("--no-wait", "list-br", check=False).split())
        for br in d["bridges"]:
            if br in present and (live or _bridge_dpid(br) == DPIDS.get(br)):
                _vsctl("--if-exists", "del-br", br, check=False)
                done.append(f"bridge {br}")
    ifindexes = d.get("ifindex", {})
    for name in d.get("links", []):
        if _link_exists(name) and (live or _ifindex(name) == ifindexes.get(name)):
            _delete_link(name)
            done.append(f"link {name}")
    for daemon in ("ovs-vswitchd", "ovsdb-server"):
        pid = d.get("daemons", {}).get(daemon)
        if not pid:
            continue
        if _pid_alive(pid) and _comm(pid) == daemon[:15] and (
                f"--log-file={workdir}/" in _cmdline(pid)):
            _kill(pid)
            done.append(f"{daemon} pid {pid}")
        if _pid_alive(pid):
            continue  # not ours (the pid was reused): its files are not ours either
        # what a daemon killed with SIGKILL leaves behind (SIGTERM removes them itself)
        if _read_pidfile(OVS_RUNDIR / f"{daemon}.pid") == pid:
            (OVS_RUNDIR / f"{daemon}.pid").unlink(missing_ok=True)
        (OVS_RUNDIR / f"{daemon}.{pid}.ctl").unlink(missing_ok=True)
        if daemon == "ovsdb-server" and OVS_DB_SOCK.exists() and not ovsdb_answers():
            OVS_DB_SOCK.unlink(missing_ok=True)
        if daemon == "ovs-vswitchd" and daemon_pid(daemon) is None:
            for br in d.get("bridges", []):
                for suffix in (".mgmt", ".snoop"):
                    (OVS_RUNDIR / f"{br}{suffix}").unlink(missing_ok=True)
    # an ovs-vswitchd that died without removing its bridges leaves their taps behind
    ifindexes = d.get("ifindex", {})
    if daemon_pid("ovs-vswitchd") is None:
        for name in d.get("devices", []):
            if _link_exists(name) and (live or _ifindex(name) == ifindexes.get(name)):
                _delete_link(name)
                done.append(f"device {name}")
    if d.get("rundir_created") and OVS_RUNDIR.is_dir():
        with contextlib.suppress(OSError):
            OVS_RUNDIR.rmdir()  # only if empty: someone else may use it by now
            done.append(f"directory {OVS_RUNDIR}")
    for name in ("conf.db", ".conf.db.~lock~", "host.yaml"):
        (state.path.parent / name).unlink(missing_ok=True)
    state.path.unlink(missing_ok=True)
    return done


# ---------------------------------------------------------------------------- the lab


@dataclass
class Verdict:
    what: str
    src: str
    dst: str
    expect: str  # "pass" | "drop"
    got: str

    @property
    def ok(self) -> bool:
        return self.expect == self.got


class MininetSocket:
    """``up()``, ``check()``, ``down()``; ``down()`` is safe after any failure."""

    def __init__(self, workdir: Path = STATE_DIR, verbose: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        self.verbose = verbose
        self.state = State(self.workdir)
        self.net: Any = None
        self.controller: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "host.yaml"
        self.controller_log = self.workdir / "controller.log"
        self.controller_port = 0

    # -------------------------------------------------------------- lifecycle
    def up(self) -> MininetSocket:
        # Mininet runs ovs-vsctl/ip from this process: the system OVS's default paths
        for key in [k for k in os.environ if k.startswith("OVS_")]:
            del os.environ[key]
        os.environ["PATH"] = SBIN_PATH
        stale = State(self.workdir)
        if stale.load():  # a killed run: its lock is free again, its leftovers are not
            cleanup(stale)
        preflight()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state.save()
        start_system_ovs(self.state, self.workdir)
        self._start_controller()
        self._build()
        self._configure_hosts()
        self._wait_reconciled()
        return self

    def down(self) -> list[str]:
        if self.net is not None:
            net, self.net = self.net, None
            try:
                net.stop()
                for ctl in net.controllers:  # RemoteController.stop() leaves its shell
                    ctl.terminate()
            except Exception as exc:  # the recorded cleanup below still runs
                print(f"mininet stop failed: {exc}", file=sys.stderr)
        proc, self.controller = self.controller, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return cleanup(self.state, live=True)

    # -------------------------------------------------------------- pieces
    def _start_controller(self) -> None:
        self.controller_port = _free_port()
        self.config_path.write_text(host_config_text(self.controller_port, _free_port()))
        argv = [sys.executable, "-m", "controller.cli", "run", "-c", str(self.config_path),
                "--log-level", "debug"]
        with self.controller_log.open("wb") as log:
            self.controller = subprocess.Popen(argv, stdout=log, stderr=log, env=_env(),
                                               cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
        self.state.set("controller_pid", self.controller.pid)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.controller_port), timeout=0.5):
                return
            if self.controller.poll() is not None:
                raise RuntimeError(f"socknet exited: {self.controller_log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("socknet is not listening on "
                                   f"127.0.0.1:{self.controller_port} after 30 s")
            time.sleep(0.1)

    def _build(self) -> None:
        import_mininet()
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.node import OVSSwitch, RemoteController

        setLogLevel("info" if self.verbose else "warning")
        net = Mininet(topo=None, build=False, controller=None, autoSetMacs=False,
                      autoStaticArp=False, waitConnected=False)
        self.net = net
        # recorded before Mininet creates them: a crash half-way leaves nothing behind
        for br in BRIDGES:
            self.state.add("bridges", br)
            self.state.add("devices", br)
        for name in ROOT_LINKS:
            self.state.add("links", name)
        ctl = net.addController("socknet", controller=RemoteController, ip="127.0.0.1",
                                port=self.controller_port)
        self.state.add("node_pids", ctl.pid)
        switches = {}
        for br in BRIDGES:
            switches[br] = net.addSwitch(br, cls=OVSSwitch, datapath="user", failMode="secure",
                                         protocols=PROTOCOLS, dpid=DPIDS[br])
            self.state.add("node_pids", switches[br].pid)
        mesh, vmbr0 = switches[MESH], switches[SOCKET]

        def host(name: str, **kw: Any) -> Any:
            h = net.addHost(name, **kw)
            self.state.add("node_pids", h.pid)
            return h

        for vmid in (*PRIVACY_IDS, *SERVICE_IDS):
            c = host(f"c{vmid}", ip=f"{container_ip(vmid)}/24", mac=container_mac(vmid),
                     defaultRoute=f"via {GATEWAY}")
            net.addLink(c, vmbr0, intfName1="eth0", intfName2=port_name(vmid))
        mpeer = host("mpeer", ip=f"{MESH_SERVICE_IP}/24", mac=MESH_PEER_MAC)
        net.addLink(mpeer, mesh, intfName1="eth0", intfName2=UPLINK)
        warp = host("warp", ip=f"{GATEWAY}/24", mac=WARP_MAC)
        net.addLink(warp, vmbr0, intfName1="eth0", intfName2=WARP)
        inet = host("inet", ip=f"{INTERNET_IP}/24")
        net.addLink(warp, inet, intfName1="up0", intfName2="eth0")
        net.addLink(mesh, vmbr0, intfName1=TO_SOCKET, intfName2=FROM_MESH)
        net.build()
        # what identifies the devices as this run's for a later --clean
        net.start()
        if "ovs-vswitchd" in self.state.data["daemons"]:
            self.state.add("devices", "ovs-netdev")
        names = (*ROOT_LINKS, *self.state.data["devices"])
        self.state.set("ifindex", {n: i for n in names if (i := _ifindex(n)) is not None})

    def _configure_hosts(self) -> None:
        net = self.net
        for h in net.hosts:
            h.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default."
                  "disable_ipv6=1")
            h.cmd("ethtool -K eth0 tx off >/dev/null 2>&1")
        for name in ROOT_LINKS:  # the userspace datapath needs TX checksum offload off
            subprocess.run(["ethtool", "-K", name, "tx", "off"], capture_output=True,
                           check=False)
        net["mpeer"].cmd(f"ip addr add {MESH_USER_IP}/16 dev eth0")
        warp = net["warp"]
        warp.cmd(f"ip addr add {EXIT_UPLINK_IP}/24 dev up0; ip link set up0 up; "
                 "sysctl -qw net.ipv4.ip_forward=1")
        net["inet"].cmd(f"ip route replace default via {EXIT_UPLINK_IP}")

    def _log_events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.controller_log.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def _wait_reconciled(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = {e.get("bridge") for e in self._log_events() if e.get("event") == "reconciled"}
            if set(BRIDGES) <= done:
                return
            if self.controller is not None and self.controller.poll() is not None:
                raise RuntimeError(f"socknet exited: {self.controller_log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"socknet did not reconcile both bridges: "
                           f"{self.controller_log.read_text()[-2000:]}")

    # -------------------------------------------------------------- traffic
    def ping(self, src: str, dst_ip: str, count: int = 2) -> bool:
        node = self.net[src]
        res = subprocess.run(["mnexec", "-a", str(node.pid), "ping", "-n", "-c", str(count),
                              "-i", "0.2", "-W", "1", dst_ip],
                             capture_output=True, check=False, timeout=count + 10)
        return res.returncode == 0

    def _pin_arp(self, src: str, dst_ip: str, dst_mac: str) -> None:
        """A static ARP entry, so that the IP packet itself is sent and has to be dropped."""
        self.net[src].cmd(f"ip neigh replace {dst_ip} lladdr {dst_mac} dev eth0 nud permanent")

    def check(self) -> list[Verdict]:
        s1, s2 = (f"c{v}" for v in SERVICE_IDS)
        p1, p2 = (f"c{v}" for v in PRIVACY_IDS)
        passes = [
            ("service -> service", s1, container_ip(SERVICE_IDS[1])),
            ("service -> service", s2, container_ip(SERVICE_IDS[0])),
            ("service -> mesh", s1, MESH_SERVICE_IP),
            ("mesh -> service", "mpeer", container_ip(SERVICE_IDS[1])),
            ("privacy -> WARP", p1, GATEWAY),
            ("privacy -> internet via WARP", p2, INTERNET_IP),
        ]
        verdicts = []
        for what, src, dst in passes:
            # the first packets of a pair may go through the controller: a few tries
            ok = any(self.ping(src, dst) for _ in range(4))
            verdicts.append(Verdict(what, src, dst, "pass", "pass" if ok else "drop"))
        # Drops are checked after the passes proved the pipeline is in place.
        svc_ip, svc_mac = container_ip(SERVICE_IDS[0]), container_mac(SERVICE_IDS[0])
        drops = [
            ("privacy -> service", p1, svc_ip, svc_mac),
            ("privacy -> service", p2, container_ip(SERVICE_IDS[1]),
             container_mac(SERVICE_IDS[1])),
            ("service -> privacy", s1, container_ip(PRIVACY_IDS[0]),
             container_mac(PRIVACY_IDS[0])),
            ("service -> WARP", s2, GATEWAY, WARP_MAC),
        ]
        for what, src, dst, mac in drops:
            self._pin_arp(src, dst, mac)
            ok = self.ping(src, dst, count=3)
            verdicts.append(Verdict(what, src, dst, "drop", "pass" if ok else "drop"))
        return verdicts

    def dump_flows(self, bridge: str) -> str:
        return _run(["ovs-ofctl", "-O", "OpenFlow14", "dump-flows", bridge], check=False)


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = [f"{'check':<30} {'from':<6} {'to':<12} {'expect':<6} {'got':<6}"]
    for v in verdicts:
        lines.append(f"{v.what:<30} {v.src:<6} {v.dst:<12} {v.expect:<6} {v.got:<6} "
                     f"{'ok' if v.ok else 'FAIL'}")
    good = sum(v.ok for v in verdicts)
    lines.append(f"mininet socket check: {good}/{len(verdicts)} verdicts as expected")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.mininet_socket",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true",
                      help="bring it up, check the verdicts, tear it down (exit 0: all hold)")
    mode.add_argument("--cli", action="store_true", help="bring it up, open Mininet's CLI")
    mode.add_argument("--clean", action="store_true",
                      help="remove what a killed run left behind (only that)")
    parser.add_argument("--json", action="store_true", help="--check: one JSON object")
    parser.add_argument("--verbose", "-v", action="store_true", help="Mininet's info log")
    parser.add_argument("--workdir", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)

    if args.clean:
        with run_lock():
            state = State(args.workdir)
            removed = cleanup(state) if state.load() else []
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0

    try:
        import_mininet()
    except MininetMissing as exc:
        print(f"mininet_socket: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"ok": False, "verdicts": [], "error": None}
    lab = MininetSocket(args.workdir, verbose=args.verbose)
    try:
        with run_lock():
            # SIGTERM (a CI timeout, kill) tears down like Ctrl-C does
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                lab.up()
                if args.cli:
                    from mininet.cli import CLI

                    CLI(lab.net)
                    result["ok"] = True
                else:
                    verdicts = lab.check()
                    result["verdicts"] = [asdict(v) | {"ok": v.ok} for v in verdicts]
                    result["ok"] = all(v.ok for v in verdicts)
                    if not args.json:
                        sys.stdout.write(format_verdicts(verdicts))
                    if not result["ok"]:
                        result["flows"] = {br: lab.dump_flows(br) for br in BRIDGES}
            finally:
                result["removed"] = lab.down()
    except Refused as exc:
        result["error"] = f"refused: {exc}"
    except (Exception, KeyboardInterrupt) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    if args.json:
        print(json.dumps(result))
    elif result["error"]:
        print(f"mininet_socket: {result['error']}", file=sys.stderr)
    if result["error"] and str(result["error"]).startswith("refused"):
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main())
