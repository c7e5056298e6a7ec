"""The OpenFlow channel is authenticated by default: `socknet bootstrap` makes a per-host
CA and the controller's and the switch's certificates, and points both ends at them
(os-ken's ssl: listener, OVSDB's SSL row and ssl: controller targets). Plain tcp: is
refused unless host.yaml opts in.

Without OVS: the PKI (files, modes, signatures, renewal) and a TLS handshake between
the two certificates it makes. On real OVS: bootstrap + `socknet run` with the default
config; ovs-vswitchd connects over TLS, a local process without a certificate does not
get past the handshake.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from controller import pki
from controller.cli import main
from labs import netns as nsl
from labs.lab import _env
from labs.ovs_instance import OvsInstance
from labs.waiting import eventually
from topology.config import parse_host_config

REPO = Path(__file__).resolve().parent.parent
BRIDGES = ("bridges:\n  mesh: {name: mesh, uplinks: [nm-privacy], to_socket: to-socket}\n"
           "  socket: {name: vmbr0, from_mesh: from-mesh, warp: warp0}\n")
FILES = ("ca-key.pem", "ca-cert.pem", "controller-key.pem", "controller-cert.pem",
         "switch-key.pem", "switch-cert.pem")


def _cfg(d: Path, extra: str = "") -> object:
    return parse_host_config(f"host: pve7\ncontroller: {{pki_dir: '{d}'{extra}}}\n" + BRIDGES)


def _cert(d: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((d / f"{name}-cert.pem").read_bytes())


def test_bootstrap_pki_files_modes_and_signatures(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    made = pki.ensure_pki(_cfg(d))  # type: ignore[arg-type]
    assert len(made.created) == 4  # the directory, the CA, two leaves
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    assert d.stat().st_mode & 0o777 == 0o700
    for key in ("ca-key.pem", "controller-key.pem", "switch-key.pem"):
        assert (d / key).stat().st_mode & 0o777 == 0o600, key
    ca = _cert(d, "ca")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ("controller", "switch"):
        leaf = _cert(d, role)
        leaf.verify_directly_issued_by(ca)
        assert leaf.subject.rfc4514_string().startswith(f"CN=socknet {role} pve7")
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # a second run finds everything in order and changes nothing
    before = {f: (d / f).read_bytes() for f in FILES}
    again = pki.ensure_pki(_cfg(d))  # type: ignore[arg-type]
    assert again.created == [] and again.changed == []
    assert {f: (d / f).read_bytes() for f in FILES} == before


def test_bootstrap_pki_repairs_and_renews(tmp_path: Path) -> None:
    d, other = tmp_path / "pki", tmp_path / "other"
    pki.ensure_pki(_cfg(d))  # type: ignore[arg-type]
    pki.ensure_pki(_cfg(other))  # type: ignore[arg-type]
    ca = (d / "ca-cert.pem").read_bytes()
    # a switch certificate another CA signed (and its key) is replaced, the CA kept
    for f in ("switch-key.pem", "switch-cert.pem"):
        (d / f).write_bytes((other / f).read_bytes())
    made = pki.ensure_pki(_cfg(d))  # type: ignore[arg-type]
    assert [c.split(" ")[1] for c in made.created] == ["switch"]
    _cert(d, "switch").verify_directly_issued_by(_cert(d, "ca"))
    assert (d / "ca-cert.pem").read_bytes() == ca
    # a key that does not match its certificate
    (d / "controller-key.pem").write_bytes((other / "controller-key.pem").read_bytes())
    assert [c.split(" ")[1] for c in pki.ensure_pki(_cfg(d)).created] == [  # type: ignore[arg-type]
        "controller"]
    # leaves near their end are renewed; a CA near its end is made anew with both leaves
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=pki.LEAF_DAYS - 10)
    renewed = pki.ensure_pki(_cfg(d), now=soon)  # type: ignore[arg-type]
    assert [c.split(" ")[1] for c in renewed.created] == ["controller", "switch"]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=pki.CA_DAYS - 10)
    assert len(pki.ensure_pki(_cfg(d), now=later).created) == 3  # type: ignore[arg-type]
    # a directory others can read is closed
    os.chmod(d, 0o755)
    assert pki.ensure_pki(_cfg(d)).changed and d.stat().st_mode & 0o777 == 0o700  # type: ignore[arg-type]


def test_no_pki_for_plain_tcp_or_an_operators_own_files(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    cfg = _cfg(d, ", listen: 'tcp:127.0.0.1:6653', insecure_tcp: true")
    assert pki.ensure_pki(cfg).created == [] and not d.exists()  # type: ignore[arg-type]
    for f in ("k", "c", "ca"):
        (tmp_path / f"{f}.pem").write_text("x\n")
    own = (f", tls: {{key: {tmp_path}/k.pem, cert: {tmp_path}/c.pem, ca_cert: {tmp_path}/ca.pem,"
           f" switch_key: {tmp_path}/k.pem, switch_cert: {tmp_path}/c.pem}}")
    assert pki.ensure_pki(_cfg(d, own)).created == [] and not d.exists()  # type: ignore[arg-type]


def _serve_once(ctx: ssl.SSLContext, sock: socket.socket, outcome: list[str]) -> None:
    conn, _ = sock.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            outcome.append(tls.getpeercert()["subject"][-1][0][1])
    except (ssl.SSLError, OSError) as exc:
        outcome.append(f"refused: {exc}")


def _handshake(d: Path, client_dir: Path) -> str:
    """os-ken's side (controller cert, switches checked against the CA) against a client
    presenting ``client_dir``'s switch certificate and checking the controller's."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "controller-cert.pem", d / "controller-key.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(d / "ca-cert.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # OVS checks the chain, not a host name
    client.load_cert_chain(client_dir / "switch-cert.pem", client_dir / "switch-key.pem")
    client.load_verify_locations(d / "ca-cert.pem")
    outcome: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as sock:
        t = threading.Thread(target=_serve_once, args=(server, sock, outcome))
        t.start()
        try:
            with socket.create_connection(sock.getsockname()) as raw, \
                    client.wrap_socket(raw):
                pass  # the handshake happens in wrap_socket
        except (ssl.SSLError, OSError):
            pass
        t.join(10)
    return outcome[0]


def test_the_two_certificates_complete_a_handshake_and_a_stranger_does_not(
        tmp_path: Path) -> None:
    d, stranger = tmp_path / "pki", tmp_path / "stranger"
    pki.ensure_pki(_cfg(d))  # type: ignore[arg-type]
    pki.ensure_pki(_cfg(stranger))  # type: ignore[arg-type]
    assert _handshake(d, d) == "socknet switch pve7"
    assert _handshake(d, stranger).startswith("refused:")


def test_validate_refuses_plain_tcp_without_the_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "host.yaml"
    path.write_text("host: pve7\ncontroller:\n  listen: tcp:127.0.0.1:6653\n" + BRIDGES)
    result = CliRunner().invoke(main, ["validate", "-c", str(path)])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"socknet: {path}:3: controller.listen: 'tcp:127.0.0.1:6653' is "
                           "plain TCP: no authentication")
    assert "insecure_tcp: true" in line and "unsafe on shared hosts" in line
    path.write_text("host: pve7\ncontroller:\n  listen: tcp:127.0.0.1:6653\n"
                    "  insecure_tcp: true\n" + BRIDGES)
    assert CliRunner().invoke(main, ["validate", "-c", str(path)]).exit_code == 0


