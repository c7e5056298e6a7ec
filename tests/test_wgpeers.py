"""controller.wgpeers and topology.wgformat: parsers on captured text, the I/O fallbacks,
and a real wireguard-go."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller import wgpeers as wp
from controller.wgpeers import WgError, WgPeer
from topology import wgformat as wf

# Captured from wireguard-go v0.0.20220316 (UAPI get=1 on host 1's `netmaker` of a 3-host
# MeshLab) and from `wg show ... dump` of wireguard-tools v1.0.20210914 on the same lab.
UAPI_NETMAKER = (
    "private_key=d0ea1c0633c2a8c6332591d8a06129e8f964fd4c97b75bcfaeb9df3c1e948976\n"
    "listen_port=51821\n"
    "public_key=d1761bbc1992d6e0254eeb999de4ae20ae287cc809b8db4bb739b8ff5b4b493a\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.2:51821\n"
    "last_handshake_time_sec=1795504575\n"
    "last_handshake_time_nsec=707968855\n"
    "tx_bytes=276\n"
    "rx_bytes=220\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=100.100.0.2/32\n"
    "public_key=8b9c4ae8091700e8929ca4353fe8916c994b4b4349246f330686ccd30b43411f\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.3:51821\n"
    "last_handshake_time_sec=1795504575\n"
    "last_handshake_time_nsec=715673707\n"
    "tx_bytes=276\n"
    "rx_bytes=220\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=100.100.0.3/32\n"
    "errno=0\n"
    "\n"
)
UAPI_EXIT = (
    "private_key=b03b014036fc6b5621a099d7e3ce3fae9d553f59e0e4c446501b030ab5f8da72\n"
    "listen_port=51820\n"
    "public_key=320ceae6c71af2ad505a40a55384affe55251e3752d72940681607a13c188377\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=172.31.1.2:36525\n"
    "last_handshake_time_sec=1795504575\n"
    "last_handshake_time_nsec=723764064\n"
    "tx_bytes=220\n"
    "rx_bytes=276\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=172.16.0.1/32\n"
    "allowed_ip=10.0.0.100/32\n"
    "public_key=abe0e291806c4eada6332c9f6a8fc8bc96eb80a33ad61daa2309eff7cee2e658\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n"
    "\n"
)
DUMP_NETMAKER = (
    "0OocBjPCqMYzJZHYoGEp6Plk/UyXt1vPrrnfPB6UiXY=\t88b1BHRDUEWnOJywYyPCSJ0Aj0uwQe8/JHnuxV3nNw8=\t"
    "51821\toff\n"
    "0XYbvBmS1uAlTuuZneSuIK4ofMgJuNtLtzm4/1tLSTo=\t(none)\t192.0.2.2:51821\t100.100.0.2/32\t"
    "1795504575\t220\t276\toff\n"
    "i5xK6AkXAOiSnKQ1P+iRbJlLS0NJJG8zBobM0wtDQR8=\t(none)\t192.0.2.3:51821\t100.100.0.3/32\t"
    "1795504575\t220\t276\toff\n"
)
DUMP_ALL = (
    "wgwarp\tYHM7fPpTKtqgpmfDC4lyg5PUQPyKKycz/m7n/alvgkQ=\tMgzq5sca8q1QWkClU4Sv/lUlHjdS1ylAaBYHoTwYg3c=\t"
    "36525\toff\n"
    "wgwarp\t3E33gWdvphjJio9DMPL7lvrbiKjkPxluIuBCj4ZWylk=\t(none)\t192.0.2.254:51820\t0.0.0.0/0\t"
    "1795504575\t220\t276\toff\n"
    "netmaker\t0OocBjPCqMYzJZHYoGEp6Plk/UyXt1vPrrnfPB6UiXY=\t88b1BHRDUEWnOJywYyPCSJ0Aj0uwQe8/JHnuxV3nNw8=\t"
    "51821\toff\n"
    "netmaker\t0XYbvBmS1uAlTuuZneSuIK4ofMgJuNtLtzm4/1tLSTo=\t(none)\t192.0.2.2:51821\t"
    "100.100.0.2/32\t1795504575\t220\t276\toff\n"
    "netmaker\ti5xK6AkXAOiSnKQ1P+iRbJlLS0NJJG8zBobM0wtDQR8=\t(none)\t(none)\t(none)\t0\t0\t0\t25\n"
)
HOST1_PUBLIC = "88b1BHRDUEWnOJywYyPCSJ0Aj0uwQe8/JHnuxV3nNw8="
KEY_A = "0XYbvBmS1uAlTuuZneSuIK4ofMgJuNtLtzm4/1tLSTo="
KEY_B = "i5xK6AkXAOiSnKQ1P+iRbJlLS0NJJG8zBobM0wtDQR8="
KEY_C = "3E33gWdvphjJio9DMPL7lvrbiKjkPxluIuBCj4ZWylk="
WG_QUICK_CONF = f"""\
[Interface]
PrivateKey = YHM7fPpTKtqgpmfDC4lyg5PUQPyKKycz/m7n/alvgkQ=
Address = 100.100.0.1/24
ListenPort = 51821

