"""Proxmox guest configs as the authority on container addresses (issue 11 part 1): the
parser (`topology.pve`) on fixture files in Proxmox's own format, the declarations made
from them (`topology.addresses`), what learning may and may not bind, and the poller
(`controller.pve_watch`). No switch here; packets: tests/test_policy_lab.py."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from controller.pve_watch import PveWatcher, read_pve_dir
from topology.addresses import (
    Binding,
    Declared,
    binding_from,
    declarations,
    learn_refusal,
    named_by_policy,
)
from topology.config import PveCfg, parse_host_config
from topology.policy import parse_policy
from topology.pve import Guests, Nic, parse_guest, parse_pve

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pve"
CFG = parse_host_config("bridges: {mesh: {}, socket: {}}\n")
POLICY = parse_policy("""\
tiers:
  edge: {cidrs: [10.10.0.0/24]}
  app:  {cidrs: [10.20.0.0/24], internal: true}
  db:   {cidrs: [10.30.0.0/24], internal: true}
externals:
  tailnet: {cidrs: [100.64.0.0/10]}
policy:
  default: deny
  rules:
    - {name: web-in,  from: internet, to: edge, tcp: [443]}
    - {name: backup,  from: 192.0.2.7/32, to: db, tcp: [5432]}
    - {name: admin,   from: tailnet, to: [edge, app], tcp: [22]}
