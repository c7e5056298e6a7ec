"""Proxmox guest configs, parsed: which MAC and addresses each guest interface has. No I/O.

Proxmox keeps one file per guest in pmxcfs: ``/etc/pve/lxc/<vmid>.conf`` (containers)
and ``/etc/pve/qemu-server/<vmid>.conf`` (VMs). The lines before the first ``[section]``
are the guest as it runs; ``[snapshot]`` sections repeat the keys as they were at that
snapshot, ``[PENDING]`` holds changes not applied yet and ``[special:cloudinit]`` what
cloud-init last saw: none of them describe the running guest, all are skipped. ``#``
lines are the guest's description. Keys socknet does not use are ignored.

    net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:2C:69:EC,ip=10.30.0.10/24,ip6=auto,type=veth
    net0: virtio=BC:24:11:8A:3C:01,bridge=vmbr0,firewall=1,tag=20        (VM: model=MAC)
    ipconfig0: ip=10.20.0.10/24,gw=10.20.0.1,ip6=2001:db8:20::10/64       (VM: cloud-init)

An interface's host-side port is ``veth<vmid>i<N>`` (container) or ``tap<vmid>i<N>``
(VM); with the Proxmox firewall on, the port on an OVS bridge is ``fwln<vmid>o<N>``.
Addresses are only ever static ones: ``dhcp``, ``auto`` (SLAAC) and ``manual`` say the
guest picks its own, so Proxmox does not know it (`Nic.ipv4` is None, the mode says why).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from topology.config import MAC_RE

# Proxmox's VM NIC models: "virtio=MAC" is model virtio with that MAC
QEMU_MODELS = frozenset({
    "virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci", "ne2k_isa", "i82551",
    "i82557b", "i82559er", "pcnet", "e1000-82540em", "e1000-82544gc", "e1000-82545em",
})
_SECTION = re.compile(r"^\[([^\]]+)\]\s*$")
_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9_.\-]*)\s*[:=]\s*(.*?)\s*$")
_NET = re.compile(r"^net(\d+)$")
_IPCONFIG = re.compile(r"^ipconfig(\d+)$")
_FILE = re.compile(r"^(lxc|qemu-server)/(\d+)\.conf$")
MAX_NICS = 32  # Proxmox allows net0..net31


@dataclass(frozen=True)
class Nic:
    """One interface of one guest, as its config describes it."""

    vmid: int
    kind: str  # "lxc" or "qemu"
    index: int  # N of netN
    mac: str | None  # lower case; None: missing or malformed
    bridge: str | None
    ipv4: ipaddress.IPv4Interface | None
    ipv4_mode: str  # static | dhcp | manual | none (not configured)
    ipv6: ipaddress.IPv6Interface | None
    ipv6_mode: str  # static | dhcp | auto | manual | none
    tag: int | None = None
    firewall: bool = False
    source: str = ""  # "lxc/202.conf:7 net0"

    @property
    def ports(self) -> tuple[str, ...]:
        """Host-side port names this interface may have (the firewall one first)."""
        base = (f"veth{self.vmid}i{self.index}" if self.kind == "lxc"
                else f"tap{self.vmid}i{self.index}")
        return (f"fwln{self.vmid}o{self.index}", base) if self.firewall else (base,)


@dataclass(frozen=True)
class Guests:
    """Every interface found under a pve directory, and what could not be read."""

    nics: tuple[Nic, ...] = ()
    problems: tuple[str, ...] = ()


def _main_section(text: str) -> dict[str, tuple[int, str]]:
    """key -> (line, value) of the lines before the first [section]; comments skipped."""
    out: dict[str, tuple[int, str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _SECTION.match(line):
            break  # [snapshot], [PENDING], [special:cloudinit]: not the running guest
        m = _KEY.match(line)
        if m:
            out.setdefault(m.group(1), (number, m.group(2)))
    return out


def _props(value: str) -> dict[str, str]:
    """Proxmox's property string "a=1,b=2" (a bare item is kept under its own name)."""
    out: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if key:
            out.setdefault(key.strip(), val.strip() if sep else "")
    return out


