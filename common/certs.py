"""``ferry certs``: a federation's TLS CA, the server certificate, institutions' auth keys.

Made with the ``cryptography`` package (no openssl binary). Layout of the output directory
(mode 0700; every private key mode 0600, written with those modes from the first byte):

``ca.pem``                    the federation CA certificate. Public: every institution gets it
                              and verifies the server with it (``ferry client --root-cert``).
``ca.key``                    the CA's private key. Secret: whoever holds it can impersonate
                              the server. Keep it offline once the server certificate exists.
``server.pem``/``server.key`` the SuperLink's TLS certificate (signed by the CA, valid for the
                              given hostnames/IPs) and its private key (secret, server only).
``institutions/NAME.key``     an institution's SuperNode authentication key (EC P-384,
                              OpenSSH PEM). Secret: it *is* the institution's identity.
``institutions/NAME.pub``     its public key (OpenSSH); the federation registers it with
                              ``flwr supernode register`` (``ferry server`` does, from its config).

Existing files are never overwritten: a second call adds what is missing (a new institution,
a server certificate under an existing CA). An institution can make its own key pair
(``--keys-only``) and send only the ``.pub`` file to the federation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FerryError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
INSTITUTIONS_DIR = "institutions"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
AUTH_CURVE = ec.SECP384R1()  # Flower's SuperNode auth wants an EC key on a NIST curve
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class CertsReport:
    """What :func:`make_certs` wrote (``created``) and left as it was (``kept``)."""

    out: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def check_institution_name(name: str) -> str:
    if not _NAME.match(name):
        raise FerryError(
            f"institution name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _private_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise FerryError(f"cannot create directory {path} ({exc.strerror})") from None
    return path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (O_EXCL: never overwrite)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if path exists: an existing key is never replaced
        os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise FerryError(f"{path} already exists; not overwritten") from None
    except OSError as exc:
        raise FerryError(f"cannot write {path} ({exc.strerror})") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$", host):
                raise FerryError(
                    f"--host {host!r} is neither an IP address nor a DNS name"
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _make_ca(federation: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def make_auth_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (OpenSSH private key, 0600) and ``NAME.pub`` (OpenSSH public key)."""
    check_institution_name(name)
    _private_dir(directory)
    key = ec.generate_private_key(AUTH_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    _write(key_path, private, 0o600)
    _write(pub_path, public + f" ferry-{name}\n".encode(), 0o644)
    return key_path, pub_path


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise FerryError(f"cannot load the existing CA in {out} ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FerryError(f"{out / CA_KEY} is not an EC key made by `ferry certs`")
    return cert, key


def make_certs(
    out: str | os.PathLike,
    hosts: list[str] | None = None,
    institutions: list[str] | None = None,
    federation: str = "ferry",
    days: int = 365,
    keys_only: bool = False,
) -> CertsReport:
    """Create what is missing under ``out`` (see the module docstring); return what was done."""
    if days < 1:
        raise FerryError(f"--days {days} is invalid: certificates must be valid >= 1 day")
    hosts = list(hosts or DEFAULT_HOSTS)
    institutions = [check_institution_name(n) for n in institutions or []]
    if keys_only and not institutions:
        raise FerryError("--keys-only needs at least one --institution NAME")
    report = CertsReport(_private_dir(Path(out)))
    out = report.out
    if not keys_only:
        _san(hosts)  # bad host names fail before anything is written
        if (out / CA_CERT).exists() or (out / CA_KEY).exists():
            ca_cert, ca_key = _load_ca(out)
            report.kept += [out / CA_CERT, out / CA_KEY]
        else:
            ca_cert, ca_key = _make_ca(federation, days)
            _write(out / CA_KEY, _key_pem(ca_key), 0o600)
            _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            report.created += [out / CA_KEY, out / CA_CERT]
        if (out / SERVER_CERT).exists():
            report.kept += [out / SERVER_CERT, out / SERVER_KEY]
        else:
            cert, key = _make_server_cert(ca_cert, ca_key, hosts, days)
            _write(out / SERVER_KEY, _key_pem(key), 0o600)
            _write(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            report.created += [out / SERVER_KEY, out / SERVER_CERT]
    keys_dir = out / INSTITUTIONS_DIR
    for name in institutions:
        if (keys_dir / f"{name}.key").exists() or (keys_dir / f"{name}.pub").exists():
            report.kept += [keys_dir / f"{name}.key", keys_dir / f"{name}.pub"]
            continue
        report.created += list(make_auth_key_pair(keys_dir, name))
    return report
