"""An institution's signed privacy report: the format, its one codec, signing and verifying.

After every DP round an institution signs what it ran and what it spent, with a key only it
holds (deployment: its SuperNode key from ``ferry certs``; simulation: a key per virtual
institution in its state directory). The server stores the signed report verbatim in its
ledger; ``ferry audit`` verifies it against the institution's public key and replays only the
numbers it signed. The server can drop or reorder reports, but not alter, forge or move one
unseen: each report names its run, round and institution, and carries the sha256 of the same
institution's previous report (its own chain, across runs).

Wire and ledger form: ``{"body": <canonical JSON text>, "signature": <base64>}``. ``body`` is
:func:`canonical` of the report's fields (sorted keys, no spaces, ASCII, no NaN); the
signature is ECDSA with SHA-384 over :data:`SIGNATURE_CONTEXT` + ``body`` (the context keeps
a report signature from ever passing for a Flower authentication signature by the same key,
and back). The digest a next report chains to is sha256 of the body bytes. Verifiers check
the body's bytes as they are; they never re-encode it.

Released by a report (to the operator and any auditor): the mechanism (DpEvent, sigma, q,
steps, clipping norm, batch size, local epochs), this institution's training-set size, its
cumulative epsilon, round count and budget. Nothing about any one example.

Fields are never removed and their meaning never changes (new ones may be added to ``extra``
or, with a new :data:`FORMAT`, to the body), so every report ever signed stays verifiable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

FORMAT = "ferry-privacy-report/1"
GENESIS = "0" * 64  # prev_report of an institution's first report
SIGNATURE_CONTEXT = b"ferry privacy report v1\x00"
NON_PRIVATE_EVENT = {"module_name": "dp_accounting.dp_event", "class_name": "NonPrivateDpEvent"}
MAX_BODY_CHARS = 64_000  # a real report is ~1.5 kB; anything far larger is not one


class ReportError(ValueError):
    """A report that cannot be read as this format (the message says which field)."""


@dataclass(frozen=True)
class PrivacyReport:
    """One institution's account of one round (see the module docstring)."""

    run_id: str
    round: int
    institution: str
    unit: str
    non_private: bool
    dp_event: dict  # dp-accounting JSON (common.privacy.dp_events)
    sampling: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    batch_size: int
    local_epochs: int
    examples: int
    delta: float
    epsilon: float | None  # cumulative over every round of this institution; None: unbounded
    accountant: str
    accountant_library: str
    client_rounds: int  # the institution's own count of rounds, this one included
    budget_epsilon: float | None
    budget_delta: float | None
    prev_report: str  # sha256 of this institution's previous report body, or GENESIS
    signer: str  # sha256 of the signing public key (OpenSSH form): whose key signed
    extra: dict = field(default_factory=dict)  # other values the client released with it
    format: str = FORMAT

    def body(self) -> str:
        return canonical(asdict(self)).decode()

    @classmethod
    def from_body(cls, body: str) -> PrivacyReport:
        """Parse and type-check a body; :class:`ReportError` names the first bad field.
        Values are only type-checked here (hostile ranges are the audit's findings)."""
        if not isinstance(body, str) or len(body) > MAX_BODY_CHARS:
            raise ReportError("the report body is not a string of a report's size")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ReportError(f"the report body is not JSON ({str(exc)[:80]})") from None
        if not isinstance(data, dict):
            raise ReportError("the report body is not a JSON object")
        if data.get("format") != FORMAT:
            raise ReportError(f"format is {str(data.get('format'))[:40]!r}, not {FORMAT!r}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                raise ReportError(f"field {f.name} is missing")
            values[f.name] = _typed(f.name, str(f.type), data[f.name])
        return cls(**values)


def _typed(name: str, kind: str, value: object) -> object:
    optional = kind.endswith("| None")
    if value is None and optional:
        return None
    base = kind.removesuffix(" | None")
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool) and _finite(value),
    }[base]
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        wanted = "a finite number" if base == "float" else base
        raise ReportError(f"{name} is {shown}, not {wanted}")
    return float(value) if base == "float" else value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def canonical(data: object) -> bytes:
    """The one encoding that is signed and hashed."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def digest(body: str) -> str:
    """What the next report of the same institution names as ``prev_report``."""
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class SignedReport:
    """A report body as signed, and its signature: stored and carried verbatim."""

    body: str
    signature: str

    def to_json(self) -> dict:
        return {"body": self.body, "signature": self.signature}

    @classmethod
    def from_json(cls, data: object) -> SignedReport:
        if not isinstance(data, dict):
            raise ReportError("no signed report (expected {body, signature})")
        body, signature = data.get("body"), data.get("signature")
        if not isinstance(body, str) or not isinstance(signature, str):
            raise ReportError("the signed report lacks a body or a signature string")
        return cls(body, signature)

    @property
    def digest(self) -> str:
        return digest(self.body)


# -- keys --------------------------------------------------------------------------------------


def public_key_text(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """sha256 (hex) of the key's OpenSSH form, without comment: the report's ``signer``."""
    return hashlib.sha256(public_key_text(public_key)).hexdigest()


def load_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """An EC private key, OpenSSH (as ``ferry certs`` writes it) or PKCS#8 PEM."""
    for loader in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = loader(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    raise ReportError("not an unencrypted EC private key (OpenSSH or PEM)")


def load_public_key(data: bytes) -> tuple[ec.EllipticCurvePublicKey, str]:
    """(key, comment) of one OpenSSH public key line (``ferry certs`` writes ``ferry-NAME``)."""
    parts = data.strip().split(None, 2)
    try:
        key = serialization.load_ssh_public_key(b" ".join(parts[:2]))
    except (ValueError, UnsupportedAlgorithm, IndexError):
        raise ReportError("not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ReportError("not an EC public key")
    return key, parts[2].decode(errors="replace") if len(parts) > 2 else ""


def sign(report: PrivacyReport, private_key: ec.EllipticCurvePrivateKey) -> SignedReport:
    """Sign ``report``; its ``signer`` must name ``private_key``'s public key."""
    if report.signer != fingerprint(private_key.public_key()):
        raise ReportError("the report's signer is not the signing key")
    body = report.body()
    signature = private_key.sign(SIGNATURE_CONTEXT + body.encode(), ec.ECDSA(hashes.SHA384()))
    return SignedReport(body, base64.b64encode(signature).decode())


def verify(signed: SignedReport, public_key: ec.EllipticCurvePublicKey) -> bool:
    """True when ``public_key`` signed exactly these body bytes."""
    try:
        signature = base64.b64decode(signed.signature.encode(), validate=True)
        public_key.verify(
            signature, SIGNATURE_CONTEXT + signed.body.encode(), ec.ECDSA(hashes.SHA384())
        )
    except (InvalidSignature, binascii.Error, ValueError, UnicodeError):
        return False
    return True


# -- the institution's receipt chain (written by client.receipts, read by the audit) ----------

RECEIPTS_FILE = "receipts.jsonl"
# the keys a train reply's privacy record carries the signed report under
REPLY_BODY, REPLY_SIGNATURE = "signed-report", "signature"


def read_receipts(data: bytes) -> tuple[list[SignedReport], list[str]]:
    """(receipts, problems) of a ``receipts.jsonl``: one signed report per line. A line that
    does not parse is a problem (its 1-based number), never an exception."""
    receipts, problems = [], []
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            receipts.append(SignedReport.from_json(json.loads(line)))
        except (ValueError, RecursionError) as exc:
            problems.append(f"receipts line {number} is unreadable ({str(exc)[:60]})")
    return receipts, problems