def _mac(value: str | None) -> str | None:
    if value is None:
        return None
    low = value.lower()
    if not MAC_RE.match(low) or int(low[:2], 16) & 1:
        return None
    return low


def _v4(value: str | None, problems: list[str], where: str
        ) -> tuple[ipaddress.IPv4Interface | None, str]:
    if value is None or value == "":
        return None, "none"
    if value in ("dhcp", "manual"):
        return None, value
    try:
        return ipaddress.IPv4Interface(value), "static"
    except ValueError:
        problems.append(f"{where}: ip={value!r} is not an IPv4 address/prefix, dhcp or "
                        "manual: no IPv4 rights")
        return None, "none"


def _v6(value: str | None, problems: list[str], where: str
        ) -> tuple[ipaddress.IPv6Interface | None, str]:
    if value is None or value == "":
        return None, "none"
    if value in ("dhcp", "auto", "manual"):
        return None, value
    try:
        return ipaddress.IPv6Interface(value), "static"
    except ValueError:
        problems.append(f"{where}: ip6={value!r} is not an IPv6 address/prefix, dhcp, auto "
                        "or manual: no IPv6 rights")
        return None, "none"


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def parse_guest(text: str, kind: str, vmid: int, source: str
                ) -> tuple[list[Nic], list[str]]:
    """The interfaces of one guest config (``kind`` "lxc" or "qemu"), and its problems."""
    main = _main_section(text)
    nics: list[Nic] = []
    problems: list[str] = []
    for key, (line, value) in sorted(main.items()):
        m = _NET.match(key)
        if not m or int(m.group(1)) >= MAX_NICS:
            continue
        index = int(m.group(1))
        where = f"{source}:{line} {key}"
        p = _props(value)
        if kind == "lxc":
            raw_mac = p.get("hwaddr")
            ip4, ip6 = p.get("ip"), p.get("ip6")
        else:
            model = next((k for k in p if k in QEMU_MODELS), None)
            raw_mac = p.get(model) if model is not None and p.get(model) else p.get("macaddr")
            ipconf = _props(main[f"ipconfig{index}"][1]) if f"ipconfig{index}" in main else {}
            ip4, ip6 = ipconf.get("ip"), ipconf.get("ip6")
        mac = _mac(raw_mac)
        if mac is None:
            problems.append(f"{where}: no valid unicast MAC ({raw_mac!r}): no rights")
        v4, v4_mode = _v4(ip4, problems, where)
        v6, v6_mode = _v6(ip6, problems, where)
        nics.append(Nic(vmid, kind, index, mac, p.get("bridge") or None, v4, v4_mode, v6,
                        v6_mode, _int(p.get("tag")), p.get("firewall") == "1", where))
    return nics, problems


def parse_pve(files: Mapping[str, str]) -> Guests:
    """All guests of a pve directory, given as {"lxc/200.conf": text, "qemu-server/300.conf":
    text, ...} (paths relative to it; other names are ignored). A vmid with both a
    container and a VM config is refused whole (Proxmox never writes that)."""
    by_vmid: dict[int, list[tuple[str, str, str]]] = {}
    for path, text in files.items():
        m = _FILE.match(path)
        if m:
            kind = "lxc" if m.group(1) == "lxc" else "qemu"
            by_vmid.setdefault(int(m.group(2)), []).append((kind, path, text))
    nics: list[Nic] = []
    problems: list[str] = []
    for vmid, found in sorted(by_vmid.items()):
        if len(found) > 1:
            problems.append(f"vmid {vmid}: both {' and '.join(sorted(p for _, p, _ in found))}"
                            " exist: both ignored")
            continue
        kind, path, text = found[0]
        got, bad = parse_guest(text, kind, vmid, path)
        nics += got
        problems += bad
    return Guests(tuple(sorted(nics, key=lambda n: (n.vmid, n.index))), tuple(problems))
