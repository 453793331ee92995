"""Checks on addresses, certificates and keys, made before any Flower process starts.

Each check raises :class:`FerryError` with one line naming the file (or address), the problem
and the fix: a missing, unreadable, expired or not-yet-valid certificate, a certificate that
is not a CA (or not signed by the given CA), a key that does not match, a private key that
others can read (the server's ``server.key`` as well as an institution's key), a server that
does not prove its identity with the given CA.

The CA's private key belongs offline, apart from the server's files (:mod:`server.certs`):
:func:`ca_key_warning` says when a ``ca.key`` sits beside ``server.key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ferry.common.deploy.names import CA_KEY
from ferry.common.errors import FerryError

NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def parse_address(address: str, what: str = "--server") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address must be bracketed
    valid_host = bool(host) and all(c.isalnum() or c in ".-_:" for c in host)
    if not sep or not valid_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FerryError(
            f"{what} {address!r} is not an address: use HOST:PORT, e.g. fl.example.org:9092 "
            "or 127.0.0.1:9092 ([::1]:9092 for IPv6)"
        )
    return host, int(port)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FerryError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise FerryError(f"{what} {path} is unreadable ({exc.strerror})") from None


def load_certificate(path: Path, what: str) -> x509.Certificate:
    """The first certificate in a PEM file, checked to be valid now."""
    try:
        cert = x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise FerryError(f"{what} {path} is not a PEM certificate") from None
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise FerryError(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "get a current one (`ferry certs` makes new ones)"
        )
    if cert.not_valid_before_utc > now:
        raise FerryError(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock)"
        )
    return cert


def check_ca_certificate(path: Path, what: str = "--root-cert") -> x509.Certificate:
    cert = load_certificate(path, what)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise FerryError(
            f"{what} {path} is not a CA certificate (it is {cert.subject.rfc4514_string()!r}): "
            "give the federation's ca.pem"
        )
    return cert


def san_matches(cert: x509.Certificate, host: str) -> bool:
    """Whether ``cert``'s subject alternative names cover ``host`` (an IP or a DNS name)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def _check_owner_only(path: Path, what: str, why: str) -> None:
    """Refuse a private key file that users other than its owner can read or write."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise FerryError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise FerryError(f"{what} {path} is unreadable ({exc.strerror})") from None
    if mode & 0o077:
        raise FerryError(
            f"{what} {path} can be read by other users (mode {mode:04o}): {why}; run "
            f"`chmod 600 {path}`"
        )


def ca_key_warning(server_key: Path) -> str | None:
    """A one-line warning when the CA's private key sits in the server key's directory."""
    ca_key = Path(server_key).parent / CA_KEY
    if not ca_key.exists():
        return None
    return (
        f"ferry: WARNING: the CA's private key {ca_key} sits beside the server key: whoever "
        "takes this machine can then impersonate the server to every institution; move it "
        "offline (`ferry certs --ca-dir` keeps it apart)"
    )


def check_server_certificate(
    cert_path: Path, key_path: Path, ca: x509.Certificate, local_host: str
) -> None:
    """The server certificate: current, issued by ``ca``, matching its key, and valid for
    ``local_host`` (the address the SuperLink's own ServerApp process connects to); its
    key readable by its owner only. Prints :func:`ca_key_warning` to stderr if it applies."""
    _check_owner_only(key_path, "server key", "whoever reads it can impersonate the server")
    cert = load_certificate(cert_path, "server certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FerryError(
            f"server certificate {cert_path} is not signed by the CA "
            f"{ca.subject.rfc4514_string()!r}: use the server.pem made with that ca.pem"
        ) from None
    try:
        key = serialization.load_pem_private_key(_read(key_path, "server key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FerryError(f"server key {key_path} is not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise FerryError(f"server key {key_path} does not match server certificate {cert_path}")
    if not san_matches(cert, local_host):
        raise FerryError(
            f"server certificate {cert_path} is not valid for {local_host}, the address the "
            "SuperLink's own processes connect to: make it with "
            f"`ferry certs --host {local_host} --host <public name>`"
        )
    warning = ca_key_warning(key_path)
    if warning:
        print(warning, file=sys.stderr)


def check_private_key_file(path: Path, what: str = "--key") -> ec.EllipticCurvePrivateKey:
    """An institution's SuperNode key: private to its owner, an EC key on a NIST curve."""
    data = _read(path, what)
    _check_owner_only(path, what, "it is this institution's identity")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FerryError(
            f"{what} {path} is not an unencrypted OpenSSH private key (make one with "
            "`ferry certs --keys-only --institution NAME`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise FerryError(f"{what} {path} is not an EC key on a NIST curve (P-256/384/521)")
    return key


def check_public_key(path: Path, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(_read(path, what))
    except (ValueError, UnsupportedAlgorithm):
        raise FerryError(f"{what} {path} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise FerryError(f"{what} {path} is not an EC public key on a NIST curve")
    return key


def check_server_identity(host: str, port: int, ca_path: Path, timeout: float = 5.0) -> bool:
    """TLS handshake with the server, verified against ``ca_path`` and ``host``.

    Returns False if the server cannot be reached (it may not be up yet); raises FerryError
    if it answers with a certificate that does not verify.
    """
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as exc:
        raise FerryError(
            f"the server at {host}:{port} did not prove its identity with --root-cert "
            f"{ca_path} ({exc.verify_message}): get the federation's current ca.pem and "
            "check --server"
        ) from None
    except ssl.SSLError as exc:
        raise FerryError(
            f"TLS with {host}:{port} failed ({exc.reason}): is it a Ferry server with TLS on?"
        ) from None
    except OSError:
        return False
