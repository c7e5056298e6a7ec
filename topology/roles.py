"""Which role a port plays, from its bridge and its name."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import StrEnum

from topology.config import HostConfig, IdRange

# seed style veth100 / veth100i0, Proxmox tap<vmid>i<n> (VMs) and fwln<vmid>o<n> (firewall on)
_CONTAINER_PORT = re.compile(
    r"^(?:veth(?P<veth>\d+)(?:i(?P<vethi>\d+))?|tap(?P<tap>\d+)i(?P<tapi>\d+)"
    r"|fwln(?P<fwln>\d+)o(?P<fwlni>\d+))$"
)


class Role(StrEnum):
    MESH_UPLINK = "mesh-uplink"
    TO_SOCKET = "to-socket"
    FROM_MESH = "from-mesh"
    WARP = "warp"
    PRIVACY = "privacy"
    SERVICE = "service"
    GATEWAY = "gateway"
    UNKNOWN = "unknown"  # anything else: dropped at ingress


@dataclass(frozen=True)
class PortRole:
    role: Role
    vmid: int | None = None


def container_vmid(name: str) -> int | None:
    key = nic_key(name)
    return key[0] if key else None


def nic_key(name: str) -> tuple[int, int] | None:
    """(vmid, interface index) of a guest's host-side port: Proxmox's netN is
    veth<vmid>i<N> / tap<vmid>i<N> / fwln<vmid>o<N>; the seed's veth<vmid> is net0."""
    m = _CONTAINER_PORT.match(name)
    if not m:
        return None
    g = m.groupdict()
    for kind in ("veth", "tap", "fwln"):
        if g[kind] is not None:
            return int(g[kind]), int(g[f"{kind}i"] or 0)
    return None


def classify_port(cfg: HostConfig, bridge: str, name: str) -> PortRole:
    mesh, sock = cfg.bridges.mesh, cfg.bridges.socket
    if bridge == mesh.name:
        if name == mesh.to_socket:
            return PortRole(Role.TO_SOCKET)
        if any(fnmatch.fnmatchcase(name, pat) for pat in mesh.uplinks):
            return PortRole(Role.MESH_UPLINK)
        return PortRole(Role.UNKNOWN)
    if bridge == sock.name:
        if name == sock.from_mesh:
            return PortRole(Role.FROM_MESH)
        if name == sock.warp:
            return PortRole(Role.WARP)
        if sock.gateway is not None and name == sock.gateway:
            return PortRole(Role.GATEWAY)
        vmid = container_vmid(name)
        if vmid is not None:
            if vmid in sock.privacy_ids:
                return PortRole(Role.PRIVACY, vmid)
            if vmid in sock.service_ids:
                return PortRole(Role.SERVICE, vmid)
        return PortRole(Role.UNKNOWN, vmid)
    return PortRole(Role.UNKNOWN)


def _ids(r: IdRange) -> str:
    return f"{r.first}-{r.last}"


def no_role_reason(cfg: HostConfig, bridge: str, name: str) -> str:
    """Why ``classify_port`` gives ``name`` no role on ``bridge``, in words for the operator
    (`socknet status`, `socknet flows --port`, `dropped` events)."""
    mesh, sock = cfg.bridges.mesh, cfg.bridges.socket
    if bridge == mesh.name:
        return f"neither {mesh.to_socket} nor a mesh uplink ({', '.join(mesh.uplinks)})"
    if bridge == sock.name:
        vmid = container_vmid(name)
        if vmid is not None:
            return (f"container {vmid} is in neither privacy_ids {_ids(sock.privacy_ids)} "
                    f"nor service_ids {_ids(sock.service_ids)}")
        named = ", ".join(n for n in (sock.from_mesh, sock.warp, sock.gateway) if n)
        return (f"not a container port (veth<vmid>i<n>, tap<vmid>i<n>, fwln<vmid>o<n>) "
                f"and not one host.yaml names ({named})")
    return f"{bridge} is not a bridge of this host"


def configured_ports(cfg: HostConfig) -> dict[str, dict[str, str]]:
    """bridge -> port name host.yaml gives literally (not a pattern) -> the key giving it.
    Each of them should exist; `socknet status` says when one does not."""
    mesh, sock = cfg.bridges.mesh, cfg.bridges.socket
    on_mesh = {mesh.to_socket: "bridges.mesh.to_socket"}
    for uplink in mesh.uplinks:
        if not any(c in uplink for c in "*?["):
            on_mesh.setdefault(uplink, "bridges.mesh.uplinks")
    on_socket = {sock.from_mesh: "bridges.socket.from_mesh", sock.warp: "bridges.socket.warp"}
    if sock.gateway is not None:
        on_socket[sock.gateway] = "bridges.socket.gateway"
    return {mesh.name: on_mesh, sock.name: on_socket}
