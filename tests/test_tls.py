"""The TLS OpenFlow channel for real: os-ken on ssl:, ovs-vswitchd with certificates.

A throw-away PKI (openssl, EC keys): one CA signs the controller's and the
switch's certificates; a second, unrelated CA signs a rogue switch certificate.
The one-host lab runs with ``controller.listen: ssl:127.0.0.1:6653``; bootstrap
writes the switch side into OVSDB's SSL table.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labs import netns as nsl
from labs.lab import INTERNET_IP, SocketLab

pytestmark = [
    pytest.mark.ovs,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]

LEAF_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth,clientAuth\n"
)


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(cwd: Path, name: str) -> None:
    _openssl(cwd, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}-key.pem")


def _ca(cwd: Path, name: str) -> None:
    _key(cwd, name)
    _openssl(cwd, "req", "-x509", "-new", "-key", f"{name}-key.pem", "-subj",
             f"/CN=socknet test {name}", "-days", "2", "-out", f"{name}-cert.pem",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(cwd: Path, name: str, ca: str) -> None:
    _key(cwd, name)
    _openssl(cwd, "req", "-new", "-key", f"{name}-key.pem", "-subj", f"/CN={name}",
             "-out", f"{name}.csr")
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem",
             "-CAkey", f"{ca}-key.pem", "-set_serial", str(secrets.randbits(63)),
             "-days", "2", "-extfile", "leaf.ext", "-out", f"{name}-cert.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    (d / "leaf.ext").write_text(LEAF_EXT)
    _ca(d, "ca")
    _leaf(d, "controller", "ca")
    _leaf(d, "switch", "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "rogue-switch", "rogue-ca")
    return d


@pytest.fixture(scope="module")
def lab(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketLab]:
    lab = SocketLab(f"t{secrets.token_hex(2)}", tmp_path_factory.mktemp("tlslab"),
                    privacy_ids=(100,), service_ids=(200, 201), tls_dir=pki)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def _ping(ns: str, dst: str) -> bool:
    return nsl.run(ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", dst]).returncode == 0


def _connected(lab: SocketLab, want: bool, timeout_s: float = 10.0) -> bool:
    """Wait until both Controller rows say is_connected=want (OVS updates it lazily)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = lab.ovs.vsctl("--bare", "--columns=is_connected", "list", "Controller").split()
        if out == [str(want).lower()] * 2:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _events(lab: SocketLab, after: int, name: str) -> list[dict[str, object]]:
    return [e for e in lab.log_events()[after:] if e.get("event") == name]


def test_controller_reconciles_over_tls_and_traffic_flows(lab: SocketLab, pki: Path) -> None:
    for bridge in ("mesh", "vmbr0"):
        assert lab.ovs.vsctl("get-controller", bridge).split() == ["ssl:127.0.0.1:6653"]
    ssl = lab.ovs.vsctl("get-ssl")
    assert f"Private key: {pki}/switch-key.pem" in ssl
    assert f"Certificate: {pki}/switch-cert.pem" in ssl
    assert f"CA Certificate: {pki}/ca-cert.pem" in ssl
    assert _connected(lab, True)
    # os-ken listens with TLS only: no plain OpenFlow listener on the port
    listening = nsl.run(lab.host, ["ss", "-Hltn"]).stdout
    assert "127.0.0.1:6653" in listening and ":6633" not in listening
    # the socknet pipeline was installed over the TLS connections ...
    assert len(lab.flows("vmbr0")) > 10 and len(lab.flows("mesh")) >= 3
    started = _events(lab, 0, "started")
    assert started and started[-1]["listen"] == "ssl:127.0.0.1:6653"
    # ... and it forwards: service <-> service (L2), privacy -> WARP -> internet
    c = lab.containers
    assert _ping(c[200].ns, c[201].ip)
    assert _ping(c[100].ns, INTERNET_IP)


def test_switch_with_certificate_from_another_ca_is_refused(lab: SocketLab, pki: Path) -> None:
    lab.stop_controller()
    for bridge in ("mesh", "vmbr0"):
        lab.ovs.ofctl("del-flows", lab.ovs.mgmt(bridge))
    # ovs-vswitchd now presents a certificate the controller's CA did not sign
    lab.ovs.vsctl("set-ssl", str(pki / "rogue-switch-key.pem"),
                  str(pki / "rogue-switch-cert.pem"), str(pki / "ca-cert.pem"))
    mark = len(lab.log_events())
    vswitchd_log = lab.ovs.vswitchd_log
    log_mark = vswitchd_log.stat().st_size
    lab.start_controller(wait=False)
    try:
        # both bridges try, and the controller's TLS handshake refuses their certificate
        # (OVS retries with backoff doubling from 1 s: give both bridges time to try)
        deadline = time.monotonic() + 40
        refused: list[str] = []
        while time.monotonic() < deadline:
            with vswitchd_log.open(errors="replace") as fh:
                fh.seek(log_mark)
                refused = [ln for ln in fh if "alert unknown ca" in ln]
            if len(refused) >= 2:
                break
            time.sleep(0.1)
        assert len(refused) >= 2, "ovs-vswitchd was not refused with 'unknown ca'"
        assert lab.controller is not None and lab.controller.poll() is None  # still serving
        assert _events(lab, mark, "switch_connected") == []
        assert _connected(lab, False)
        assert lab.flows("mesh") == [] and lab.flows("vmbr0") == []
    finally:
        # bootstrap puts the switch's own certificate back (SSL row drift) ...
        res = lab.socknet("bootstrap")
    assert "changed: OVS SSL: private_key" in res.stdout
    assert "changed: OVS SSL: certificate" in res.stdout
    # ... and the same controller process accepts the switch on its next attempt
    lab.wait_reconciled(after=mark)
    assert _events(lab, mark, "switch_connected")
    assert len(lab.flows("vmbr0")) > 10
    assert _ping(lab.containers[200].ns, lab.containers[201].ip)
