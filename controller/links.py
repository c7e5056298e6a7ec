"""Kernel link helpers (pyroute2): the veth pair between the two bridges, TX offload.

Every function takes an optional keyword ``netns`` (a named network namespace,
``/var/run/netns/<name>``); ``None`` means the namespace of the calling thread,
which is what a real host uses. The namespace is entered only by the calling
thread and only while the netlink/ioctl socket is created (a socket stays bound
to the namespace it was created in), so other threads are not affected.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as _netns
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IFNAMSIZ_MAX = 15
IFF_UP = 0x1


class LinkError(RuntimeError):
    """A link is missing, or exists in a shape we must not touch."""


@dataclass(frozen=True)
class VethResult:
    """What ``ensure_veth_pair`` did: ``created`` the pair, and every change made."""

    created: bool
    changes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- namespaces


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with the calling *thread* inside network namespace ``netns``.

    Uses ``/proc/thread-self`` (not ``/proc/self``, which is the main thread) to
    come back, so it is safe in any thread. ``None`` does nothing.
    """
    if netns is None:
        yield
        return
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _netns.setns(netns, flags=0)  # flags=0: never create the namespace
        except OSError as exc:
            raise LinkError(f"cannot enter network namespace {netns!r}: {exc}") from exc
        try:
            yield
        finally:
            _netns.setns(saved)
    finally:
        os.close(saved)


@contextmanager
def _iproute(netns: str | None) -> Iterator[IPRoute]:
    with in_netns(netns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _where(netns: str | None) -> str:
    return f" in namespace {netns}" if netns else ""


def _check_name(name: str) -> None:
    if not name or len(name) > IFNAMSIZ_MAX or "/" in name or any(c.isspace() for c in name):
        raise LinkError(f"{name!r} is not a valid interface name (1-{IFNAMSIZ_MAX} chars)")


# --------------------------------------------------------------------------- queries


def _link(ipr: IPRoute, name: str) -> Any:
    """The RTM_NEWLINK message of ``name``, or None."""
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return None
    links = ipr.get_links(idx[0])
    return links[0] if links else None


def link_exists(name: str, *, netns: str | None = None) -> bool:
    """True if an interface ``name`` exists."""
    with _iproute(netns) as ipr:
        return bool(ipr.link_lookup(ifname=name))


def link_names(*, netns: str | None = None) -> set[str]:
    """The names of every interface in the namespace."""
    with _iproute(netns) as ipr:
        return {str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}


def _kind(msg: Any) -> str | None:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def _veth_peer(ipr: IPRoute, msg: Any, name: str, netns: str | None) -> str:
    """Name of the peer of veth ``name``; LinkError if it is not a local veth."""
    kind = _kind(msg)
    if kind != "veth":
        raise LinkError(
            f"{name} exists{_where(netns)} but is a {kind or 'plain'} device, not a veth"
        )
    if msg.get("IFLA_LINK_NETNSID") is not None:
        raise LinkError(f"veth {name}{_where(netns)} has its peer in another network namespace")
    peer_idx = msg.get("IFLA_LINK")
    peers = ipr.get_links(peer_idx) if peer_idx else []
    if not peers:
        raise LinkError(f"veth {name}{_where(netns)}: cannot find its peer (ifindex {peer_idx})")
    return str(peers[0].get("IFLA_IFNAME"))


def veth_pair_exists(a: str, b: str, *, netns: str | None = None) -> bool:
    """True if ``a``/``b`` exist as a veth pair, False if neither exists.

    Raises ``LinkError`` (changing nothing) if only one end exists, if an end is
    not a veth, or if the ends are paired with something else.
    """
    _check_name(a)
    _check_name(b)
    if a == b:
        raise LinkError(f"veth ends must have different names (both {a!r})")
    with _iproute(netns) as ipr:
        la, lb = _link(ipr, a), _link(ipr, b)
        if la is None and lb is None:
            return False
        if la is None or lb is None:
            have, missing = (a, b) if la is not None else (b, a)
            peer = _veth_peer(ipr, la if la is not None else lb, have, netns)  # raises if no veth
            raise LinkError(
                f"{have} exists{_where(netns)} but its peer {missing} does not "
                f"({have} is paired with {peer})"
            )
        peer = _veth_peer(ipr, la, a, netns)
        if peer != b:
            raise LinkError(f"veth {a}{_where(netns)} is paired with {peer}, not with {b}")
        return True


# --------------------------------------------------------------------------- changes


def ensure_veth_pair(
    a: str, b: str, mtu: int | None = None, *, netns: str | None = None
) -> VethResult:
    """Make sure the veth pair ``a``<->``b`` exists and both ends are up (idempotent).

    Creates the pair if neither end exists. Raises ``LinkError`` without
    changing anything if one end exists without the other or with another
    peer, or if an end is not a veth. With ``mtu`` both ends get that MTU. If
    this call created the pair and a later step fails, the pair is removed
    again before the error propagates.
    """
    if mtu is not None and not 68 <= mtu <= 65535:
        raise LinkError(f"MTU {mtu} out of range 68..65535")
    created = False
    exists = veth_pair_exists(a, b, netns=netns)
    changes: list[str] = []
    with _iproute(netns) as ipr:
        if not exists:
            try:
                ipr.link("add", ifname=a, kind="veth", peer={"ifname": b})
            except NetlinkError as exc:
                # Lost a race with someone else creating one of the names?
                raise LinkError(f"cannot create veth {a}/{b}{_where(netns)}: {exc}") from exc
            created = True
            changes.append(f"created veth pair {a}/{b}")
        try:
            for name in (a, b):
                msg = _link(ipr, name)
                if msg is None:
                    raise LinkError(f"veth end {name} vanished{_where(netns)}")
                idx = msg["index"]
                if mtu is not None and msg.get("IFLA_MTU") != mtu:
                    ipr.link("set", index=idx, mtu=mtu)
                    changes.append(f"set MTU of {name} to {mtu}")
                if not msg["flags"] & IFF_UP:
                    ipr.link("set", index=idx, state="up")
                    if not created:
                        changes.append(f"set {name} up")
        except (NetlinkError, LinkError) as exc:
            if created:
                _delete(ipr, a)
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"cannot configure veth {a}/{b}{_where(netns)}: {exc}") from exc
        except BaseException:
            if created:
                _delete(ipr, a)
            raise
    return VethResult(created=created, changes=tuple(changes))


