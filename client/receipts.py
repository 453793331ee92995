"""The institution's side of signed privacy reports: its signing key and its receipt chain.

Every privacy report this institution releases is signed here (format:
:mod:`common.privacy.report`) and appended, fsynced, to ``<state_dir>/receipts.jsonl``
*before* the reply leaves: the institution keeps its own record of everything it told any
server, which ``ferry audit --receipts STATE_DIR`` compares with a server's ledger. Each
report names the sha256 of the previous receipt (across runs), so the chain shows a report the
server dropped or reordered.

Signing key (private, never leaves this machine):

* deployment with ``--key``: the institution's SuperNode key from ``ferry certs`` (its
  registered identity; ``ferry client`` passes its path as node config ``report-key``);
* otherwise (simulation, or ``ferry client --insecure`` without a key): ``report-signing.key``
  in the state directory, made on first use, its public half beside it as
  ``report-signing.pub``. An auditor can tie such a key to the institution only if the
  institution hands over that ``.pub`` file itself.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ferry.common.atomic_files import write_atomic
from ferry.common.errors import FerryError
from ferry.common.privacy.report import (
    GENESIS,
    RECEIPTS_FILE,
    REPLY_BODY,
    REPLY_SIGNATURE,
    PrivacyReport,
    ReportError,
    fingerprint,
    load_private_key,
    public_key_text,
    read_receipts,
    sign,
)
from ferry.common.private_files import PRIVATE_FILE, open_private, private_dir

LOCAL_KEY = "report-signing.key"
LOCAL_PUB = "report-signing.pub"

# report dict key (as the client's reply carries it) -> PrivacyReport field
_FIELDS = {
    "run-id": "run_id",
    "round": "round",
    "institution": "institution",
    "unit": "unit",
    "non-private": "non_private",
    "dp-event": "dp_event",
    "sampling": "sampling",
    "noise-multiplier": "noise_multiplier",
    "sample-rate": "sample_rate",
    "steps": "steps",
    "max-grad-norm": "max_grad_norm",
    "batch-size": "batch_size",
    "local-epochs": "local_epochs",
    "examples": "examples",
    "delta": "delta",
    "epsilon": "epsilon",
    "accountant": "accountant",
    "accountant-library": "accountant_library",
    "rounds": "client_rounds",
    "budget-epsilon": "budget_epsilon",
    "budget-delta": "budget_delta",
}


def signing_key(state_dir: Path, institution: str, key_path: Path | None = None):
    """This institution's private signing key (see the module docstring)."""
    if key_path is not None:
        try:
            return load_private_key(Path(key_path).read_bytes())
        except (OSError, ReportError) as exc:
            raise FerryError(
                f"report signing key {key_path} is unusable ({exc}): give the institution's "
                "key from `ferry certs` (--key)"
            ) from None
    path = Path(state_dir) / LOCAL_KEY
    if not path.exists():
        _make_local_key(Path(state_dir), institution)
    try:
        return load_private_key(path.read_bytes())
    except (OSError, ReportError) as exc:
        raise FerryError(
            f"{path} is unusable ({exc}): it signs this institution's privacy reports; "
            "restore it from backup (a new key breaks the chain an auditor checks)"
        ) from None


def _make_local_key(state_dir: Path, institution: str) -> None:
    """A fresh P-384 key (OpenSSH, 0600) and its public half, never replacing an existing key.

    Safe against concurrent makers (threads or processes): each writes its key under a unique
    temporary name and hard-links it to the final name, which succeeds for the first only;
    every maker then writes the public half *of the key that won* (derived from it), so the
    pair on disk always matches and every caller loads the same key."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    private_dir(state_dir)
    final = state_dir / LOCAL_KEY
    try:  # never overwrite: the first maker wins
        write_atomic(final, private, mode=PRIVATE_FILE, exclusive=True)
    except FileExistsError:
        pass
    try:
        winner = load_private_key(final.read_bytes())
    except (OSError, ReportError):
        return  # a damaged key file: signing_key names it and the fix
    public = public_key_text(winner.public_key()) + f" ferry-{institution}\n".encode()
    pub = state_dir / LOCAL_PUB
    if not pub.is_file() or pub.read_bytes() != public:
        write_atomic(pub, public, mode=0o644)


def report_fields(report: dict) -> dict:
    """The signed fields of a client's report dict; other keys go to ``extra``."""
    out: dict = {"extra": {}}
    for key, value in report.items():
        if key in (REPLY_BODY, REPLY_SIGNATURE):
            continue
        if key in _FIELDS:
            out[_FIELDS[key]] = value
        else:
            out["extra"][key] = value
    eps = out.get("epsilon")
    if isinstance(eps, float) and not math.isfinite(eps):
        out["epsilon"] = None  # unbounded (a round without noise)
    out.setdefault("budget_epsilon", None)
    out.setdefault("budget_delta", None)
    return out


def sign_and_keep(
    state_dir: Path, institution: str, report: dict, key_path: Path | None = None
) -> dict[str, str]:
    """Sign ``report`` (the reply's report dict), append it to the receipt chain and return
    the reply's ``{"signed-report": body, "signature": ...}``. Raises :class:`FerryError`
    when it cannot be written (then nothing may be released)."""
    key = signing_key(state_dir, institution, key_path)
    path = Path(state_dir) / RECEIPTS_FILE
    try:
        private_dir(path.parent)
        with os.fdopen(open_private(path, os.O_RDWR | os.O_APPEND), "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # one chain: concurrent rounds take turns
            f.seek(0)
            data = f.read()
            if data and not data.endswith(b"\n"):  # a crash mid-append: never released
                data = data[: data.rfind(b"\n") + 1]
                f.truncate(len(data))
            receipts, problems = read_receipts(data)
            if problems:
                raise FerryError(
                    f"{path}: {problems[0]}: the receipt chain is damaged; restore it from "
                    "backup before training again"
                )
            prev = receipts[-1].digest if receipts else GENESIS
            fields = report_fields(report)
            try:
                signed = sign(
                    PrivacyReport(**fields, prev_report=prev, signer=fingerprint(key.public_key())),
                    key,
                )
            except (TypeError, ValueError) as exc:
                raise FerryError(
                    f"{institution}'s privacy report cannot be signed ({exc})"
                ) from None
            f.write(json.dumps(signed.to_json(), sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise FerryError(
            f"cannot write the receipt chain {path} ({exc.strerror}): the round is not "
            "released; give a writable --state-dir"
        ) from None
    return {REPLY_BODY: signed.body, REPLY_SIGNATURE: signed.signature}
