"""One simulated Proxmox host on this machine, as network namespaces.

    <p>h   the host: a private OVS (netdev), bridges mesh + vmbr0, socknet
    <p>c<vmid>  one namespace per container, eth0 <-> veth<vmid>i0 on vmbr0
    <p>m   the mesh side: eth0 <-> nm-privacy on mesh; holds a remote service
           container address (10.0.0.210) and a mesh user (10.101.0.5)
    <p>x   the WARP exit stand-in: eth0 <-> warp0 on vmbr0, gateway 10.0.0.1,
           routes to <p>i
    <p>i   a stand-in internet host, 198.18.0.2 (benchmark range, lab-only)

All addresses live inside these namespaces. `down()` removes every one of
them, the OVS instance and the controller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from labs import netns as nsl
from labs.ovs_instance import OvsInstance

SUBNET = "10.0.0.0/24"
GATEWAY = "10.0.0.1"
MESH_SERVICE_IP = "10.0.0.210"
MESH_USER_IP = "10.101.0.5"
INTERNET_IP = "198.18.0.2"
EXIT_UPLINK_IP = "198.18.0.1"
STATE_DIR = Path(os.environ.get("SOCKNET_LAB_DIR", "/run/socknet-lab"))
PRIVACY_IDS = (100, 102)
SERVICE_IDS = (200, 201)


def container_mac(vmid: int) -> str:
    return f"02:00:00:00:{vmid // 256:02x}:{vmid % 256:02x}"


def container_ip(vmid: int) -> str:
    return f"10.0.0.{vmid % 256}" if vmid < 256 else f"10.0.1.{vmid % 256}"


@dataclass
class Container:
    vmid: int
    ns: str
    port: str  # host-side port name on vmbr0
    ip: str
    mac: str


class SocketLab:
    """One host. The keyword arguments let ``labs.mesh_lab`` reuse it for each of its hosts:
    container ids per host, the mesh uplink names (``["vx-*"]``) and the containers' MTU
    (1370 when L2 crosses VXLAN over WireGuard)."""

    def __init__(self, prefix: str, workdir: Path, *, port_style: str = "proxmox",
                 controller_port: int = 6653,
                 privacy_ids: tuple[int, ...] = PRIVACY_IDS,
                 service_ids: tuple[int, ...] = SERVICE_IDS,
                 mesh_uplinks: tuple[str, ...] = ("nm-privacy",),
                 mtu: int | None = None, tls_dir: Path | None = None,
                 addresses: str = "learn-first-packet") -> None:
        if len(prefix) > 8:
            raise ValueError("prefix must be at most 8 characters (interface name limits)")
        self.prefix = prefix
        self.workdir = Path(workdir)
        self.port_style = port_style  # "proxmox": veth100i0, "seed": veth100
        self.controller_port = controller_port
        self.privacy_ids = tuple(privacy_ids)
        self.service_ids = tuple(service_ids)
        self.mesh_uplinks = tuple(mesh_uplinks)
        self.mtu = mtu  # containers' MTU (both veth ends); None: the kernel's 1500
        # TLS OpenFlow channel (controller.listen ssl:): tls_dir holds controller-key.pem,
        # controller-cert.pem, switch-key.pem, switch-cert.pem and ca-cert.pem
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self.undeclared: set[int] = set()  # containers host.yaml does not declare
        self.mac_only: set[int] = set()  # containers host.yaml declares with a MAC alone
        # The lab's containers come and go undeclared (moves, new ports): it learns their
        # addresses from their first packets, as host.yaml says explicitly (socknet's
        # default is "declared"). Its Proxmox directory is its own (empty until a test
        # writes a guest config there), never the machine's /etc/pve.
        self.addresses = addresses
        self.pve_dir = self.workdir / "pve"
        self.host = f"{prefix}h"
        self.mesh_ns = f"{prefix}m"
        self.exit_ns = f"{prefix}x"
        self.inet_ns = f"{prefix}i"
        self.ovs = OvsInstance(f"{prefix}-ovs", self.workdir / "ovs", netns=self.host)
        self.containers: dict[int, Container] = {}
        self.controller: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "host.yaml"
        self.controller_log = self.workdir / "controller.log"

    # ------------------------------------------------------------ naming
    def port_name(self, vmid: int) -> str:
        return f"veth{vmid}" if self.port_style == "seed" else f"veth{vmid}i0"

    def container_ip(self, vmid: int) -> str:
        return container_ip(vmid)

    def container_routes(self, ns: str, vmid: int) -> None:
        nsl.add_default_route(ns, GATEWAY)

    @property
    def namespaces(self) -> list[str]:
        return [self.host, self.mesh_ns, self.exit_ns, self.inet_ns,
                *(c.ns for c in self.containers.values())]

    def host_config(self) -> str:
        # Proxmox knows each container's hwaddr and IP: declare them (the anti-spoofing
        # guard then needs no learning). `undeclared` containers are learned once.
        containers = "\n".join(
            f'  {vmid}: {{mac: "{container_mac(vmid)}", ip: {self.container_ip(vmid)}/24}}'
            for vmid in (*self.privacy_ids, *self.service_ids)
            if vmid not in self.undeclared | self.mac_only
        ) + "".join(f'\n  {vmid}: {{mac: "{container_mac(vmid)}"}}'
                    for vmid in sorted(self.mac_only))
        uplinks = ", ".join(json.dumps(u) for u in self.mesh_uplinks)
        return (
            f"host: {self.prefix}\n"
            f"ovsdb: {self.ovs.db_remote}\n"
            "datapath_type: netdev\n"
            f"controller: {self._controller_yaml()}\n"
            "bridges:\n"
            f"  mesh: {{name: mesh, uplinks: [{uplinks}], to_socket: to-socket}}\n"
            "  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}\n"
            f"containers:\n{containers}\n"
            f"addresses: {self.addresses}\n"
            f"pve: {{dir: '{self.pve_dir}', poll_s: 0.5}}\n"
        )

    def write_guest_config(self, path: str, text: str) -> None:
        """Write ``<pve dir>/<path>`` (e.g. ``lxc/205.conf``) as pmxcfs shows it: whole."""
        target = self.pve_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    def _controller_yaml(self) -> str:
        if self.tls_dir is None:
            return f"{{listen: 'tcp:127.0.0.1:{self.controller_port}'}}"
        d = self.tls_dir
        return (f"{{listen: 'ssl:127.0.0.1:{self.controller_port}', tls: {{"
                f"key: '{d}/controller-key.pem', cert: '{d}/controller-cert.pem', "
                f"ca_cert: '{d}/ca-cert.pem', switch_key: '{d}/switch-key.pem', "
                f"switch_cert: '{d}/switch-cert.pem'}}}}")

    # ------------------------------------------------------------ lifecycle
    def up(self, *, controller: bool = True) -> SocketLab:
        try:
            self._up(controller)
        except BaseException:
            self.down()
            raise
        return self

    def _up(self, controller: bool) -> None:
        for ns in (self.mesh_ns, self.exit_ns, self.inet_ns):
            nsl.create_netns(ns)
            nsl.disable_ipv6(ns)
        self.start_host()
        self._wire_mesh_side()
        self._wire_exit()
        for vmid in (*self.privacy_ids, *self.service_ids):
            self.add_container(vmid)
        if controller:
            self.start_controller()

    def start_host(self) -> None:
        """The host namespace, its private OVS, host.yaml and ``socknet bootstrap``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("lxc", "qemu-server"):  # a mounted pmxcfs always shows both
            (self.pve_dir / sub).mkdir(parents=True, exist_ok=True)
        nsl.create_netns(self.host)
        nsl.disable_ipv6(self.host)
        self.ovs.start()
        self.config_path.write_text(self.host_config())
        self.socknet("bootstrap")

    def down(self) -> None:
        self.stop_controller()
        self.ovs.stop(remove_rundir=False)
        for ns in reversed(self.namespaces):
            try:
                nsl.delete_netns(ns, kill_procs=True)
            except OSError:
                continue  # keep removing the others
        self.containers.clear()

    # ------------------------------------------------------------ pieces
    def socknet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "controller.cli", *args, "-c", str(self.config_path)]
        res = nsl.run(self.host, argv, env=_env())
        if check and res.returncode != 0:
            raise RuntimeError(f"socknet {' '.join(args)} failed: {res.stdout}{res.stderr}".strip())
        return res

    def _wire_mesh_side(self) -> None:
        nsl.add_veth("nm-privacy", "eth0", self.host, self.mesh_ns)
        nsl.tx_off(self.host, "nm-privacy")
        nsl.tx_off(self.mesh_ns, "eth0")
        nsl.set_mac(self.mesh_ns, "eth0", "02:00:00:00:ee:01")
        nsl.add_addr(self.mesh_ns, "eth0", f"{MESH_SERVICE_IP}/24")
        nsl.add_addr(self.mesh_ns, "eth0", f"{MESH_USER_IP}/16")
        self.ovs.add_port("mesh", "nm-privacy")

    def _wire_exit(self) -> None:
        nsl.add_veth("warp0", "eth0", self.host, self.exit_ns)
        nsl.tx_off(self.host, "warp0")
        nsl.tx_off(self.exit_ns, "eth0")
        nsl.set_mac(self.exit_ns, "eth0", "02:00:00:00:ff:01")
        nsl.add_addr(self.exit_ns, "eth0", f"{GATEWAY}/24")
        nsl.add_veth("up0", "eth0", self.exit_ns, self.inet_ns)
        nsl.add_addr(self.exit_ns, "up0", f"{EXIT_UPLINK_IP}/24")
        nsl.add_addr(self.inet_ns, "eth0", f"{INTERNET_IP}/24")
        nsl.add_default_route(self.inet_ns, EXIT_UPLINK_IP)
        nsl.sysctl(self.exit_ns, "net.ipv4.ip_forward", 1)
        self.ovs.add_port("vmbr0", "warp0")

    def add_container(self, vmid: int) -> Container:
        """What Proxmox does when a container starts: veth pair, port on vmbr0."""
        c = self.boot_container(vmid)
        self.ovs.add_port("vmbr0", c.port)
        return c

    def boot_container(self, vmid: int) -> Container:
        """A container's namespace, veth, MAC, address and routes, not yet a port of vmbr0
        (Proxmox adds the port next). Registered at once, so ``down`` removes it whatever
        happens after."""
        ns = f"{self.prefix}c{vmid}"
        if not nsl.netns_exists(ns):
            nsl.create_netns(ns)
            nsl.disable_ipv6(ns)
        port = self.port_name(vmid)
        c = Container(vmid, ns, port, self.container_ip(vmid), container_mac(vmid))
        self.containers[vmid] = c
        nsl.add_veth(port, "eth0", self.host, ns, mtu=self.mtu)
        nsl.tx_off(self.host, port)
        nsl.tx_off(ns, "eth0")
        nsl.set_mac(ns, "eth0", c.mac)
        nsl.add_addr(ns, "eth0", f"{c.ip}/24")
        self.container_routes(ns, vmid)
        return c

    def remove_container(self, vmid: int) -> None:
        """Container stop: Proxmox deletes the port and the veth."""
        c = self.containers[vmid]
        self.ovs.vsctl("--if-exists", "del-port", "vmbr0", c.port)
        nsl.delete_link(self.host, c.port)

    def start_controller(self, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "controller.cli", "run", "-c", str(self.config_path),
                "--log-level", "debug"]
        log = self.controller_log.open("ab")
        self.controller = nsl.popen(self.host, argv, stdout=log, stderr=log, env=_env())
        log.close()
        if wait:
            self.wait_reconciled()

    def stop_controller(self, sig: int = signal.SIGTERM) -> None:
        proc, self.controller = self.controller, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_events(self) -> list[dict[str, object]]:
        out = []
        if self.controller_log.exists():
            for line in self.controller_log.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def wait_reconciled(self, after: int = 0, timeout_s: float = 15.0) -> None:
        """Wait until both bridges report a reconcile logged after event index ``after``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self.log_events()[after:]
            done = {e.get("bridge") for e in events if e.get("event") == "reconciled"}
            if {"mesh", "vmbr0"} <= done:
                return
            if self.controller is not None and self.controller.poll() is not None:
                raise RuntimeError(f"controller exited: {self.controller_log.read_text()[-2000:]}")
            time.sleep(0.05)
        tail = self.controller_log.read_text()[-2000:]
        raise TimeoutError(f"controller did not reconcile: {tail}")

    def flows(self, bridge: str) -> list[str]:
        return self.ovs.dump_flows(bridge)

    @property
    def metrics_url(self) -> str:
        """The controller's Prometheus endpoint, inside the host namespace (the labs keep
        host.yaml's default `metrics.listen`)."""
        from topology.config import MetricsCfg

        return f"http://{MetricsCfg().listen}/metrics"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------- CLI (make lab-up / lab-down)

