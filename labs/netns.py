"""Network namespace helpers built on pyroute2.

Every helper takes the namespace name first; ``None`` means the namespace of the
calling process (the root namespace in tests and labs).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

NETNS_RUN_DIR = "/var/run/netns"
IFNAMSIZ_MAX = 15


# --------------------------------------------------------------------------- namespaces


def netns_exists(name: str) -> bool:
    """True if the named namespace exists (in /var/run/netns)."""
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def list_netns() -> list[str]:
    """Names of all named network namespaces."""
    return sorted(_netns.listnetns())


def create_netns(name: str, *, lo_up: bool = True) -> str:
    """Create the namespace ``name`` (error if it exists) and bring its ``lo`` up."""
    if netns_exists(name):
        raise FileExistsError(f"network namespace {name!r} already exists")
    _netns.create(name)
    if lo_up:
        link_up(name, "lo")
    return name


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes running inside the namespace (empty if it does not exist)."""
    if not netns_exists(name):
        return []
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_netns_pids(name: str, *, timeout_s: float = 2.0) -> list[int]:
    """SIGTERM every process inside the namespace, SIGKILL survivors; return the PIDs."""
    pids = netns_pids(name)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    _signal_all([p for p in pids if pid_alive(p)], signal.SIGKILL)
    return pids


def delete_netns(name: str, *, kill_procs: bool = False) -> None:
    """Delete the namespace; no error if it does not exist.

    With ``kill_procs`` the processes still running inside it are killed first
    (otherwise they keep the namespace alive). Its interfaces are deleted right
    away: the kernel destroys a namespace asynchronously, and veth peers in other
    namespaces would otherwise linger for a moment.
    """
    if not netns_exists(name):
        return
    try:
        if kill_procs:
            kill_netns_pids(name)
        delete_all_links(name)  # best effort: a peer may vanish while we walk the links
    except Exception:  # noqa: BLE001 - removing the namespace below matters more
        pass
    try:
        _netns.remove(name)
    except FileNotFoundError:
        pass


def delete_all_links(ns: str) -> None:
    """Delete every interface of ``ns`` except ``lo`` (best effort)."""
    with iproute(ns) as ipr:
        for link in ipr.get_links():
            if link.get("IFLA_IFNAME") == "lo":
                continue
            try:
                ipr.link("del", index=link["index"])
            except Exception:  # already gone with its veth peer, or undeletable
                pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- links