""")


def guests() -> Guests:
    files = read_pve_dir(FIXTURES)
    assert files is not None
    return parse_pve(files)


def nic(vmid: int, index: int = 0) -> Nic:
    return next(n for n in guests().nics if (n.vmid, n.index) == (vmid, index))


# ------------------------------------------------------------------ the parser


def test_container_with_static_addresses():
    n = nic(200)
    assert (n.kind, n.mac, n.bridge) == ("lxc", "bc:24:11:0a:00:c8", "vmbr0")
    assert n.ipv4 == ipaddress.IPv4Interface("10.10.0.10/24") and n.ipv4_mode == "static"
    assert n.ipv6 == ipaddress.IPv6Interface("2001:db8:10::10/64") and n.ipv6_mode == "static"
    assert n.ports == ("veth200i0",) and not n.firewall
    assert n.source == "lxc/200.conf:8 net0"


def test_pending_changes_are_not_the_running_guest():
    """201's [PENDING] section changes net0's address: not applied yet, not used."""
    assert nic(201).ipv4 == ipaddress.IPv4Interface("10.20.0.10/24")


def test_several_interfaces_and_dhcp():
    n1 = nic(201, 1)
    assert (n1.mac, n1.ipv4, n1.ipv4_mode, n1.ipv6, n1.ipv6_mode) == (
        "bc:24:11:14:01:c9", None, "dhcp", None, "dhcp")
    assert n1.ports == ("veth201i1",)
    assert (nic(203).ipv4_mode, nic(203).ipv6_mode) == ("dhcp", "dhcp")
    assert (nic(150).ipv4, nic(150).ipv4_mode) == (None, "manual")


def test_snapshot_sections_are_ignored_and_firewall_names_the_ovs_port():
    n = nic(202)
    assert n.mac == "bc:24:11:1e:00:ca"  # the snapshot's MAC/IP (…:09:ca, 10.30.9.9) unused
    assert n.ipv4 == ipaddress.IPv4Interface("10.30.0.10/24")
    assert (n.ipv6, n.ipv6_mode) == (None, "auto")
    assert n.tag == 30 and n.firewall
    assert n.ports == ("fwln202o0", "veth202i0")


def test_vm_with_cloud_init_addresses():
    n0, n1 = nic(210, 0), nic(210, 1)
    assert (n0.kind, n0.mac, n0.firewall, n0.ports) == (
        "qemu", "bc:24:11:14:00:d2", True, ("fwln210o0", "tap210i0"))
    # ipconfig0, not the snapshot's (10.20.9.20) nor [special:cloudinit]'s (10.20.8.20)
    assert n0.ipv4 == ipaddress.IPv4Interface("10.20.0.20/24")
    assert n0.ipv6 == ipaddress.IPv6Interface("2001:db8:20::20/64")
    assert (n1.mac, n1.tag, n1.ports) == ("bc:24:11:14:01:d2", 20, ("tap210i1",))
    assert (n1.ipv4_mode, n1.ipv6_mode) == ("dhcp", "auto")


def test_vm_models_without_ipconfig_and_on_other_bridges():
    n = nic(211)
    assert (n.mac, n.ipv4, n.ipv4_mode, n.ipv6_mode) == ("bc:24:11:14:00:d3", None, "none",
                                                         "none")
    assert (nic(212).mac, nic(212).bridge) == ("bc:24:11:32:00:d4", "vmbr1")
    n213 = nic(213)  # model=virtio,macaddr=... ; the [PENDING] net1 does not exist yet
    assert (n213.mac, str(n213.ipv4)) == ("bc:24:11:1e:00:d5", "10.30.0.13/24")
    assert [x.index for x in guests().nics if x.vmid == 213] == [0]


def test_malformed_values_give_no_rights_and_a_problem():
    n0, n1 = nic(204, 0), nic(204, 1)
    assert n0.mac is None and n0.ipv4 == ipaddress.IPv4Interface("10.20.0.44/24")
    assert n1.mac == "bc:24:11:14:01:cc" and n1.ipv4 is None and n1.ipv6 is None
    problems = [p for p in guests().problems if p.startswith("lxc/204.conf")]
    assert len(problems) == 3, problems
    assert any("hwaddr" in p or "MAC" in p for p in problems)
    assert any("10.20.0.300" in p for p in problems)


def test_comments_unknown_keys_and_odd_lines():
    text = ("#net0: name=eth0,bridge=vmbr0,hwaddr=02:00:00:00:00:01,ip=10.20.0.1/24\n"
            "weird line without a colon\n"
            "net0: name=eth0,bridge=vmbr0,hwaddr=02:00:00:00:00:02,ip=10.20.0.2/24,type=veth\n"
            "net0: name=eth0,bridge=vmbr0,hwaddr=02:00:00:00:00:03,ip=10.20.0.3/24\n"
            "futurekey: something=new\n"
            "net99: name=eth9,bridge=vmbr0,hwaddr=02:00:00:00:00:09\n")
    nics, problems = parse_guest(text, "lxc", 250, "lxc/250.conf")
    assert [(n.mac, str(n.ipv4)) for n in nics] == [("02:00:00:00:00:02", "10.20.0.2/24")]
    assert problems == []


def test_a_vmid_with_both_kinds_of_config_is_refused():
    text = "net0: name=eth0,bridge=vmbr0,hwaddr=02:00:00:00:00:02,ip=10.20.0.2/24\n"
    g = parse_pve({"lxc/250.conf": text, "qemu-server/250.conf": "net0: virtio=02:00:00:00:00:03"
                   ",bridge=vmbr0\n", "lxc/notes.txt": "x", "lxc/251.conf.tmp.1234": "x"})
    assert g.nics == ()
    assert g.problems == ("vmid 250: both lxc/250.conf and qemu-server/250.conf exist: "
                          "both ignored",)


# ------------------------------------------------------------------ declarations


def test_declarations_cover_the_socket_bridge_and_socknets_vmids_only():
    d = declarations(CFG, guests().nics)
    assert set(d.nics) == {(150, 0), (200, 0), (201, 0), (201, 1), (202, 0), (203, 0),
                           (204, 0), (204, 1), (210, 0), (210, 1), (211, 0), (213, 0)}
    assert d.of_port("veth200i0") == Declared("bc:24:11:0a:00:c8", "10.10.0.10",
                                              "2001:db8:10::10", "pve lxc/200.conf:8 net0")
    assert d.of_port("fwln202o0") == d.of_port("veth202i0")
    assert d.of_port("tap210i1").no_ip_because == "ipconfig ip=dhcp"
    assert d.of_port("tap211i0").no_ip_because == "no ipconfig ip in the guest config"
    assert d.of_port("veth204i0").refused  # no valid MAC: no rights at all
    assert d.of_port("veth300i0") is None and d.of_port("tap212i0") is None
    assert d.conflicts == ()


def test_host_yaml_overrides_proxmox_field_by_field():
    cfg = parse_host_config("bridges: {mesh: {}, socket: {}}\ncontainers:\n"
                            "  203: {ip: 10.20.0.33/24}\n"
                            "  200: {mac: '02:00:00:00:02:00'}\n"
                            "  205: {mac: '02:00:00:00:02:05', ip: 10.20.0.35/24}\n")
    d = declarations(cfg, guests().nics)
    assert (d.of_port("veth203i0").mac, d.of_port("veth203i0").ipv4) == (
        "bc:24:11:14:00:cb", "10.20.0.33")  # a dhcp guest given its address by the operator
    assert d.of_port("veth203i0").source == "host.yaml containers.203 over pve lxc/203.conf:4 net0"
    assert (d.of_port("veth200i0").mac, d.of_port("veth200i0").ipv4) == (
        "02:00:00:00:02:00", "10.10.0.10")
    assert d.of_port("veth205").ipv4 == "10.20.0.35"  # no Proxmox (a lab): host.yaml alone


def _lxc(mac: str, ip: str) -> str:
    return f"net0: name=eth0,bridge=vmbr0,hwaddr={mac},ip={ip},type=veth\n"


def test_a_mac_declared_twice_gives_neither_interface_any_right():
    g = parse_pve({"lxc/220.conf": _lxc("02:00:00:00:aa:01", "10.20.0.1/24"),
                   "lxc/221.conf": _lxc("02:00:00:00:aa:01", "10.20.0.2/24"),
                   "lxc/222.conf": _lxc("02:00:00:00:aa:02", "10.20.0.3/24")})
    d = declarations(CFG, g.nics)
    (c,) = d.conflicts
    assert (c.field, c.value) == ("mac", "02:00:00:00:aa:01")
    assert c.sources == ("pve lxc/220.conf:1 net0", "pve lxc/221.conf:1 net0")
    for port in ("veth220i0", "veth221i0"):
        assert d.of_port(port).refused and binding_from(d.of_port(port), None) is None
    assert binding_from(d.of_port("veth222i0"), None) == Binding("02:00:00:00:aa:02", "10.20.0.3")


def test_an_ip_declared_twice_leaves_both_without_it():
    cfg = parse_host_config("bridges: {mesh: {}, socket: {}}\ncontainers:\n"
                            "  223: {mac: '02:00:00:00:aa:03', ip: 10.20.0.9/24}\n")
    g = parse_pve({"lxc/224.conf": _lxc("02:00:00:00:aa:04", "10.20.0.9/24")})
    d = declarations(cfg, g.nics)
    assert [(c.field, c.value) for c in d.conflicts] == [("ipv4", "10.20.0.9")]
    assert binding_from(d.of_port("veth223"), None) == Binding("02:00:00:00:aa:03")
    assert binding_from(d.of_port("veth224i0"), None) == Binding("02:00:00:00:aa:04")
    # and neither, nor anyone else, can learn it
    for port in ("veth223", "veth224i0", "veth225i0"):
        mac = {"veth223": "02:00:00:00:aa:03", "veth224i0": "02:00:00:00:aa:04"}.get(
            port, "02:00:00:00:aa:05")
        r = learn_refusal(d, port, Binding(mac, "10.20.0.9"), {}, None)
        assert r is not None and r.kind == "duplicate", port


# ------------------------------------------------------------------ what learning may bind


def test_binding_from_declared_fields_and_what_was_learned():
    mac, other = "02:00:00:00:bb:01", "02:00:00:00:bb:02"
    assert binding_from(None, Binding(mac, "192.0.2.1")) == Binding(mac, "192.0.2.1")
    mac_only = Declared(mac=mac)
    assert binding_from(mac_only, None) == Binding(mac)  # no IP source until one is bound
    assert binding_from(mac_only, Binding(mac, "198.51.100.1")) == Binding(mac, "198.51.100.1")
    assert binding_from(mac_only, Binding(other, "198.51.100.1")) == Binding(mac)
    ip_only = Declared(ipv4="10.20.0.5")
    assert binding_from(ip_only, Binding(other, "10.20.0.5")) == Binding(other, "10.20.0.5")
    assert binding_from(ip_only, Binding(other, "10.20.0.6")) is None
    assert binding_from(Declared(mac=mac, ipv4="10.20.0.5"), Binding(mac, "192.0.2.9")) == (
        Binding(mac, "10.20.0.5"))


@pytest.mark.parametrize("ip,named", [
    ("10.20.0.77", "tier 'app'"),
    ("100.64.0.77", "external 'tailnet'"),
    ("192.0.2.7", "rule 'backup' (192.0.2.7/32)"),
    ("198.51.100.7", None),  # "internet": nothing of its own
])
def test_named_by_policy(ip: str, named: str | None):
    assert named_by_policy(POLICY, ip) == named


def test_learning_never_binds_what_the_policy_names():
    d = declarations(CFG)
    mac = "02:00:00:00:cc:01"
    for ip in ("10.20.0.77", "100.64.0.77", "192.0.2.7"):
        r = learn_refusal(d, "veth230i0", Binding(mac, ip), {}, POLICY)
        assert r is not None and r.kind == "policy-named", ip
    assert learn_refusal(d, "veth230i0", Binding(mac, "198.51.100.7"), {}, POLICY) is None
    assert learn_refusal(d, "veth230i0", Binding(mac, "10.20.0.77"), {}, None) is None


def test_learning_binds_a_policy_named_address_its_declaration_gives():
    cfg = parse_host_config("bridges: {mesh: {}, socket: {}}\ncontainers:\n"
                            "  231: {ip: 10.20.0.31/24}\n"
                            "  232: {mac: '02:00:00:00:cc:32'}\n")
    d = declarations(cfg)
    assert learn_refusal(d, "veth231i0", Binding("02:00:00:00:cc:31", "10.20.0.31"), {},
                         POLICY) is None
    r = learn_refusal(d, "veth231i0", Binding("02:00:00:00:cc:31", "10.20.0.32"), {}, POLICY)
    assert r is not None and r.kind == "not-declared"
    # MAC-only: the MAC must be the declared one, the address is checked like any other
    r = learn_refusal(d, "veth232i0", Binding("02:00:00:00:cc:99", "198.51.100.2"), {}, POLICY)
    assert r is not None and r.kind == "not-declared"
    r = learn_refusal(d, "veth232i0", Binding("02:00:00:00:cc:32", "10.20.0.32"), {}, POLICY)
    assert r is not None and r.kind == "policy-named"
    assert learn_refusal(d, "veth232i0", Binding("02:00:00:00:cc:32", "198.51.100.2"), {},
                         POLICY) is None


@pytest.mark.parametrize("mac,ip", [
    ("ff:ff:ff:ff:ff:ff", "198.51.100.1"), ("01:00:5e:00:00:01", "198.51.100.1"),
    ("00:00:00:00:00:00", "198.51.100.1"), ("02:00:00:00:cc:01", "224.0.0.1"),
    ("02:00:00:00:cc:01", "255.255.255.255"), ("02:00:00:00:cc:01", "127.0.0.1"),
    ("02:00:00:00:cc:01", None),
])
def test_learning_refuses_what_is_no_unicast_sender(mac: str, ip: str | None):
    r = learn_refusal(declarations(CFG), "veth230i0", Binding(mac, ip), {}, None)
    assert r is not None and r.kind == "invalid"


def test_learning_refuses_what_another_container_has():
    d = declarations(CFG, guests().nics)
    learned = {"veth240i0": Binding("02:00:00:00:dd:40", "198.51.100.40")}
    for b in (Binding("bc:24:11:0a:00:c8", "198.51.100.9"),  # 200's declared MAC
              Binding("02:00:00:00:dd:41", "10.10.0.10"),  # 200's declared IPv4
              Binding("02:00:00:00:dd:40", "198.51.100.9"),  # 240's learned MAC
              Binding("02:00:00:00:dd:41", "198.51.100.40")):  # 240's learned IPv4
        r = learn_refusal(d, "veth241i0", b, learned, None)
        assert r is not None and r.kind == "duplicate", b
    assert learn_refusal(d, "veth241i0", Binding("02:00:00:00:dd:41", "198.51.100.9"),
                         learned, None) is None


def test_a_refused_declaration_refuses_learning_too():
    d = declarations(CFG, guests().nics)
    r = learn_refusal(d, "veth204i0", Binding("02:00:00:00:dd:04", "198.51.100.4"), {}, None)
    assert r is not None and r.kind == "refused"


# ------------------------------------------------------------------ the poller


def _copy_fixtures(dst: Path) -> None:
    for src in FIXTURES.rglob("*.conf"):
        target = dst / src.relative_to(FIXTURES)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(src.read_text())


def test_watcher_reads_changes_once_and_keeps_guests_when_pmxcfs_is_gone(tmp_path: Path):
    _copy_fixtures(tmp_path)
    seen: list[tuple[Guests, str]] = []
    w = PveWatcher(PveCfg(dir=str(tmp_path), poll_s=1.0), lambda g, why: seen.append((g, why)))
    assert w.poll() and len(seen[-1][0].nics) == len(guests().nics)
    assert not w.poll()  # nothing changed: nothing parsed, nothing handed on
    conf = tmp_path / "lxc" / "203.conf"
    conf.write_text(conf.read_text().replace("ip=dhcp,", "ip=10.20.0.33/24,"))
    assert w.poll("poll")
    assert str(next(n for n in seen[-1][0].nics if n.vmid == 203).ipv4) == "10.20.0.33/24"
    assert w.poll("SIGHUP", force=True) and seen[-1][1] == "SIGHUP"
    # pmxcfs unmounted (an upgrade restarts it): the mountpoint is empty, guests stay
    hidden = tmp_path.parent / f"{tmp_path.name}-hidden"
    os.rename(tmp_path, hidden)
    tmp_path.mkdir()
    count = len(seen)
    assert not w.poll() and len(seen) == count and w.guests.nics
    os.rmdir(tmp_path)
    os.rename(hidden, tmp_path)
    # guests deleted (the directories are there, empty): they are gone
    for f in tmp_path.rglob("*.conf"):
        f.unlink()
    assert w.poll() and seen[-1][0].nics == ()


def test_read_pve_dir_without_proxmox(tmp_path: Path):
    assert read_pve_dir(tmp_path / "absent") is None
    assert read_pve_dir(tmp_path) is None
    (tmp_path / "lxc").mkdir()
    assert read_pve_dir(tmp_path) == {}


# ------------------------------------------------------------------ host.yaml and the CLI


def test_host_yaml_settings_and_their_defaults():
    cfg = parse_host_config("bridges: {mesh: {}, socket: {}}\n")
    assert cfg.addresses == "declared" and not cfg.learning  # safe: declared only
    assert cfg.pve is not None and (cfg.pve.dir, cfg.pve.poll_s) == ("/etc/pve", 2.0)
    cfg = parse_host_config("bridges: {mesh: {}, socket: {}}\naddresses: learn-first-packet\n"
                            "pve: null\n")
    assert cfg.learning and cfg.pve is None


@pytest.mark.parametrize("line,problem", [
    ("addresses: learn", "addresses: Input should be 'declared' or 'learn-first-packet'"),
    ("pve: {dir: etc/pve}", "pve.dir: 'etc/pve' is not an absolute path"),
    ("pve: {poll_s: 0}", "pve.poll_s: Input should be greater than or equal to 0.2"),
    ("pve: {dri: /etc/pve}", "pve.dri: unknown key"),
])
def test_host_yaml_settings_errors_name_the_line(line: str, problem: str):
    from topology.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_host_config(f"bridges: {{mesh: {{}}, socket: {{}}}}\n{line}\n", "host.yaml")
    assert info.value.problems == [f"host.yaml:2: {problem}"]


def test_socknet_flows_reads_the_guest_configs(tmp_path: Path):
    import subprocess
    import sys

    _copy_fixtures(tmp_path / "pve")
    conflict = "net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:0A:00:C8,ip=10.10.0.99/24\n"
    (tmp_path / "pve" / "lxc" / "299.conf").write_text(conflict)  # 200's MAC
    host = tmp_path / "host.yaml"
    host.write_text(f"bridges: {{mesh: {{}}, socket: {{}}}}\npve: {{dir: '{tmp_path / 'pve'}'}}\n")
    res = subprocess.run([sys.executable, "-m", "controller.cli", "flows", "-c", str(host),
                          "--bridge", "vmbr0", "--port", "veth201i0=5", "--port",
                          "fwln202o0=6", "--port", "veth200i0=7"],
                         capture_output=True, text=True, check=True)
    assert "dl_src=bc:24:11:14:00:c9,dl_type=0x0800,in_port=5,nw_src=10.20.0.10" in res.stdout
    assert "dl_src=bc:24:11:1e:00:ca,dl_type=0x0800,in_port=6,nw_src=10.30.0.10" in res.stdout
    assert "in_port=7,nw_src" not in res.stdout  # its MAC is declared twice: no rights
    assert "priority=10,in_port=7 actions=controller(max_len=128,meter_id=4)" in res.stdout
    assert ("socknet: warning: conflict: mac bc:24:11:0a:00:c8 declared by pve "
            "lxc/200.conf:8 net0 and pve lxc/299.conf:1 net0: refused to both") in res.stderr
    assert "lxc/204.conf:3 net0: no valid unicast MAC" in res.stderr