# host 2: a single AllowedIPs value (wgconfig gives a str)
[Peer]
PublicKey = {KEY_A}
Endpoint = 192.0.2.2:51821
AllowedIPs = 100.100.0.2/32

[Peer]
PublicKey = {KEY_B}
AllowedIPs = 100.100.0.3/32, 10.0.3.0/24
AllowedIPs = fd00::3/128
PersistentKeepalive = 25

#! [Peer]
#! PublicKey = {KEY_C}
#! AllowedIPs = 100.100.0.9/32
"""


def _b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


# --------------------------------------------------------------------------- UAPI


def test_parse_uapi_two_peers():
    peers = wf.parse_uapi(UAPI_NETMAKER)
    assert peers == [
        WgPeer(_b64("d1761bbc1992d6e0254eeb999de4ae20ae287cc809b8db4bb739b8ff5b4b493a"),
               "192.0.2.2:51821", ("100.100.0.2/32",), 1795504575, 220, 276),
        WgPeer(_b64("8b9c4ae8091700e8929ca4353fe8916c994b4b4349246f330686ccd30b43411f"),
               "192.0.2.3:51821", ("100.100.0.3/32",), 1795504575, 220, 276),
    ]


def test_parse_uapi_several_allowed_ips_no_endpoint_never_handshaken():
    a, b = wf.parse_uapi(UAPI_EXIT)
    assert a.allowed_ips == ("172.16.0.1/32", "10.0.0.100/32")
    assert a.endpoint == "172.31.1.2:36525"
    assert b.endpoint is None and b.allowed_ips == () and b.last_handshake is None
    assert (b.rx_bytes, b.tx_bytes) == (0, 0)


def test_parse_uapi_device_without_peers_and_ipv6_endpoint():
    assert wf.parse_uapi("private_key=" + "11" * 32 + "\nlisten_port=1\nerrno=0\n\n") == []
    text = f"public_key={'ab' * 32}\nendpoint=[2001:db8::1]:51820\nallowed_ip=::/0\nerrno=0\n"
    (p,) = wf.parse_uapi(text)
    assert p.endpoint == "[2001:db8::1]:51820" and p.allowed_ips == ("::/0",)


@pytest.mark.parametrize("text, why", [
    ("public_key=" + "ab" * 32 + "\nerrno=19\n\n", "errno=19"),
    ("public_key=" + "ab" * 32 + "\nallowed_ip=10.0.0.0/8\n", "truncated"),
    ("public_key=abcd\nerrno=0\n", "32"),
    ("public_key=" + "zz" * 32 + "\nerrno=0\n", "hex"),
    ("garbage\nerrno=0\n", "bad UAPI line"),
])
def test_parse_uapi_errors(text: str, why: str):
    with pytest.raises(WgError, match=why):
        wf.parse_uapi(text)


# --------------------------------------------------------------------------- wg show dump


def test_parse_wg_dump_one_interface():
    peers = wf.parse_wg_dump(DUMP_NETMAKER)
    assert [p.public_key for p in peers] == [KEY_A, KEY_B]
    assert peers[0] == WgPeer(KEY_A, "192.0.2.2:51821", ("100.100.0.2/32",), 1795504575, 220, 276)


def test_parse_wg_dump_all_filters_interface_and_none_fields():
    peers = wf.parse_wg_dump(DUMP_ALL, interface="netmaker")
    assert [p.public_key for p in peers] == [KEY_A, KEY_B]
    assert peers[1] == WgPeer(KEY_B, None, (), None, 0, 0)
    (warp,) = wf.parse_wg_dump(DUMP_ALL, interface="wgwarp")
    assert warp.public_key == KEY_C and warp.allowed_ips == ("0.0.0.0/0",)
    assert len(wf.parse_wg_dump(DUMP_ALL)) == 3


def test_parse_wg_dump_several_allowed_ips_and_errors():
    line = f"{KEY_A}\t(none)\t192.0.2.2:1\t10.0.0.0/24,fd00::/64\t5\t1\t2\toff\n"
    assert wf.parse_wg_dump(line)[0].allowed_ips == ("10.0.0.0/24", "fd00::/64")
    with pytest.raises(WgError, match="fields"):
        wf.parse_wg_dump("a\tb\tc\n")
    with pytest.raises(WgError, match="base64"):
        wf.parse_wg_dump("not-a-key\t(none)\t(none)\t(none)\t0\t0\t0\toff\n")


# --------------------------------------------------------------------------- wg-quick files


def test_parse_wg_conf_str_list_and_disabled_peers():
    peers = wf.parse_wg_conf(WG_QUICK_CONF)
    assert peers == [
        WgPeer(KEY_A, "192.0.2.2:51821", ("100.100.0.2/32",)),
        WgPeer(KEY_B, None, ("100.100.0.3/32", "10.0.3.0/24", "fd00::3/128")),
    ]


def test_parse_wg_conf_errors():
    with pytest.raises(WgError, match="PublicKey"):
        wf.parse_wg_conf("[Interface]\nListenPort = 1\n[Peer]\nAllowedIPs = 10.0.0.0/8\n")
    with pytest.raises(WgError, match="Unsupported section"):
        wf.parse_wg_conf("[Interface]\n[Bogus]\n")


def test_peers_from_conf_file(tmp_path: Path):
    conf = tmp_path / "nm.conf"
    conf.write_text(WG_QUICK_CONF)
    assert [p.public_key for p in wp.peers_from_conf(conf)] == [KEY_A, KEY_B]
    with pytest.raises(WgError, match="No such file"):
        wp.peers_from_conf(tmp_path / "missing.conf")


# --------------------------------------------------------------------------- netlink


def _nl_message(peers: list[list[tuple[str, object]]]):
    """A WireGuard genetlink message encoded and decoded by pyroute2, as the kernel sends it."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["attrs"] = [["WGDEVICE_A_IFNAME", "nm-privacy"],
                    ["WGDEVICE_A_PEERS", [{"attrs": [list(a) for a in p]} for p in peers]]]
    msg.encode()
    out = wgmsg(msg.data)
    out.decode()
    return out