def socknet_command() -> str:
    """How a root shell runs socknet: ``socknet`` once `make install` (which `make lab-up`
    and `make demo` run) has put it on PATH, else the virtualenv's own."""
    if shutil.which("socknet"):
        return "socknet"
    venv = Path(sys.executable).parent / "socknet"
    return str(venv) if venv.exists() else f"{sys.executable} -m controller.cli"


def hints(lab: SocketLab) -> list[str]:
    """What to type to look at one lab host: flows, status, metrics. The host lives in its
    own network namespace, and so does its metrics endpoint (loopback there)."""
    enter = f"ip netns exec {lab.host}"
    return [
        f"flows:   {enter} ovs-ofctl -O OpenFlow14 dump-flows {lab.ovs.mgmt('vmbr0')}",
        f"status:  {enter} {socknet_command()} status -c {lab.config_path}",
        f"metrics: {enter} curl -s {lab.metrics_url}   (the endpoint listens on the lab "
        "host's loopback)",
    ]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring the lab up and leave it running")
    up.add_argument("--hosts", type=int, default=1,
                    help="1: this one-host lab; 2 or 3: labs.mesh_lab (real WireGuard mesh)")
    up.add_argument("--prefix", default="snlab")
    up.add_argument("--policy", type=Path,
                    help="a policy.yaml to enforce (one host: labs.policy_lab, one service "
                         "container in each tier)")
    sub.add_parser("down", help="tear down whatever `up` started")
    args = parser.parse_args(argv)
    state = STATE_DIR / "state.json"
    if args.cmd == "up":
        if args.hosts not in (1, 2, 3):
            print("--hosts must be 1, 2 or 3", file=sys.stderr)
            return 2
        policy_text = None
        if args.policy is not None:
            from topology.policy import PolicyError, load_policy

            try:
                load_policy(args.policy)
                policy_text = args.policy.read_text()
            except PolicyError as exc:
                for problem in exc.problems:
                    print(f"lab: {problem}", file=sys.stderr)
                return 2
        if state.exists():
            print(f"a lab is already up ({state}); run `make lab-down` first", file=sys.stderr)
            return 1
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        if args.hosts > 1:
            return _mesh_up(args.prefix, args.hosts, state, policy_text)
        if policy_text is not None:
            return _policy_up(args.prefix, args.policy, policy_text, state)
        lab = SocketLab(args.prefix, STATE_DIR / args.prefix)
        lab.up()
        controller_pid = lab.controller.pid if lab.controller else None
        state.write_text(json.dumps({"prefix": args.prefix, "controller_pid": controller_pid}))
        print(f"lab up: host namespace {lab.host}, controller pid {controller_pid}")
        for line in hints(lab):
            print(f"  {line}")
        return 0
    if not state.exists():
        print("no lab is up", file=sys.stderr)
        return 0
    info = json.loads(state.read_text())
    if info.get("kind") == "policy":
        from labs.policy_lab import PolicyLab

        services = {int(v): ip for v, ip in info["services"].items()}
        plab = PolicyLab(info["prefix"], STATE_DIR / info["prefix"], "", services)
        plab.containers = {v: Container(v, f"{plab.prefix}c{v}", plab.port_name(v), "", "")
                           for v in (*plab.privacy_ids, *plab.service_ids)}
        plab.down()
        shutil.rmtree(STATE_DIR / info["prefix"], ignore_errors=True)
        state.unlink()
        print("lab down")
        return 0
    if info.get("kind") == "mesh":
        from labs.mesh_lab import MeshLab

        MeshLab(info["prefix"], STATE_DIR / info["prefix"], hosts=info["hosts"]).down()
        shutil.rmtree(STATE_DIR / info["prefix"], ignore_errors=True)
        state.unlink()
        print("lab down")
        return 0
    lab = SocketLab(info["prefix"], STATE_DIR / info["prefix"])
    lab.containers = {v: Container(v, f"{lab.prefix}c{v}", lab.port_name(v), "", "")
                      for v in (*lab.privacy_ids, *lab.service_ids)}
    if info.get("controller_pid"):
        try:
            os.kill(info["controller_pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    lab.down()
    shutil.rmtree(STATE_DIR / info["prefix"], ignore_errors=True)
    state.unlink()
    print("lab down")
    return 0


def _policy_up(prefix: str, path: Path, policy_text: str, state: Path) -> int:
    from labs.policy_lab import PolicyLab, tier_services
    from topology.policy import parse_policy

    policy = parse_policy(policy_text)
    placed = tier_services(policy)
    services = {v: ip for v, (ip, _) in placed.items()}
    onlink = tuple(str(n) for t in policy.tiers.values() for n in t.nets)
    lab = PolicyLab(prefix, STATE_DIR / prefix, policy_text, services, onlink=onlink)
    # written first: `lab-down` can clean up even if `up` is interrupted
    state.write_text(json.dumps({"kind": "policy", "prefix": prefix,
                                 "services": {str(v): ip for v, ip in services.items()}}))
    try:
        lab.up()
    except BaseException:
        state.unlink(missing_ok=True)
        raise
    print(f"policy lab up: {path} enforced on host namespace {lab.host}")
    for vmid, (ip, tier) in placed.items():
        print(f"  container {vmid}: {ip} (tier {tier}), netns {lab.prefix}c{vmid}")
    for line in hints(lab):
        print(f"  {line}")
    if placed:
        print(f"  try:     ip netns exec {lab.prefix}c{min(placed)} ping -c1 ADDRESS, then "
              "status (per-rule counters) or metrics")
    return 0


def _mesh_up(prefix: str, hosts: int, state: Path, policy_text: str | None = None) -> int:
    from labs.mesh_lab import MeshLab

    lab = MeshLab(prefix, STATE_DIR / prefix, hosts=hosts, policy=policy_text)
    # written first: `lab-down` can clean up even if `up` is interrupted
    state.write_text(json.dumps({"kind": "mesh", "prefix": prefix, "hosts": hosts}))
    try:
        lab.up()
    except BaseException:
        state.unlink(missing_ok=True)
        raise
    print(lab.describe())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
