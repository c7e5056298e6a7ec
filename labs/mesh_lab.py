"""Several simulated Proxmox hosts joined by a real WireGuard mesh (``MeshLab``).

Every name below lives in a namespace the lab created, and every address is
only configured inside those namespaces (P = the lab prefix, N = 1..3)::

    P<N>h   host N: private OVS (netdev) with `mesh` and `vmbr0` made by
            `socknet bootstrap`, the socknet controller, the containers' host-side
            veths (veth<vmid>i0), and
              ul0       underlay address 192.0.2.N/24
              netmaker  wireguard-go, mesh address 100.100.0.N/24, port 51821
              vx-<hash> kernel VXLAN to each peer host M over the WireGuard
                        addresses (remote 100.100.0.M, dev netmaker, MTU 1370),
                        made and removed by socknet itself (host.yaml `vxlan:
                        true`, controller.peersync: name and VNI from the peers'
                        public keys) as a port of `mesh`, matched by `uplinks:
                        ["vx-*"]`. ``MeshLab(..., socknet_vxlan=False)`` keeps the
                        older manual devices vx-h<M> (VNI ``vni(N, M)``) instead.
              warp0     veth, the WARP port of vmbr0; its peer is in P<N>r
              warp-wan  veth to P<N>r's wan0: the WARP tunnel's own UDP
    P<N>r   host N's WARP router (see below): warp0-rt 10.0.0.1/24 (the
            privacy containers' gateway), wgwarp (wireguard-go) 172.16.0.N/24,
            wan0 172.31.N.2/30
    P<N>c<vmid>  one per container, eth0 (MTU 1370) <-> veth<vmid>i0 on vmbr0;
            host 1: privacy 100, service 200, 201; host 2: 110 / 210, 211;
            host 3: 120 / 220. Address 10.0.0.<vmid>/24, gateway 10.0.0.1.
    Pu      the underlay: Linux bridge `ul`, ports h<N> (to host N) and x
    Px      the WARP exit (stands in for Cloudflare): ul0 192.0.2.254/24,
            wgexit (wireguard-go, port 51820) 172.16.0.254/24, up0 198.18.0.1/24;
            routes (no NAT) between its WireGuard peers and the internet host
    Pi      a stand-in internet host, 198.18.0.2/24

The mesh. WireGuard (L3, no Ethernet header) cannot be an OVS port, so L2
between the hosts' `mesh` bridges is kernel VXLAN over the WireGuard
addresses, one device per peer and so one OpenFlow port per peer host. Linux
refuses two VXLAN devices with the same VNI and UDP port in one namespace,
whatever their remotes: the VNI is per pair of hosts, the same on both ends
(``MeshLab.vni(a, b)``: socknet's ``pair_vni`` of the two public keys, or
``vni(a, b)`` for the manual devices). MTU: WireGuard 1420 (wireguard-go's
default; 1500 - 80) minus VXLAN's 50 gives 1370 on the vx devices and so on
every container: OVS drops a frame larger than the MTU of the port it leaves
by, silently. The devices are made by ``socknet bootstrap`` once every peer has
shaken hands (socknet makes ports for live peers only), then followed by the
controller every 2 s; the peers have ``persistent-keepalive 20`` as Netmaker
sets it, or an idle mesh would go stale after 180 s and lose its ports.
``policy=`` gives every host the same policy.yaml (``write_policy`` replaces it).

The WARP exit. A WireGuard device cannot be an OVS port either, so vmbr0's
WARP port ``warp0`` is a veth whose peer ``warp0-rt`` sits in a per-host
"WARP router" namespace. That namespace forwards what arrives on warp0-rt by
policy routing (``iif warp0-rt lookup 100``); table 100 holds ``default dev
wgwarp`` and, behind it, ``blackhole default``: the kill switch. When wgwarp is
down or deleted the kernel drops its route and the blackhole takes over; the
router's main table has no default route at all, only a route to the exit's
underlay address for wgwarp's own UDP, which leaves through the host
(warp-wan -> host routing -> ul0): on the underlay the privacy traffic is only
ever WireGuard UDP to 192.0.2.254:51820. The exit routes without NAT: each
host's router peer has its tunnel address and its privacy containers' /32s as
allowed IPs (so privacy addresses must differ between hosts).

wireguard-go's UAPI socket, /var/run/wireguard/<if>.sock, is one file for
every network namespace: two hosts' `netmaker` devices would collide. Every
wireguard-go and every `wg` of host N runs in a private mount namespace
(``unshare --mount``) where host N's own run dir is bind-mounted on /run,
so its sockets are <workdir>/h<N>/run/wireguard/*.sock (the exit: <workdir>/
exit/run). /run rather than /run/wireguard: that mount point does not exist on
a machine without WireGuard in use, and creating it in the shared /run would
leave a trace behind (and removing it would break a concurrent lab). The
price: inside that mount namespace nothing else of /run is visible (the lab's
own state dir is /run/socknet-lab under `make lab-up`), so private keys reach
`wg set` on stdin (``private-key /dev/stdin``), never as a path. The sockets
themselves are plain files: anything outside can connect to them (that is how
``controller.wgpeers`` reads the peers here, ``sock_dir=host.sock_dir``).

``down()`` removes everything (controllers, OVS instances, wireguard-go
processes, namespaces and with them every interface), also after a failed
``up()`` and from a fresh object (``make lab-down``): all names follow from
the prefix and the number of hosts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labs import netns as nsl
from labs.lab import INTERNET_IP, Container, SocketLab, _env, container_ip, hints

PREFIX_MAX = 7  # + host digit = SocketLab's 8
UNDERLAY_NET = ipaddress.ip_network("192.0.2.0/24")  # TEST-NET-1
EXIT_UNDERLAY_IP = "192.0.2.254"
MESH_NET = ipaddress.ip_network("100.100.0.0/24")
NETMAKER_IF = "netmaker"
NETMAKER_PORT = 51821
WARP_IF = "wgwarp"
EXIT_IF = "wgexit"
EXIT_WG_PORT = 51820
EXIT_TUNNEL_IP = "172.16.0.254"
EXIT_UPLINK_IP = "198.18.0.1"
WARP_GATEWAY = "10.0.0.1"
WARP_TABLE = 100
WG_MTU = 1420
VXLAN_MTU = 1370
VXLAN_PORT = 4789
UNDERLAY_BRIDGE = "ul"
# host -> (privacy container ids, service container ids)
HOST_CONTAINERS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    1: ((100,), (200, 201)),
    2: ((110,), (210, 211)),
    3: ((120,), (220,)),
}
READY_TIMEOUT_S = 10.0


class MeshLabError(RuntimeError):
    """A step of the lab failed; the message says which and why."""


def vni(a: int, b: int) -> int:
    """VXLAN id of the link between hosts a and b (the same seen from both ends)."""
    lo, hi = sorted((a, b))
    return 4200 + 10 * lo + hi


def underlay_ip(n: int) -> str:
    return str(UNDERLAY_NET.network_address + n)


def mesh_ip(n: int) -> str:
    return str(MESH_NET.network_address + n)


def warp_tunnel_ip(n: int) -> str:
    return f"172.16.0.{n}"


def wan_ips(n: int) -> tuple[str, str]:
    """(host side, router side) of the link that carries host n's WARP UDP."""
    return f"172.31.{n}.1", f"172.31.{n}.2"