def _allowed(family: int, raw: bytes, mask: int) -> dict[str, object]:
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family], ["WGALLOWEDIP_A_IPADDR", raw],
                      ["WGALLOWEDIP_A_CIDR_MASK", mask]]}


def test_parse_netlink_peers_and_split_messages():
    first = _nl_message([
        [("WGPEER_A_PUBLIC_KEY", KEY_A),
         ("WGPEER_A_ENDPOINT", {"addr": "192.0.2.2", "port": 51821}),
         ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 7}),
         ("WGPEER_A_RX_BYTES", 100), ("WGPEER_A_TX_BYTES", 200),
         ("WGPEER_A_ALLOWEDIPS", [_allowed(2, bytes([100, 100, 0, 2]), 32)])],
        [("WGPEER_A_PUBLIC_KEY", KEY_B),
         ("WGPEER_A_ENDPOINT", {"addr": "2001:db8::1", "port": 51820}),
         ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}),
         ("WGPEER_A_ALLOWEDIPS", [_allowed(2, bytes([10, 0, 3, 0]), 24)])],
    ])
    # the kernel continues a peer whose allowed IPs did not fit in the next message
    second = _nl_message([
        [("WGPEER_A_PUBLIC_KEY", KEY_B),
         ("WGPEER_A_ALLOWEDIPS", [_allowed(10, bytes.fromhex("fd00" + "00" * 13 + "03"), 128)])],
    ])
    peers = wf.parse_netlink([first, second])
    assert peers == [
        WgPeer(KEY_A, "192.0.2.2:51821", ("100.100.0.2/32",), 1700000000, 100, 200),
        WgPeer(KEY_B, "[2001:db8::1]:51820", ("10.0.3.0/24", "fd00::3/128"), None, 0, 0),
    ]


