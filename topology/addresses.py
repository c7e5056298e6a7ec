"""Which addresses each container interface owns, and what may be learned. No I/O.

The authorities, strongest first:

1. host.yaml ``containers: <vmid>: {mac, ip}``: the guest's interface 0, field by field
   over what Proxmox says (an operator's override, and the only source on a host
   without Proxmox);
2. Proxmox's guest configs (`topology.pve`): every ``netN`` on the socket bridge;
3. with ``addresses: learn-first-packet`` only: what a container's first packet
   carries, for what 1 and 2 leave open, never an address the policy names (a tier,
   an external such as the tailnet, a rule's literal CIDR) and never one another
   interface owns.

An address two interfaces are declared with is theirs to neither: a MAC both declare
leaves both without rights, an IPv4 (or IPv6) address both declare leaves both without
it (`Conflict`). A guest whose address Proxmox does not know (``dhcp``, ``manual``, no
cloud-init ``ipconfigN``) may send with no IP source until one is bound.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from topology.config import HostConfig
from topology.policy import Policy
from topology.pve import Nic
from topology.roles import nic_key

NicKey = tuple[int, int]  # (vmid, interface index)


@dataclass(frozen=True)
class Binding:
    """The addresses a container port may send with (declared, or learned once)."""

    mac: str
    ip: str | None = None


@dataclass(frozen=True)
class Declared:
    """What the authorities say one guest interface owns."""

    mac: str | None = None
    ipv4: str | None = None  # the address (its prefix plays no part in what it may send)
    ipv6: str | None = None  # carried for IPv6 port security; flows use IPv4 only today
    source: str = "host.yaml"
    no_ip_because: str | None = None  # e.g. "ip=dhcp": Proxmox does not know the address
    refused: str | None = None  # a conflict took every right of this interface


@dataclass(frozen=True)
class Conflict:
    field: str  # mac | ipv4 | ipv6
    value: str
    sources: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.field} {self.value} declared by {' and '.join(self.sources)}"


@dataclass(frozen=True)
class Declarations:
    nics: Mapping[NicKey, Declared] = field(default_factory=dict)
    conflicts: tuple[Conflict, ...] = ()
    # every declared MAC / IPv4 and the interfaces declaring it, conflicting ones included:
    # learning can never take them for another interface
    macs: Mapping[str, frozenset[NicKey]] = field(default_factory=dict)
    ips: Mapping[str, frozenset[NicKey]] = field(default_factory=dict)

    def of_port(self, name: str) -> Declared | None:
        key = nic_key(name)
        return self.nics.get(key) if key is not None else None


def _why(mode: str, what: str) -> str | None:
    return None if mode == "static" else (f"{what}={mode}" if mode != "none" else
                                           f"no {what} in the guest config")


def _from_pve(nic: Nic) -> Declared:
    qemu_v4 = "ipconfig ip" if nic.kind == "qemu" else "ip"
    return Declared(mac=nic.mac,
                    ipv4=str(nic.ipv4.ip) if nic.ipv4 else None,
                    ipv6=str(nic.ipv6.ip) if nic.ipv6 else None,
                    source=f"pve {nic.source}",
                    no_ip_because=_why(nic.ipv4_mode, qemu_v4),
                    refused=None if nic.mac else "no valid MAC in the guest config")


def declarations(cfg: HostConfig, nics: Iterable[Nic] = ()) -> Declarations:
    """The declared addresses of every guest interface on the socket bridge whose vmid
    is one socknet serves (privacy_ids, service_ids)."""
    sock = cfg.bridges.socket
    serves = [sock.privacy_ids, sock.service_ids]
    out: dict[NicKey, Declared] = {}
    for nic in nics:
        if nic.bridge == sock.name and any(nic.vmid in r for r in serves):
            out[(nic.vmid, nic.index)] = _from_pve(nic)
    for vmid, c in cfg.containers.items():
        base = out.get((vmid, 0))
        ip = str(c.ip.ip) if c.ip else (base.ipv4 if base else None)
        mac = c.mac or (base.mac if base else None)
        source = f"host.yaml containers.{vmid}" + (f" over {base.source}" if base else "")
        out[(vmid, 0)] = Declared(
            mac=mac, ipv4=ip, ipv6=base.ipv6 if base else None, source=source,
            no_ip_because=None if ip else (base.no_ip_because if base else "no ip declared"),
            refused=None if mac or ip else (base.refused if base else None))
    return _without_conflicts(out)


def _claims(nics: Mapping[NicKey, Declared], attr: str) -> dict[str, frozenset[NicKey]]:
    found: dict[str, set[NicKey]] = {}
    for key, d in nics.items():
        value = getattr(d, attr)
        if value is not None:
            found.setdefault(value, set()).add(key)
    return {v: frozenset(k) for v, k in found.items()}


def _without_conflicts(nics: dict[NicKey, Declared]) -> Declarations:
    macs, ips = _claims(nics, "mac"), _claims(nics, "ipv4")
    conflicts = []
    for attr, claims in (("mac", macs), ("ipv4", ips), ("ipv6", _claims(nics, "ipv6"))):
        for value, keys in sorted(claims.items()):
            if len(keys) < 2:
                continue
            c = Conflict(attr, value, tuple(nics[k].source for k in sorted(keys)))
            conflicts.append(c)
            for k in keys:
                d = nics[k]
                if attr == "mac":
                    nics[k] = replace(d, mac=None, ipv4=None, ipv6=None,
                                      refused=c.describe())
                elif attr == "ipv4":
                    nics[k] = replace(d, ipv4=None, no_ip_because=c.describe())
                else:
                    nics[k] = replace(d, ipv6=None)
    return Declarations(nics, tuple(conflicts), macs, ips)


def binding_from(d: Declared | None, learned: Binding | None) -> Binding | None:
    """A port's binding: declared fields win, learning fills in only what they leave
    open and only if it agrees with them."""
    if d is None:
        return learned
    if d.refused:
        return None
    if d.mac is None:
        if learned is not None and (d.ipv4 is None or learned.ip == d.ipv4):
            return learned
        return None
    if d.ipv4 is not None:
        return Binding(d.mac, d.ipv4)
    if learned is not None and learned.mac == d.mac and learned.ip is not None:
        return Binding(d.mac, learned.ip)
    return Binding(d.mac)


def named_by_policy(policy: Policy | None, ip: str) -> str | None:
    """Which name of the policy gives ``ip`` rights of its own (a tier, an external, a
    literal CIDR in a rule), if any. "internet" and "any" give nothing specific."""
    if policy is None:
        return None
    addr = ipaddress.IPv4Address(ip)
    for kind, sets in (("tier", policy.tiers), ("external", policy.externals)):
        for name, s in sets.items():
            if addr in s:
                return f"{kind} {name!r}"
    for rule in policy.rules:
        for side in (rule.src, rule.dst):
            if addr in side and not ({"internet", "any"} & set(side.names)):
                return f"rule {rule.name!r} ({side})"
    return None


@dataclass(frozen=True)
class Refusal:
    kind: str  # duplicate | policy-named | not-declared | invalid | refused
    reason: str


def learn_refusal(decl: Declarations, port: str, b: Binding, learned: Mapping[str, Binding],
                  policy: Policy | None) -> Refusal | None:
    """Why ``port`` may not be bound to ``b`` learned from its first packet, or None."""
    d = decl.of_port(port)
    own = nic_key(port)
    if d is not None and d.refused:
        return Refusal("refused", d.refused)
    if not _unicast_mac(b.mac):
        return Refusal("invalid", f"{b.mac} is not a unicast MAC")
    if b.ip is None or not _unicast_ipv4(b.ip):
        return Refusal("invalid", f"{b.ip} is not a unicast IPv4 address")
    if d is not None and d.mac is not None and b.mac != d.mac:
        return Refusal("not-declared", f"MAC is not {d.mac} ({d.source})")
    if d is not None and d.ipv4 is not None and b.ip != d.ipv4:
        return Refusal("not-declared", f"IPv4 is not {d.ipv4} ({d.source})")
    others = [x for name, x in learned.items() if name != port]
    if decl.macs.get(b.mac, frozenset({own})) - {own} or any(x.mac == b.mac for x in others):
        return Refusal("duplicate", f"MAC {b.mac} belongs to another container")
    if decl.ips.get(b.ip, frozenset({own})) - {own} or any(x.ip == b.ip for x in others):
        return Refusal("duplicate", f"IPv4 {b.ip} belongs to another container")
    if d is None or d.ipv4 != b.ip:
        named = named_by_policy(policy, b.ip)
        if named is not None:
            return Refusal("policy-named", f"{b.ip} is in {named}: only a declaration "
                           "(Proxmox config or host.yaml) can give it to a container")
    return None


def _unicast_mac(mac: str) -> bool:
    return not int(mac[:2], 16) & 1 and mac != "00:00:00:00:00:00"


def _unicast_ipv4(ip: str) -> bool:
    try:
        a = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not (a.is_multicast or a.is_unspecified or a.is_loopback or a.is_reserved
                or a == ipaddress.IPv4Address("255.255.255.255"))
