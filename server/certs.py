"""``ferry certs``: a federation's TLS CA, the server certificate, institutions' auth keys.

Issuing is the operator's (the server side's) job; the file names below are shared with the
launchers that read them (:mod:`common.deploy.names`). Made with the ``cryptography`` package
(no openssl binary). Layout of the output directory (made mode 0700; every private key mode
0600, written with those modes from the first byte):

``ca.pem``                    the federation CA certificate. Public: every institution gets it
                              and verifies the server with it (``ferry client --root-cert``).
``server.pem``/``server.key`` the SuperLink's TLS certificate (signed by the CA, valid for the
                              given hostnames/IPs) and its private key (secret, server only).
``institutions/NAME.key``     an institution's SuperNode authentication key (EC P-384,
                              OpenSSH PEM). Secret: it *is* the institution's identity.
``institutions/NAME.pub``     its public key (OpenSSH); the federation registers it with
                              ``flwr supernode register`` (``ferry server`` does, from its config).

The CA's private key ``ca.key`` is kept apart, in its own directory (``--ca-dir``; default
``<out>-ca`` beside the output directory, e.g. ``certs-ca/ca.key``): whoever holds it can
impersonate the server to every institution, so it must not travel with the server's files
when ``certs/`` is copied to the server machine. Keep it offline once the server certificate
exists; it is read only to issue a server certificate. A ``ca.key`` inside the output
directory (the layout of older versions) is still used, and ``ferry server`` warns when it
finds one beside ``server.key``.

Existing files are never overwritten: a second call adds what is missing (a new institution,
a server certificate under an existing CA). An existing server certificate that lacks a
``--host`` asked for is an error naming the difference (remove ``server.pem`` and
``server.key`` to issue a new one), never silently kept. A directory that already exists is
never chmod-ed (it may be shared on purpose); a warning says when other users can enter it.
Everything is checked before the first file is written. An institution can make its own key
pair (``--keys-only``) and send only the ``.pub`` file to the federation.
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

from ferry.common.atomic_files import write_atomic
from ferry.common.deploy.names import (
    CA_CERT,
    CA_KEY,
    INSTITUTIONS_DIR,
    SERVER_CERT,
    SERVER_KEY,
    check_institution_name,
)
from ferry.common.deploy.tls import san_matches
from ferry.common.errors import FerryError
from ferry.common.private_files import private_dir, shared_dir_warning

MAX_DAYS = 36500  # 100 years; X.509 dates end in 9999 and no key should live that long
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
AUTH_CURVE = ec.SECP384R1()  # Flower's SuperNode auth wants an EC key on a NIST curve


@dataclass
class CertsReport:
    """What :func:`make_certs` wrote (``created``), left as it was (``kept``), and what the
    user should know (``warnings``, one line each)."""

    out: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _private_dir(path: Path, warnings: list[str] | None = None) -> Path:
    """``path`` made 0700 if missing; an existing one is left as it is (with a warning in
    ``warnings`` when other users can enter it)."""
    existed = path.is_dir()
    try:
        private_dir(path)
    except OSError as exc:
        raise FerryError(
            f"cannot create directory {path} ({exc.strerror}): give a directory path"
        ) from None
    if existed and warnings is not None:
        warning = shared_dir_warning(path, "directory")
        if warning:
            warnings.append(warning)
    return path


def default_ca_dir(out: str | os.PathLike) -> Path:
    """Where ``ferry certs`` keeps ``ca.key`` by default: ``<out>-ca``, beside ``out``."""
    out = Path(out).absolute()
    return out.with_name(f"{out.name}-ca")


def check_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise FerryError(
            f"--days {days} is invalid: certificates must be valid from 1 to {MAX_DAYS} days "
            "(e.g. 365)"
        )
    return days


def check_federation_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise FerryError(
            f"--federation {name[:80]!r} is invalid: use 1-64 printable characters (it names "
            "the CA certificate)"
        )
    return name


def _missing_hosts(cert_path: Path, hosts: list[str]) -> list[str]:
    """The ``hosts`` that the existing certificate at ``cert_path`` is not valid for."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FerryError(
            f"cannot read the existing server certificate {cert_path} ({exc}): remove it and "
            "its server.key to issue a new one"
        ) from None
    return [host for host in hosts if not san_matches(cert, host)]


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte; an existing key is never replaced."""
    try:
        write_atomic(path, data, mode=mode, exclusive=True)
    except FileExistsError:
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


def _ca_key_path(out: Path, ca_dir: Path) -> Path | None:
    """The existing CA key: in ``ca_dir``, or (older layout) beside ``ca.pem``; else None."""
    for path in (ca_dir / CA_KEY, out / CA_KEY):
        if path.exists():
            return path
    return None


def _load_ca(
    out: Path, key_path: Path | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if key_path is None:
        raise FerryError(
            f"{out / CA_CERT} exists but its ca.key is in neither --ca-dir nor {out}: give "
            "--ca-dir DIR (where ca.key is) to issue a server certificate"
        )
    try:
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise FerryError(
            f"cannot load the existing CA {out / CA_CERT}, {key_path} ({exc})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FerryError(f"{key_path} is not an EC key made by `ferry certs`")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise FerryError(
            f"{key_path} is not the key of {out / CA_CERT}: give the matching --ca-dir"
        )
    return cert, key


def make_certs(
    out: str | os.PathLike,
    hosts: list[str] | None = None,
    institutions: list[str] | None = None,
    federation: str = "ferry",
    days: int = 365,
    keys_only: bool = False,
    ca_dir: str | os.PathLike | None = None,
) -> CertsReport:
    """Create what is missing under ``out`` and ``ca_dir`` (default :func:`default_ca_dir`;
    see the module docstring); return what was done. ``hosts=None`` means the default hosts
    and no check of an existing server certificate's names."""
    check_days(days)
    check_federation_name(federation)
    asked_hosts = list(hosts) if hosts is not None else []
    # The SuperLink is also reached on loopback (the ServerApp, the operator's flwr, and the
    # proxy, which verifies it as localhost): the certificate always names both.
    hosts = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    institutions = [check_institution_name(n) for n in institutions or []]
    if keys_only and not institutions:
        raise FerryError("--keys-only needs at least one --institution NAME")
    out_path = Path(out)
    ca_dir = Path(ca_dir) if ca_dir is not None else default_ca_dir(out_path)
    if not keys_only:
        _san(hosts)  # bad host names fail before anything is written
        if (out_path / SERVER_CERT).exists():
            missing = _missing_hosts(out_path / SERVER_CERT, asked_hosts)
            if missing:
                raise FerryError(
                    f"the existing server certificate {out_path / SERVER_CERT} is not valid "
                    f"for --host {', '.join(missing)}: remove {out_path / SERVER_CERT} and "
                    f"{out_path / SERVER_KEY} to issue a new one for all the --host names"
                )
    warnings: list[str] = []
    report = CertsReport(_private_dir(out_path, warnings), warnings=warnings)
    out = report.out
    if not keys_only:
        need_server_cert = not (out / SERVER_CERT).exists()
        if (out / CA_CERT).exists():
            report.kept.append(out / CA_CERT)
            if need_server_cert:
                key_path = _ca_key_path(out, ca_dir)
                ca_cert, ca_key = _load_ca(out, key_path)
                report.kept.append(key_path)
        else:
            if (ca_dir / CA_KEY).exists():
                raise FerryError(
                    f"{ca_dir / CA_KEY} exists but {out / CA_CERT} does not: put that CA's "
                    "ca.pem back, or give another --ca-dir for a new CA"
                )
            ca_cert, ca_key = _make_ca(federation, days)
            _private_dir(ca_dir, report.warnings)
            _write(ca_dir / CA_KEY, _key_pem(ca_key), 0o600)
            _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            report.created += [ca_dir / CA_KEY, out / CA_CERT]
        if not need_server_cert:
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