def vx_port(peer: int) -> str:
    return f"vx-h{peer}"


def warp_router_mac(n: int) -> str:
    return f"02:00:00:00:ff:{n:02x}"


def private_run_argv(ns: str | None, run_dir: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` in ``ns`` and in a private mount namespace where ``run_dir`` is /run.

    wireguard-go and wg then use ``run_dir/wireguard/<if>.sock`` as their UAPI
    socket. The mount exists only for that process (and its children).
    """
    script = 'mount --bind "$0" /run && exec "$@"'
    inner = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
             str(run_dir), *argv]
    return nsl.ns_argv(ns, inner)


def _ip(ns: str | None, *args: str) -> None:
    res = nsl.run(ns, ["ip", *args])
    if res.returncode != 0:
        raise MeshLabError(f"[{ns}] ip {' '.join(args)}: {res.stderr.strip()}")


def _routing_ns(ns: str, forward: bool) -> None:
    """IPv6 off, reverse path filter off (asymmetric lab routes), forwarding as told."""
    nsl.disable_ipv6(ns)
    for key in ("all", "default"):
        nsl.sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", 0)
    nsl.sysctl(ns, "net.ipv4.ip_forward", 1 if forward else 0)


@dataclass(frozen=True)
class WgKey:
    private_file: Path  # mode 0600, in the lab's workdir
    public: str  # base64

    @property
    def private(self) -> str:
        return self.private_file.read_text().strip()


class WgDevice:
    """One wireguard-go process and its tun device, with a private UAPI directory."""

    def __init__(self, ns: str, ifname: str, run_dir: Path, log: Path) -> None:
        self.ns = ns
        self.ifname = ifname
        self.run_dir = run_dir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sock_dir(self) -> Path:
        return self.run_dir / "wireguard"

    @property
    def sock(self) -> Path:
        return self.sock_dir / f"{self.ifname}.sock"

    def wg_argv(self, *args: str) -> list[str]:
        return private_run_argv(self.ns, self.run_dir, ["wg", *args])

    def wg(self, *args: str, check: bool = True,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``wg ARGS`` in this device's namespaces; ``stdin`` feeds e.g. ``private-key
        /dev/stdin`` (a key file under /run would be hidden by the private /run)."""
        res = subprocess.run(self.wg_argv(*args), input=stdin, capture_output=True, text=True,
                             timeout=10)
        if check and res.returncode != 0:
            raise MeshLabError(f"[{self.ns}] wg {' '.join(args)}: {res.stderr.strip()}")
        return res

    def start(self, timeout_s: float = 5.0) -> None:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        self.sock.unlink(missing_ok=True)  # stale from an earlier run: would fool the wait
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1",
                   LOG_LEVEL="error")
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                private_run_argv(self.ns, self.run_dir, ["wireguard-go", "-f", self.ifname]),
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout_s
        while not (self.sock.exists() and nsl.link_exists(self.ns, self.ifname)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise MeshLabError(f"[{self.ns}] wireguard-go {self.ifname} did not start: {tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)


class MeshHost(SocketLab):
    """Host ``index`` of a MeshLab: a SocketLab host without the one-host stand-ins."""

    def __init__(self, lab: MeshLab, index: int) -> None:
        privacy, service = HOST_CONTAINERS[index]
        super().__init__(f"{lab.prefix}{index}", lab.workdir / f"h{index}",
                         privacy_ids=privacy, service_ids=service,
                         mesh_uplinks=("vx-*",), mtu=VXLAN_MTU)
        self.lab = lab
        self.index = index
        self.router_ns = f"{self.prefix}r"
        self.underlay_ip = underlay_ip(index)
        self.mesh_ip = mesh_ip(index)
        self.run_dir = self.workdir / "run"
        self.netmaker = WgDevice(self.host, NETMAKER_IF, self.run_dir,
                                 self.workdir / "wireguard-go-netmaker.log")
        self.wgwarp = WgDevice(self.router_ns, WARP_IF, self.run_dir,
                               self.workdir / "wireguard-go-wgwarp.log")
        self.policy_path = self.workdir / "policy.yaml"

    def host_config(self) -> str:
        text = super().host_config()
        old = "to_socket: to-socket}"
        assert old in text, "SocketLab.host_config changed its mesh line"
        vxlan = "true" if self.lab.socknet_vxlan else "false"
        text = text.replace(old, f"to_socket: to-socket, vxlan: {vxlan}, wg_interface: "
                                 f"{NETMAKER_IF}, wg_sock_dir: '{self.sock_dir}'}}")
        if self.lab.policy is not None:
            text += "policy: policy.yaml\n"
        return text

    def start_host(self) -> None:
        if self.lab.policy is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.policy_path.write_text(self.lab.policy)
        super().start_host()

    def write_policy(self, text: str) -> None:
        """Replace this host's policy file the way editors do (write aside, rename)."""
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.policy_path)

    @property
    def namespaces(self) -> list[str]:
        vmids = {*self.privacy_ids, *self.service_ids, *self.containers}
        return [self.host, self.router_ns, *(f"{self.prefix}c{v}" for v in sorted(vmids))]

    @property
    def sock_dir(self) -> Path:
        """Where this host's UAPI sockets are (netmaker.sock, wgwarp.sock)."""
        return self.run_dir / "wireguard"

    def wg(self, *args: str, check: bool = True,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``wg ARGS`` inside this host's namespace and private mount namespace."""
        return self.netmaker.wg(*args, check=check, stdin=stdin)

    def wg_cmd(self) -> list[str]:
        """Command prefix that runs ``wg`` as this host sees it (for controller.wgpeers)."""
        return private_run_argv(self.host, self.run_dir, ["wg"])

    def peers(self) -> list[int]:
        return [m for m in range(1, self.lab.n_hosts + 1) if m != self.index]

    def vx_ports(self) -> dict[int, str]:
        """Peer host -> the name of this host's mesh port towards it."""
        if not self.lab.socknet_vxlan:
            return {m: vx_port(m) for m in self.peers()}
        from controller.peersync import device_name

        return {m: device_name(self.lab.keys[f"h{m}"].public) for m in self.peers()}

    def down(self) -> None:
        self.netmaker.stop()
        self.wgwarp.stop()
        super().down()


class MeshLab:
    """``MeshLab(prefix, workdir, hosts=2|3).up()``; ``down()`` removes everything."""

    def __init__(self, prefix: str, workdir: Path, hosts: int = 2, *,
                 socknet_vxlan: bool = True, policy: str | None = None) -> None:
        """``socknet_vxlan``: socknet makes the per-peer VXLAN ports (else the lab does,
        by hand); ``policy``: the text of a policy.yaml every host enforces."""
        self.socknet_vxlan = socknet_vxlan
        self.policy = policy
        if not 1 <= len(prefix) <= PREFIX_MAX or not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
            raise ValueError(f"prefix must be 1-{PREFIX_MAX} lower-case letters/digits")
        if hosts not in (2, 3):
            raise ValueError("hosts must be 2 or 3")
        self.prefix = prefix
        self.workdir = Path(workdir).absolute()
        self.n_hosts = hosts
        self.underlay_ns = f"{prefix}u"
        self.exit_ns = f"{prefix}x"
        self.inet_ns = f"{prefix}i"
        self.hosts = [MeshHost(self, n) for n in range(1, hosts + 1)]
        self.exit_dir = self.workdir / "exit"
        self.wgexit = WgDevice(self.exit_ns, EXIT_IF, self.exit_dir / "run",
                               self.exit_dir / "wireguard-go-wgexit.log")
        self.keys: dict[str, WgKey] = {}
        self.up_seconds: float | None = None

    # ------------------------------------------------------------ lookups
    def host(self, n: int) -> MeshHost:
        """Host ``n`` (1-based)."""
        return self.hosts[n - 1]

    @property
    def containers(self) -> dict[int, Container]:
        return {v: c for h in self.hosts for v, c in h.containers.items()}

    def host_of(self, vmid: int) -> MeshHost:
        for h in self.hosts:
            if vmid in h.containers or vmid in (*h.privacy_ids, *h.service_ids):
                return h
        raise KeyError(vmid)

    @property
    def namespaces(self) -> list[str]:
        out = [self.underlay_ns, self.exit_ns, self.inet_ns]
        for h in self.hosts:
            out += h.namespaces
        return out

    def _own_namespace(self, name: str) -> bool:
        p = re.escape(self.prefix)
        return bool(re.fullmatch(rf"{p}[uxi]|{p}[1-3](h|r|c\d+)", name))

    # ------------------------------------------------------------ lifecycle
    def up(self, *, controller: bool = True) -> MeshLab:
        taken = [n for n in nsl.list_netns() if self._own_namespace(n)]
        if taken:  # another lab with this prefix: refuse before the cleanup below could hit it
            raise MeshLabError(f"namespaces of prefix {self.prefix!r} exist: {', '.join(taken)}")
        try:
            self._up(controller)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for h in self.hosts:
            h.stop_controller()
            h.netmaker.stop()
            h.wgwarp.stop()
        self.wgexit.stop()
        for h in self.hosts:
            h.ovs.stop(remove_rundir=False)
        # every namespace we may have made, also ones an interrupted up() left behind
        names = [*self.namespaces, *(n for n in nsl.list_netns() if self._own_namespace(n))]
        for ns in dict.fromkeys(reversed(names)):
            nsl.delete_netns(ns, kill_procs=True)
        for h in self.hosts:
            h.containers.clear()

    def _up(self, controller: bool) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_keys()
        self._underlay_exit_internet()
        for h in self.hosts:
            self._host(h)
        for h in self.hosts:
            self._netmaker(h)
        # handshakes first: socknet makes devices for live peers only
        self._wait_probes([(h.host, mesh_ip(m)) for h in self.hosts for m in h.peers()
                           if m > h.index])
        for h in self.hosts:
            self._vxlan(h)
        self._exit_wireguard()
        for h in self.hosts:
            self._warp(h)
        self._wait_tunnels()
        if controller:
            self.start_controllers()
        self.up_seconds = time.monotonic() - t0

    def start_controllers(self) -> None:
        """Start every host's controller, then wait until each has reconciled."""
        marks = {}
        for h in self.hosts:
            marks[h.index] = len(h.log_events())
            h.start_controller(wait=False)
        for h in self.hosts:
            h.wait_reconciled(after=marks[h.index])

    # ------------------------------------------------------------ pieces
    def _make_keys(self) -> None:
        kdir = self.workdir / "keys"
        kdir.mkdir(parents=True, exist_ok=True)
        names = [*(f"h{h.index}" for h in self.hosts), *(f"r{h.index}" for h in self.hosts),
                 "exit"]
        for name in names:
            priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                  check=True).stdout.strip()
            pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                                 check=True).stdout.strip()
            path = kdir / f"{name}.key"
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(priv + "\n")
            self.keys[name] = WgKey(path, pub)

    def _underlay_exit_internet(self) -> None:
        u, x, i = self.underlay_ns, self.exit_ns, self.inet_ns
        for ns in (u, x, i):
            nsl.create_netns(ns)
        nsl.disable_ipv6(u)
        _routing_ns(x, forward=True)
        nsl.disable_ipv6(i)
        _ip(u, "link", "add", UNDERLAY_BRIDGE, "type", "bridge", "stp_state", "0")
        nsl.link_up(u, UNDERLAY_BRIDGE)
        self._underlay_port(x, "x")
        nsl.add_addr(x, "ul0", f"{EXIT_UNDERLAY_IP}/{UNDERLAY_NET.prefixlen}")
        nsl.add_veth("up0", "eth0", x, i)
        nsl.add_addr(x, "up0", f"{EXIT_UPLINK_IP}/24")
        nsl.add_addr(i, "eth0", f"{INTERNET_IP}/24")
        nsl.add_default_route(i, EXIT_UPLINK_IP)

    def _underlay_port(self, ns: str, port: str) -> None:
        nsl.add_veth("ul0", port, ns, self.underlay_ns)
        _ip(self.underlay_ns, "link", "set", port, "master", UNDERLAY_BRIDGE)

    def _host(self, h: MeshHost) -> None:
        shutil.rmtree(h.ovs.rundir, ignore_errors=True)  # a database left by an earlier run
        h.start_host()  # host namespace, OVS, host.yaml, socknet bootstrap
        _routing_ns(h.host, forward=True)  # forwards the WARP router's UDP to the underlay
        self._underlay_port(h.host, f"h{h.index}")
        nsl.add_addr(h.host, "ul0", f"{h.underlay_ip}/{UNDERLAY_NET.prefixlen}")
        # the WARP router and vmbr0's WARP port
        r = h.router_ns
        nsl.create_netns(r)
        _routing_ns(r, forward=True)
        nsl.add_veth("warp0", "warp0-rt", h.host, r, mtu=VXLAN_MTU)
        nsl.tx_off(h.host, "warp0")
        nsl.tx_off(r, "warp0-rt")
        nsl.set_mac(r, "warp0-rt", warp_router_mac(h.index))
        nsl.add_addr(r, "warp0-rt", f"{WARP_GATEWAY}/24")
        h.ovs.add_port("vmbr0", "warp0")
        host_wan, router_wan = wan_ips(h.index)
        nsl.add_veth("warp-wan", "wan0", h.host, r)
        nsl.add_addr(h.host, "warp-wan", f"{host_wan}/30")
        nsl.add_addr(r, "wan0", f"{router_wan}/30")
        nsl.add_route(r, f"{EXIT_UNDERLAY_IP}/32", gateway=host_wan)
        for vmid in (*h.privacy_ids, *h.service_ids):
            h.add_container(vmid)

    def _netmaker(self, h: MeshHost) -> None:
        dev = h.netmaker
        dev.start()
        args = ["set", NETMAKER_IF, "private-key", "/dev/stdin", "listen-port", str(NETMAKER_PORT)]
        for m in h.peers():
            args += self.netmaker_peer_args(m)
        dev.wg(*args, stdin=self.keys[f"h{h.index}"].private)
        nsl.add_addr(h.host, NETMAKER_IF, f"{h.mesh_ip}/{MESH_NET.prefixlen}")
        nsl.link_up(h.host, NETMAKER_IF)

    def netmaker_peer_args(self, m: int) -> list[str]:
        """``wg set`` arguments that (re)add host m as a peer of the mesh. Keepalive as
        Netmaker sets it: without traffic WireGuard does not handshake again, and
        socknet removes the port of a peer whose handshake is older than 180 s."""
        return ["peer", self.keys[f"h{m}"].public, "endpoint",
                f"{underlay_ip(m)}:{NETMAKER_PORT}", "allowed-ips", f"{mesh_ip(m)}/32",
                "persistent-keepalive", "20"]

    def vni(self, a: int, b: int) -> int:
        """VNI of the VXLAN link between hosts a and b, as this lab makes them."""
        if not self.socknet_vxlan:
            return vni(a, b)
        from controller.peersync import pair_vni

        return pair_vni(self.keys[f"h{a}"].public, self.keys[f"h{b}"].public)

    def write_policy(self, text: str) -> None:
        """The same new policy.yaml on every host (each controller reloads it)."""
        self.policy = text
        for h in self.hosts:
            h.write_policy(text)

    def _vxlan(self, h: MeshHost) -> None:
        if self.socknet_vxlan:
            out = h.socknet("bootstrap").stdout  # bootstrap syncs the per-peer ports
            missing = [n for n in h.vx_ports().values() if not nsl.link_exists(h.host, n)]
            if missing:
                raise MeshLabError(f"[{h.host}] socknet bootstrap made no {missing}: {out}")
            return
        for m, name in h.vx_ports().items():
            _ip(h.host, "link", "add", name, "type", "vxlan", "id", str(vni(h.index, m)),
                "remote", mesh_ip(m), "local", h.mesh_ip, "dstport", str(VXLAN_PORT),
                "dev", NETMAKER_IF, "nolearning")
            nsl.set_mtu(h.host, name, VXLAN_MTU)
            # GRO would hand OVS coalesced TCP frames larger than the MTU
            nsl.run(h.host, ["ethtool", "-K", name, "gro", "off"], check=True)
            nsl.link_up(h.host, name)
            h.ovs.add_port("mesh", name)

    def _exit_wireguard(self) -> None:
        dev, x = self.wgexit, self.exit_ns
        dev.start()
        args = ["set", EXIT_IF, "private-key", "/dev/stdin", "listen-port", str(EXIT_WG_PORT)]
        for h in self.hosts:
            allowed = [f"{warp_tunnel_ip(h.index)}/32",
                       *(f"{container_ip(v)}/32" for v in h.privacy_ids)]
            args += ["peer", self.keys[f"r{h.index}"].public, "allowed-ips", ",".join(allowed)]
        dev.wg(*args, stdin=self.keys["exit"].private)
        nsl.add_addr(x, EXIT_IF, f"{EXIT_TUNNEL_IP}/24")
        nsl.link_up(x, EXIT_IF)
        _ip(x, "route", "add", "10.0.0.0/24", "dev", EXIT_IF)
        for h in self.hosts:
            wan = ipaddress.ip_interface(f"{wan_ips(h.index)[0]}/30").network
            _ip(x, "route", "add", str(wan), "via", h.underlay_ip)

    def _warp(self, h: MeshHost) -> None:
        r, dev = h.router_ns, h.wgwarp
        dev.start()
        dev.wg("set", WARP_IF, "private-key", "/dev/stdin", "peer", self.keys["exit"].public,
               "endpoint", f"{EXIT_UNDERLAY_IP}:{EXIT_WG_PORT}", "allowed-ips", "0.0.0.0/0",
               stdin=self.keys[f"r{h.index}"].private)
        nsl.add_addr(r, WARP_IF, f"{warp_tunnel_ip(h.index)}/24")
        nsl.link_up(r, WARP_IF)
        # kill switch: what comes from vmbr0 is routed by table WARP_TABLE only
        _ip(r, "rule", "add", "iif", "warp0-rt", "lookup", str(WARP_TABLE), "pref", "100")
        _ip(r, "route", "add", "blackhole", "default", "metric", "4096",
            "table", str(WARP_TABLE))
        self.warp_route(h.index)

    def warp_route(self, n: int) -> None:
        """(Re)install ``default dev wgwarp`` in the router's table: after the link was
        down the kernel has removed it, and the blackhole behind it holds."""
        _ip(self.host(n).router_ns, "route", "replace", "default", "dev", WARP_IF, "metric", "0",
            "table", str(WARP_TABLE))

    def warp_down(self, n: int) -> None:
        nsl.link_down(self.host(n).router_ns, WARP_IF)

    def warp_up(self, n: int) -> None:
        nsl.link_up(self.host(n).router_ns, WARP_IF)
        self.warp_route(n)

    def _wait_tunnels(self) -> None:
        """First packets through every tunnel: the WireGuard handshakes happen here."""
        probes = [(h.host, mesh_ip(m)) for h in self.hosts for m in h.peers()
                  if m > h.index]
        probes += [(h.router_ns, EXIT_TUNNEL_IP) for h in self.hosts]
        self._wait_probes(probes)

    @staticmethod
    def _wait_probes(probes: list[tuple[str, str]]) -> None:
        for ns, dst in probes:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _ping1(ns, dst):
                if time.monotonic() > deadline:
                    raise MeshLabError(f"[{ns}] no reply from {dst} through WireGuard")

    # ------------------------------------------------------------ helpers for tests and humans
    def describe(self) -> str:
        lines = [f"mesh lab {self.prefix}: {self.n_hosts} hosts, workdir {self.workdir}"]
        for h in self.hosts:
            cs = ", ".join(f"{v} {container_ip(v)} ({h.prefix}c{v})"
                           for v in (*h.privacy_ids, *h.service_ids))
            lines += [
                f"  host {h.index}: netns {h.host}, underlay {h.underlay_ip}, "
                f"mesh {h.mesh_ip}, WARP router {h.router_ns}",
                f"    containers: {cs}",
                "    wg:      " + shlex.join([*h.wg_cmd(), "show"]),
                *(f"    {line}" for line in hints(h)),
            ]
        lines.append(f"  underlay {self.underlay_ns} (bridge {UNDERLAY_BRIDGE}), exit "
                     f"{self.exit_ns} ({EXIT_UNDERLAY_IP}), internet {self.inet_ns} "
                     f"({INTERNET_IP})")
        return "\n".join(lines)

    def exec_python(self, ns: str, code: str, timeout_s: float = 10.0,
                    **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code`` inside ``ns`` (real sockets in a container)."""
        return nsl.run(ns, [sys.executable, "-c", code], timeout=timeout_s, env=_env(), **kw)


def _ping1(ns: str, dst: str) -> bool:
    return nsl.run(ns, ["ping", "-n", "-q", "-c", "1", "-W", "1", dst]).returncode == 0
