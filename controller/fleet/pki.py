"""The fleet CA and the hosts' certificates (``cryptography``, EC P-256).

The certificate's CN is the host's identity in the fleet database: RBAC lets a
client write only rows whose owner column equals it. So the CA must sign one
certificate per host name, and never a second one for the same name to anybody
else. Keys are written 0600, never overwritten (pass ``force`` to replace a
certificate, e.g. when it expires).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from topology.fleet import check_host_name

CA_KEY, CA_CERT = "ca-key.pem", "ca-cert.pem"
CA_DAYS, LEAF_DAYS = 3650, 825


class PkiError(RuntimeError):
    """A CA or certificate file is missing, exists already, or cannot be written."""


@dataclass(frozen=True)
class CertFiles:
    key: Path
    cert: Path
    ca_cert: Path


def _write_private(path: Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``path`` mode 0600 (renamed into place: never half written)."""
    if path.exists() and not force:
        raise PkiError(f"{path} exists (refusing to overwrite a key or certificate)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(ca_dir: Path, name: str = "socknet fleet CA", *, days: int = CA_DAYS,
              force: bool = False) -> CertFiles:
    """A new CA key and self-signed certificate in ``ca_dir``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_dir = Path(ca_dir)
    _write_private(ca_dir / CA_KEY, _key_pem(key), force)
    _write_private(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), force)
    (ca_dir / CA_CERT).chmod(0o644)
    return CertFiles(ca_dir / CA_KEY, ca_dir / CA_CERT, ca_dir / CA_CERT)


def _load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except OSError as exc:
        raise PkiError(f"fleet CA in {ca_dir}: {exc.strerror}: {exc.filename}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_dir / CA_KEY}: not an EC private key")
    return key, cert


def host_files(out_dir: Path, host: str) -> CertFiles:
    """Where ``socknet fleet cert`` puts a host's files by default."""
    out_dir = Path(out_dir)
    return CertFiles(out_dir / f"{host}-key.pem", out_dir / f"{host}-cert.pem",
                     out_dir / CA_CERT)


def issue_cert(ca_dir: Path, host: str, files: CertFiles, *, addresses: tuple[str, ...] = (),
               days: int = LEAF_DAYS, force: bool = False) -> CertFiles:
    """Key and certificate for ``host`` (CN = host, the RBAC identity), signed by the CA
    in ``ca_dir``, written to ``files`` with a copy of the CA certificate.
    ``addresses``: IP SANs (the host's mesh addresses)."""
    check_host_name(host)
    ca_key, ca_cert = _load_ca(Path(ca_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(host)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key, _key_pem(key), force)
    _write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM), force)
    files.cert.chmod(0o644)
    if files.ca_cert.resolve() != (Path(ca_dir) / CA_CERT).resolve():
        _write_private(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), True)
        files.ca_cert.chmod(0o644)
    return files


def cert_common_name(path: Path) -> str:
    """The CN of the certificate at ``path`` (what ovsdb-server will call the client)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()