@contextmanager
def iproute(ns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket bound to namespace ``ns`` (caller's namespace if None)."""
    ipr = IPRoute(netns=ns) if ns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, ns: str | None, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r} in namespace {ns or '<root>'}")
    return int(found[0])


def _check_ifname(ifname: str) -> None:
    if not ifname or len(ifname) > IFNAMSIZ_MAX:
        raise ValueError(f"interface name {ifname!r} must be 1..{IFNAMSIZ_MAX} chars")


def link_exists(ns: str | None, ifname: str) -> bool:
    """True if ``ifname`` exists in namespace ``ns``."""
    with iproute(ns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def add_veth(
    name_a: str,
    name_b: str,
    ns_a: str | None = None,
    ns_b: str | None = None,
    *,
    up: bool = True,
    mtu: int | None = None,
) -> None:
    """Create a veth pair: end ``name_a`` in ``ns_a`` and end ``name_b`` in ``ns_b``.

    The pair is created directly inside ``ns_a``, so names only have to be unique
    inside their own namespace. With ``up`` both ends are brought up.
    """
    _check_ifname(name_a)
    _check_ifname(name_b)
    peer: dict[str, Any] = {"ifname": name_b}
    if ns_b:
        peer["net_ns_fd"] = ns_b
    else:
        peer["net_ns_pid"] = os.getpid()
    with iproute(ns_a) as ipr:
        ipr.link("add", ifname=name_a, kind="veth", peer=peer)
    for ns, name in ((ns_a, name_a), (ns_b, name_b)):
        if mtu is not None:
            set_mtu(ns, name, mtu)
        if up:
            link_up(ns, name)


def delete_link(ns: str | None, ifname: str) -> None:
    """Delete an interface; no error if it does not exist (a veth takes its peer along)."""
    with iproute(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


def link_up(ns: str | None, ifname: str) -> None:
    """Set ``ifname`` administratively up."""
    with iproute(ns) as ipr:
        ipr.link("set", index=_index(ipr, ns, ifname), state="up")


def link_down(ns: str | None, ifname: str) -> None:
    """Set ``ifname`` administratively down."""
    with iproute(ns) as ipr:
        ipr.link("set", index=_index(ipr, ns, ifname), state="down")


def set_mac(ns: str | None, ifname: str, mac: str) -> None:
    """Set the Ethernet address of ``ifname``."""
    with iproute(ns) as ipr:
        ipr.link("set", index=_index(ipr, ns, ifname), address=mac)


def get_mac(ns: str | None, ifname: str) -> str:
    """Ethernet address of ``ifname`` (lower case, colon separated)."""
    with iproute(ns) as ipr:
        link = ipr.get_links(_index(ipr, ns, ifname))[0]
        return str(link.get("IFLA_ADDRESS")).lower()


def set_mtu(ns: str | None, ifname: str, mtu: int) -> None:
    """Set the MTU of ``ifname``."""
    with iproute(ns) as ipr:
        ipr.link("set", index=_index(ipr, ns, ifname), mtu=mtu)


# --------------------------------------------------------------------------- L3


def add_addr(ns: str | None, ifname: str, cidr: str) -> None:
    """Add an address such as ``"10.99.0.1/24"`` to ``ifname``."""
    iface = ipaddress.ip_interface(cidr)
    with iproute(ns) as ipr:
        ipr.addr(
            "add",
            index=_index(ipr, ns, ifname),
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
        )


def add_route(
    ns: str | None,
    dst: str,
    gateway: str | None = None,
    ifname: str | None = None,
) -> None:
    """Add (or replace) a route; ``dst`` is a CIDR or ``"default"``."""
    if gateway is None and ifname is None:
        raise ValueError("a route needs a gateway, an interface, or both")
    kw: dict[str, Any] = {"dst": dst}
    if gateway is not None:
        kw["gateway"] = gateway
    else:
        kw["scope"] = 253  # on-link, as `ip route add DST dev IF` does
    with iproute(ns) as ipr:
        if ifname is not None:
            kw["oif"] = _index(ipr, ns, ifname)
        ipr.route("replace", **kw)


def add_default_route(ns: str | None, gateway: str, ifname: str | None = None) -> None:
    """Add (or replace) the IPv4 default route via ``gateway``."""
    add_route(ns, "default", gateway=gateway, ifname=ifname)


# --------------------------------------------------------------------------- tools


def sysctl(ns: str | None, key: str, value: str | int) -> None:
    """Set a sysctl inside the namespace (e.g. ``net.ipv6.conf.all.disable_ipv6``)."""
    run(ns, ["sysctl", "-qw", f"{key}={value}"], check=True)


def disable_ipv6(ns: str) -> None:
    """Disable IPv6 in a namespace (no router solicitations / MLD noise in captures)."""
    sysctl(ns, "net.ipv6.conf.all.disable_ipv6", 1)
    sysctl(ns, "net.ipv6.conf.default.disable_ipv6", 1)


def tx_off(ns: str | None, ifname: str) -> None:
    """Turn TX checksum offload off (needed for TCP through userspace conntrack)."""
    run(ns, ["ethtool", "-K", ifname, "tx", "off"], check=True)


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``ip netns exec ns`` (unchanged when ns is None)."""
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def run(ns: str | None, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` inside ``ns``; output captured as text unless told otherwise.

    Keyword arguments go to :func:`subprocess.run` (``check`` defaults to False).
    """
    if not {"stdout", "stderr", "capture_output"} & kw.keys():
        kw["capture_output"] = True
    kw.setdefault("text", True)
    return subprocess.run(ns_argv(ns, argv), **kw)


def popen(ns: str | None, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``ns``; keyword arguments go to :class:`subprocess.Popen`."""
    return subprocess.Popen(ns_argv(ns, argv), **kw)