@pytest.mark.ovs
def test_default_config_bootstrap_and_run_use_tls_both_ways(
        uid: str, netns_factory: Callable[..., str], ovs_factory: Callable[..., OvsInstance],
        tmp_path: Path) -> None:
    ns = netns_factory("h")
    ovs = ovs_factory(ns)
    d = tmp_path / "pki"
    host = tmp_path / "host.yaml"
    host.write_text(f"host: pve7\novsdb: {ovs.db_remote}\ndatapath_type: netdev\n"
                    f"controller: {{pki_dir: '{d}'}}\nmetrics: {{enabled: false}}\n"
                    f"bridges:\n  mesh: {{name: me{uid}, to_socket: ts{uid}}}\n"
                    f"  socket: {{name: vm{uid}, from_mesh: fm{uid}}}\n")
    env = _env()

    def socknet(*args: str) -> subprocess.CompletedProcess[str]:
        return nsl.run(ns, [sys.executable, "-m", "controller.cli", *args, "-c", str(host)],
                       env=env, timeout=60, cwd=REPO)

    res = socknet("bootstrap")
    assert res.returncode == 0, res.stderr
    assert f"changed: TLS: per-host CA {d}/ca-cert.pem" in res.stdout
    assert f"changed: TLS: switch certificate {d}/switch-cert.pem" in res.stdout
    for bridge in (f"me{uid}", f"vm{uid}"):
        assert ovs.vsctl("get-controller", bridge).split() == ["ssl:127.0.0.1:6653"]
    ssl_row = ovs.vsctl("get-ssl")
    assert f"Private key: {d}/switch-key.pem" in ssl_row
    assert f"Certificate: {d}/switch-cert.pem" in ssl_row
    assert f"CA Certificate: {d}/ca-cert.pem" in ssl_row
    assert socknet("bootstrap").stdout.startswith("nothing to do")
    log = tmp_path / "controller.log"
    with log.open("wb") as out:
        proc = nsl.popen(ns, [sys.executable, "-m", "controller.cli", "run", "-c", str(host)],
                         stdout=out, stderr=out, env=env, cwd=REPO)
    try:
        def connected() -> set[str]:
            return {str(e.get("bridge")) for e in map(json.loads, filter(
                lambda ln: ln.startswith("{"), log.read_text().splitlines()))
                if e.get("event") == "switch_connected"}

        assert eventually(lambda: connected() == {f"me{uid}", f"vm{uid}"}, 30.0), \
            log.read_text()[-2000:]
        listening = nsl.run(ns, ["ss", "-Hltn"]).stdout
        assert "127.0.0.1:6653" in listening
        # a local process without a certificate the host's CA signed: no handshake
        vm = int(ovs.vsctl("get", "Bridge", f"vm{uid}", "datapath_id").strip('"\n'), 16)
        res = nsl.run(ns, [sys.executable, "-m", "labs.ofpeer", "--dpid", hex(vm),
                           "--hold", "3"], env=env, timeout=30, cwd=REPO)
        got = json.loads(res.stdout)
        assert not got["handshake"] and "features_request" not in got["rx"], got
        assert connected() == {f"me{uid}", f"vm{uid}"}
        assert '"dpid_conflict"' not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
