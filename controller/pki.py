"""The per-host PKI of the OpenFlow TLS channel, made and kept by `socknet bootstrap`.

With ``controller.listen: ssl:...`` and no ``tls:`` block (the default), bootstrap keeps
in ``controller.pki_dir`` (default /var/lib/socknet/pki, mode 0700):

    ca-key.pem, ca-cert.pem                  a CA of this host only
    controller-key.pem, controller-cert.pem  os-ken presents it; ovs-vswitchd checks it
    switch-key.pem, switch-cert.pem          ovs-vswitchd presents it (OVSDB SSL row)

Both ends accept only a peer certificate the host's CA signed, so a local process that
reaches the OpenFlow port cannot complete the handshake without a root-only key.
Keys are EC P-256, written 0600. A missing, unreadable or mismatched file, a leaf not
signed by the current CA, or a certificate within ``RENEW_DAYS`` of its end is made
anew (a new CA re-issues both leaves). Nothing is made when all is in order.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from topology.config import HostConfig

CA_DAYS = 3650
LEAF_DAYS = 825
RENEW_DAYS = 30
LEAVES = ("controller", "switch")


class PkiError(RuntimeError):
    pass


@dataclass
class PkiResult:
    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with ``mode`` from the start (a key is never readable by others)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load(key_path: Path, cert_path: Path
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        return None
    return key, cert


def _fresh(cert: x509.Certificate, now: dt.datetime) -> bool:
    return (cert.not_valid_before_utc <= now
            and cert.not_valid_after_utc - now > dt.timedelta(days=RENEW_DAYS))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "socknet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int, now: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))  # clocks a little apart
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False))


def _make_ca(host: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey,
                                                   x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"socknet CA {host}")
    cert = (_builder(name, name, key, CA_DAYS, now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_leaf(role: str, host: str, ca_key: ec.EllipticCurvePrivateKey,
               ca_cert: x509.Certificate, now: dt.datetime
               ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (_builder(_name(f"socknet {role} {host}"), ca_cert.subject, key, LEAF_DAYS, now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_pki(cfg: HostConfig, now: dt.datetime | None = None) -> PkiResult:
    """Make or repair the per-host PKI in ``controller.pki_dir`` (only when the channel
    is ``ssl:`` without a ``tls:`` block). Raises PkiError with one line."""
    result = PkiResult()
    if not cfg.controller.managed_pki:
        return result
    now = now or _now()
    d = Path(cfg.controller.pki_dir)
    try:
        _ensure(cfg.host, d, now, result)
    except OSError as exc:
        raise PkiError(f"controller.pki_dir {d}: {exc.strerror or exc}") from exc
    return result


def _ensure(host: str, d: Path, now: dt.datetime, result: PkiResult) -> None:
    if not d.is_dir():
        d.mkdir(mode=0o700, parents=True)
        result.created.append(f"TLS PKI directory {d}")
    elif d.stat().st_mode & 0o077:
        os.chmod(d, 0o700)
        result.changed.append(f"TLS PKI directory {d}: mode 0700 (was readable by others)")
    ca = _load(d / "ca-key.pem", d / "ca-cert.pem")
    if ca is None or not _fresh(ca[1], now):
        ca = _make_ca(host, now)
        _write(d / "ca-key.pem", _key_pem(ca[0]), 0o600)
        _write(d / "ca-cert.pem", _cert_pem(ca[1]), 0o644)
        result.created.append(f"TLS: per-host CA {d / 'ca-cert.pem'} (valid {CA_DAYS} days)")
    ca_key, ca_cert = ca
    for role in LEAVES:
        key_path, cert_path = d / f"{role}-key.pem", d / f"{role}-cert.pem"
        leaf = _load(key_path, cert_path)
        if leaf is not None and _fresh(leaf[1], now) and _signed_by(leaf[1], ca_cert):
            continue
        key, cert = _make_leaf(role, host, ca_key, ca_cert, now)
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, _cert_pem(cert), 0o644)
        result.created.append(f"TLS: {role} certificate {cert_path} (valid {LEAF_DAYS} days)")