def test_netlink_unavailable_without_kernel_wireguard():
    if wp.kernel_wireguard():
        pytest.skip("the WireGuard kernel module is loaded here")
    with pytest.raises(WgError):
        wp.peers_from_netlink("netmaker")


# --------------------------------------------------------------------------- keys and helpers


def test_key_conversions():
    hexkey = "d1761bbc1992d6e0254eeb999de4ae20ae287cc809b8db4bb739b8ff5b4b493a"
    assert wf.b64_to_hex(wf.hex_to_b64(hexkey)) == hexkey
    with pytest.raises(WgError):
        wf.b64_to_hex("AAAA")
    with pytest.raises(WgError):
        wf.b64_to_hex("!!not base64!!")


def test_staleness_and_host_addresses():
    p = WgPeer(KEY_A, None, ("100.100.0.2/32", "10.0.3.0/24", "fd00::3/128"), 1000)
    assert p.handshake_age(now=1100) == 100
    assert not p.is_stale(now=1100) and p.is_stale(now=1000 + wp.STALE_AFTER_S + 1)
    assert WgPeer(KEY_A).is_stale(now=0) and WgPeer(KEY_A).handshake_age() is None
    assert p.host_addresses == ("100.100.0.2", "fd00::3")


def test_x25519_rfc7748_vector():
    private = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
    public = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert base64.b64decode(wf.public_from_private(private)).hex() == public


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey():
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                          check=True).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                         check=True).stdout.strip()
    raw = base64.b64decode(priv)
    assert wf.public_from_private(raw.hex()) == pub


def test_private_key_from_uapi_device_section_only():
    text = ("private_key=aa\nlisten_port=51821\npublic_key=bb\nprivate_key=cc\n"
            "errno=0\n")
    assert wf.uapi_private_key(text) == "aa"
    assert wf.uapi_private_key("listen_port=1\npublic_key=bb\n") is None


def test_own_public_key_in_the_captured_texts():
    # the UAPI's private key and the dump's key pair are the same device's
    assert wf.public_from_private(wf.uapi_private_key(UAPI_NETMAKER) or "") == HOST1_PUBLIC
    assert wf.wg_dump_public_key(DUMP_NETMAKER) == HOST1_PUBLIC
    assert wf.wg_dump_public_key(DUMP_NETMAKER.split("\n", 1)[1]) is None  # no device line


# --------------------------------------------------------------------------- I/O fallbacks


