"""The one-host lab with tier policy: service containers in tier subnets, a
service gateway (the host's router, with a stand-in internet address behind
it) and a tailnet user on the mesh side.

    <p>g   the service gateway: eth0 <-> svcgw0 on vmbr0 (10.255.255.254/8),
           and the stand-in internet host 198.18.1.1 on its loopback
    <p>m   the mesh side gains a tailnet address, 100.64.0.5

Containers reach each other on-link across tier subnets (10.0.0.0/8) and the
tailnet on-link through the mesh; everything else via the gateway.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from labs import netns as nsl
from labs.lab import GATEWAY, SocketLab
from topology.policy import Policy

SERVICE_GW_IP = "10.255.255.254"
SERVICE_INTERNET_IP = "198.18.1.1"
TAILNET_USER_IP = "100.64.0.5"


class PolicyLab(SocketLab):
    def __init__(self, prefix: str, workdir: Path, policy_text: str,
                 services: dict[int, str], *, onlink: tuple[str, ...] = (),
                 **kw: object) -> None:
        """``onlink``: more subnets the service containers reach directly on vmbr0 (tier
        subnets outside 10.0.0.0/8), besides 10.0.0.0/8 and the tailnet."""
        super().__init__(prefix, workdir, service_ids=tuple(services), **kw)  # type: ignore[arg-type]
        self.service_ips = dict(services)
        self.onlink = tuple(onlink)
        self.gw_ns = f"{prefix}g"
        self.policy_path = self.workdir / "policy.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.policy_path.write_text(policy_text)

    def write_policy(self, text: str | bytes) -> None:
        """Replace the policy file the way editors do (write aside, rename)."""
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, self.policy_path)

    def container_ip(self, vmid: int) -> str:
        return self.service_ips.get(vmid) or super().container_ip(vmid)

    def container_routes(self, ns: str, vmid: int) -> None:
        if vmid not in self.service_ips:
            super().container_routes(ns, vmid)
            return
        nsl.add_route(ns, "10.0.0.0/8", ifname="eth0")
        nsl.add_route(ns, "100.64.0.0/10", ifname="eth0")
        own = ipaddress.ip_interface(f"{self.service_ips[vmid]}/24").network
        for net in self.onlink:
            if ipaddress.ip_network(net) != own:
                nsl.add_route(ns, net, ifname="eth0")
        nsl.add_default_route(ns, SERVICE_GW_IP)

    @property
    def namespaces(self) -> list[str]:
        return [*super().namespaces, self.gw_ns]

    def host_config(self) -> str:
        text = super().host_config().replace(
            "socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}",
            "socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0, gateway: svcgw0}",
        )
        return text + "policy: policy.yaml\n"

    def _wire_mesh_side(self) -> None:
        super()._wire_mesh_side()
        nsl.add_addr(self.mesh_ns, "eth0", f"{TAILNET_USER_IP}/10")
        nsl.add_route(self.mesh_ns, "10.0.0.0/8", ifname="eth0")

    def _wire_exit(self) -> None:
        super()._wire_exit()
        nsl.create_netns(self.gw_ns)
        nsl.disable_ipv6(self.gw_ns)
        nsl.add_veth("svcgw0", "eth0", self.host, self.gw_ns)
        nsl.tx_off(self.host, "svcgw0")
        nsl.tx_off(self.gw_ns, "eth0")
        nsl.set_mac(self.gw_ns, "eth0", "02:00:00:00:fe:01")
        nsl.add_addr(self.gw_ns, "eth0", f"{SERVICE_GW_IP}/8")
        nsl.add_route(self.gw_ns, "100.64.0.0/10", ifname="eth0")
        nsl.add_addr(self.gw_ns, "lo", f"{SERVICE_INTERNET_IP}/32")
        self.ovs.add_port("vmbr0", "svcgw0")


def tier_services(policy: Policy, first_vmid: int = 200) -> dict[int, tuple[str, str]]:
    """One service container per tier of a policy, for `make lab-up POLICY=...`: vmid ->
    (address, tier), the tenth address of the tier's first CIDR (the first for a small
    one)."""
    out: dict[int, tuple[str, str]] = {}
    for i, (name, tier) in enumerate(policy.tiers.items()):
        net = tier.nets[0]
        step = 10 if net.num_addresses > 16 else 1 if net.num_addresses > 2 else 0
        out[first_vmid + i] = (str(net.network_address + step), name)
    return out


__all__ = ["GATEWAY", "PolicyLab", "SERVICE_GW_IP", "SERVICE_INTERNET_IP", "TAILNET_USER_IP",
           "tier_services"]