def _delete(ipr: IPRoute, name: str) -> bool:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return False
    try:
        ipr.link("del", index=idx[0])
    except NetlinkError as exc:
        if exc.code == 19:  # ENODEV: gone in the meantime (e.g. its peer was deleted)
            return False
        raise LinkError(f"cannot delete {name}: {exc}") from exc
    return True


def delete_link(name: str, *, netns: str | None = None) -> bool:
    """Delete interface ``name`` if it exists (a veth takes its peer along).

    Returns True if something was deleted. Idempotent.
    """
    _check_name(name)
    with _iproute(netns) as ipr:
        return _delete(ipr, name)


def _tx_off_ethtool_cli(name: str, netns: str | None) -> None:
    argv = ["ethtool", "-K", name, "tx", "off"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    if shutil.which(argv[0]) is None:
        raise LinkError(f"cannot turn TX offload off on {name}: {argv[0]} is not installed")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise LinkError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")


def disable_tx_offload(name: str, *, netns: str | None = None) -> bool:
    """Turn TX checksum offload off on ``name`` (``ethtool -K name tx off``).

    Userspace conntrack (netdev datapath) marks TCP segments with offloaded,
    i.e. not yet computed, checksums as invalid; so the veth ends feeding OVS
    must checksum in software. Returns True if the setting changed.

    Uses pyroute2's ethtool module: its legacy ``ETHTOOL_STXCSUM`` ioctl clears
    every ``tx-checksum-*`` feature, exactly like ``ethtool -K tx off`` (the
    kernel then also drops TSO, which depends on it). Only if that ioctl is
    not available (pyroute2 error, exotic driver) do we fall back to running
    the ``ethtool`` binary.
    """
    _check_name(name)
    from pyroute2.ethtool import Ethtool  # imported lazily: it pulls in genl code
    from pyroute2.ethtool.ioctl import EthtoolError, NoSuchDevice

    try:
        with in_netns(netns):
            eth = Ethtool()
        try:
            if not eth.get_offload_flags(name).get("tx-checksumming", False):
                return False
            eth.set_offload_flag(name, "tx-checksumming", 0)
            if not eth.get_offload_flags(name).get("tx-checksumming", False):
                return True
            reason = "the flag stayed on"
        finally:
            eth.close()
    except NoSuchDevice as exc:
        raise LinkError(f"cannot turn TX offload off: no interface {name}{_where(netns)}") from exc
    except (EthtoolError, OSError, NetlinkError) as exc:
        reason = str(exc) or type(exc).__name__
    if not link_exists(name, netns=netns):
        raise LinkError(f"cannot turn TX offload off: no interface {name}{_where(netns)}")
    # Fallback: pyroute2's ioctl path did not work for this device; the ethtool
    # binary knows more drivers (and the netlink ethtool API).
    log.warning(
        "pyroute2 ethtool could not turn TX offload off on %s (%s); running ethtool -K",
        name,
        reason,
    )
    _tx_off_ethtool_cli(name, netns)
    return True