@pytest.fixture
def fake_uapi(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``serve(ifname, reply) -> sock_dir``: a UAPI socket that answers get=1 like wireguard-go
    (and, like it, keeps the connection open after the reply)."""
    servers: list[socket.socket] = []
    sock_dir = tmp_path / "wg"
    sock_dir.mkdir()

    def serve(ifname: str, reply: str) -> Path:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(sock_dir / f"{ifname}.sock"))
        srv.listen()
        servers.append(srv)

        def loop() -> None:
            conns = []
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    break
                conns.append(conn)
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = conn.recv(100)
                    if not chunk:
                        break
                    buf += chunk
                if buf == b"get=1\n\n":
                    conn.sendall(reply.encode())
            for c in conns:
                c.close()

        threading.Thread(target=loop, daemon=True).start()
        return sock_dir

    try:
        yield serve
    finally:
        for srv in servers:
            srv.close()


def test_read_peers_from_uapi_socket(fake_uapi, monkeypatch: pytest.MonkeyPatch):
    sock_dir = fake_uapi("netmaker", UAPI_NETMAKER)
    monkeypatch.setattr(wp, "kernel_wireguard", lambda: False)
    reading = wp.read_peers("netmaker", sock_dir=sock_dir, wg_cmd=None)
    assert reading.source == "uapi" and len(reading.peers) == 2


def test_read_peers_netlink_first_then_uapi(fake_uapi, monkeypatch: pytest.MonkeyPatch):
    sock_dir = fake_uapi("netmaker", UAPI_NETMAKER)
    monkeypatch.setattr(wp, "kernel_wireguard", lambda: True)
    monkeypatch.setattr(wp, "peers_from_netlink", lambda ifname: [WgPeer(KEY_A)])
    assert wp.read_peers("netmaker", sock_dir=sock_dir).source == "netlink"

    def no_kernel_device(ifname: str) -> list[WgPeer]:
        raise WgError("netlink: netmaker: (95, 'Operation not supported')")

    monkeypatch.setattr(wp, "peers_from_netlink", no_kernel_device)
    assert wp.read_peers("netmaker", sock_dir=sock_dir).source == "uapi"


def test_read_peers_falls_back_to_wg_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(wp, "kernel_wireguard", lambda: False)
    dump = tmp_path / "dump.txt"
    dump.write_text(DUMP_NETMAKER)
    # a stand-in `wg`: prints the captured dump; the real argv goes after the prefix
    fake_wg = [sys.executable, "-c",
               f"import sys; assert sys.argv[1:] == ['show', 'netmaker', 'dump']; "
               f"sys.stdout.write(open({str(dump)!r}).read())"]
    reading = wp.read_peers("netmaker", sock_dir=tmp_path, wg_cmd=fake_wg)
    assert reading.source == "wg-show"
    assert [p.public_key for p in reading.peers] == [KEY_A, KEY_B]


def test_read_peers_with_the_devices_own_key(fake_uapi, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(wp, "kernel_wireguard", lambda: False)
    sock_dir = fake_uapi("netmaker", UAPI_NETMAKER)
    assert wp.read_peers("netmaker", sock_dir=sock_dir, wg_cmd=None).public_key is None
    reading = wp.read_peers("netmaker", sock_dir=sock_dir, wg_cmd=None, with_key=True)
    assert (reading.source, reading.public_key) == ("uapi", HOST1_PUBLIC)
    dump = tmp_path / "dump.txt"
    dump.write_text(DUMP_NETMAKER)
    fake_wg = [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(dump)!r}).read())"]
    reading = wp.read_peers("netmaker", sock_dir=tmp_path, wg_cmd=fake_wg, with_key=True)
    assert (reading.source, reading.public_key) == ("wg-show", HOST1_PUBLIC)
    monkeypatch.setattr(wp, "kernel_wireguard", lambda: True)
    monkeypatch.setattr(wp, "peers_from_netlink", lambda ifname: [WgPeer(KEY_A)])
    monkeypatch.setattr(wp, "public_key_from_netlink", lambda ifname: KEY_B)
    reading = wp.read_peers("netmaker", sock_dir=tmp_path, with_key=True)
    assert (reading.source, reading.public_key) == ("netlink", KEY_B)


def test_read_peers_reports_every_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(wp, "kernel_wireguard", lambda: False)
    with pytest.raises(WgError) as exc:
        wp.read_peers("netmaker", sock_dir=tmp_path,
                      wg_cmd=[sys.executable, "-c", "import sys; sys.exit('no such device')"])
    assert "no UAPI socket" in str(exc.value) and "no such device" in str(exc.value)


def test_uapi_get_times_out_on_a_silent_socket(tmp_path: Path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "x.sock"))
    srv.listen()
    try:
        with pytest.raises(WgError, match="timed out"):
            wp.uapi_get("x", tmp_path, timeout_s=0.2)
    finally:
        srv.close()


# --------------------------------------------------------------------------- real wireguard-go


def _wireguard_missing() -> str | None:
    missing = [b for b in ("wireguard-go", "wg", "unshare") if shutil.which(b) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


@pytest.mark.ovs
@pytest.mark.skipif(_wireguard_missing() is not None, reason=str(_wireguard_missing()))
def test_real_wireguard_go_devices(netns_factory, tmp_path: Path):
    """Two namespaces, a wireguard-go device in each (private mount namespaces), a real
    handshake; the peers read over UAPI, `wg show dump` and from a wg-quick file agree."""
    from labs import netns as nsl
    from labs.mesh_lab import WgDevice, private_run_argv

    a, b = netns_factory("a"), netns_factory("b")
    nsl.add_veth("eth0", "eth0", a, b)
    nsl.add_addr(a, "eth0", "192.0.2.1/24")
    nsl.add_addr(b, "eth0", "192.0.2.2/24")
    keys = {}
    for name in ("a", "b"):
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                              check=True).stdout.strip()
        pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                             check=True).stdout.strip()
        path = tmp_path / f"{name}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(priv + "\n")
        keys[name] = (path, pub)
    # the same interface name in both namespaces: only the private mounts keep them apart
    devs = {n: WgDevice(ns, "netmaker", tmp_path / f"run-{n}", tmp_path / f"wg-{n}.log")
            for n, ns in (("a", a), ("b", b))}
    try:
        for n, ns, me, other, peer_ip in (("a", a, "100.100.0.1", "b", "192.0.2.2"),
                                          ("b", b, "100.100.0.2", "a", "192.0.2.1")):
            dev = devs[n]
            dev.start()
            dev.wg("set", "netmaker", "private-key", "/dev/stdin", "listen-port", "51821",
                   "peer", keys[other][1], "endpoint", f"{peer_ip}:51821",
                   "allowed-ips", f"{'100.100.0.2' if n == 'a' else '100.100.0.1'}/32,10.9.0.0/24",
                   stdin=keys[n][0].read_text())
            nsl.add_addr(ns, "netmaker", f"{me}/24")
            nsl.link_up(ns, "netmaker")
        assert devs["a"].sock != devs["b"].sock and devs["a"].sock.exists()
        ping = nsl.run(a, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "100.100.0.2"])
        assert ping.returncode == 0, ping.stdout

        reading = wp.read_peers("netmaker", sock_dir=devs["a"].sock_dir)
        assert reading.source == ("netlink" if wp.kernel_wireguard() else "uapi")
        (peer,) = reading.peers
        assert peer.public_key == keys["b"][1]
        assert peer.endpoint == "192.0.2.2:51821"
        assert peer.allowed_ips == ("100.100.0.2/32", "10.9.0.0/24")
        assert peer.last_handshake is not None and not peer.is_stale()
        assert peer.rx_bytes > 0 and peer.tx_bytes > 0
        assert peer.host_addresses == ("100.100.0.2",)

        shown = wp.peers_from_wg_show("netmaker", private_run_argv(a, devs["a"].run_dir, ["wg"]))
        assert [(p.public_key, p.endpoint, p.allowed_ips) for p in shown] == \
            [(peer.public_key, peer.endpoint, peer.allowed_ips)]
        assert shown[0].last_handshake == peer.last_handshake

        # b's side, and what a wg-quick file describing a's device says
        (peer_b,) = wp.peers_from_uapi("netmaker", devs["b"].sock_dir)
        assert peer_b.public_key == keys["a"][1] and peer_b.endpoint == "192.0.2.1:51821"
        conf = tmp_path / "netmaker.conf"
        conf.write_text(f"[Interface]\nPrivateKey = {keys['a'][0].read_text().strip()}\n\n"
                        f"[Peer]\nPublicKey = {keys['b'][1]}\nEndpoint = 192.0.2.2:51821\n"
                        "AllowedIPs = 100.100.0.2/32, 10.9.0.0/24\n")
        (from_file,) = wp.peers_from_conf(conf)
        assert (from_file.public_key, from_file.endpoint, from_file.allowed_ips) == \
            (peer.public_key, peer.endpoint, peer.allowed_ips)
    finally:
        for dev in devs.values():
            dev.stop()
