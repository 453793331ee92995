"""The audit's signature checks: whose key signed each report, and what the server changed.

Keys (public only) come from ``ferry audit --keys`` (a directory of ``NAME.pub`` files as
``ferry certs`` writes them, a client state root holding ``NAME/report-signing.pub``, or one
such file), or, without ``--keys``, from the run's own client state root (``<run>/clients``,
where a simulation's virtual institutions keep their keys). Keys found in the run directory
were put there by whoever wrote the run, who can replace them and re-sign: they show that the
signatures are self-consistent, not who signed; the audit says so in its verdict.

A key's institution is named by its file only: ``NAME.pub``, or the state directory of
``NAME/report-signing.pub``. A key whose OpenSSH comment (``ferry-OTHER``) names another
institution, or a second, different key for one name, is a *key conflict*: a finding (the
audit fails), never a warning, and the conflicting file's key is not used.

Findings (kind, one line each) for one ``client_trained`` record:

* *missing signature*: the record holds no signed report;
* *forged or altered report*: the signature does not verify with the institution's key
  (altered after signing), or the report names another signer (forged with another key);
* *no public key*: the institution has no key among those given;
* *report moved*: the signed run id or round is not the ledger's;
* *report chain broken*: the report does not name the institution's previous report in this
  ledger (one was dropped, inserted or reordered), or its rounds go backwards;
* *server contradicts report*: the ledger's unsigned fields differ from the signed ones;
* *receipts differ*: ``--receipts`` holds a report of this run the ledger lacks, or the
  ledger holds one the institution never kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from ferry.common.privacy.report import (
    RECEIPTS_FILE,
    PrivacyReport,
    ReportError,
    SignedReport,
    fingerprint,
    load_public_key,
    read_receipts,
    verify,
)

LOCAL_PUB = "report-signing.pub"  # a state directory's own report key (client.receipts)
CLIENT_STATE_DIR = "clients"  # a simulation's client state root, inside the run directory

UNSIGNED, FORGED, NO_KEY = "missing signature", "forged or altered report", "no public key"
MOVED, CHAIN, CONTRADICTS = "report moved", "report chain broken", "server contradicts report"
RECEIPTS, KEY_CONFLICT = "receipts differ", "key conflict"


@dataclass
class KeyRing:
    """Institution name -> public key, and where they came from. ``conflicts``: (institution,
    detail) for each key file that claims another institution's name or a second key for
    one; each is a finding. ``problems``: unreadable files (warnings)."""

    keys: dict[str, ec.EllipticCurvePublicKey] = field(default_factory=dict)
    source: str = ""
    found_in_run: bool = False  # keys from the run directory, not from the auditor
    problems: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # institution -> its key file

    def add_file(self, path: Path) -> None:
        try:
            key, comment = load_public_key(path.read_bytes())
        except (OSError, ReportError) as exc:
            self.problems.append(f"{path}: {exc}")
            return
        # The file names the institution; a comment is whatever its writer typed.
        name = path.parent.name if path.name == LOCAL_PUB else path.name.removesuffix(".pub")
        claimed = comment.split()[0].removeprefix("ferry-") if comment.startswith("ferry-") else ""
        if claimed and claimed != name:
            self.conflicts.append(
                (
                    claimed,
                    f"key file {path} says it is ferry-{claimed}, but its file names {name}: "
                    f"not used (a key counts as {claimed}'s only as {claimed}.pub or "
                    f"{claimed}/{LOCAL_PUB})",
                )
            )
            return
        known = self.keys.get(name)
        if known is not None and fingerprint(known) != fingerprint(key):
            self.conflicts.append(
                (
                    name,
                    f"key files {self.files[name]} and {path} hold two different keys for "
                    f"{name}: the second is not used; give only the key {name} handed over",
                )
            )
            return
        self.keys[name] = key
        self.files.setdefault(name, path)


def load_keys(paths: list[Path]) -> KeyRing:
    """The keys in ``paths`` (see the module docstring); unreadable files are problems."""
    ring = KeyRing(source=", ".join(str(p) for p in paths))
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.pub")) + sorted(path.glob(f"*/{LOCAL_PUB}"))
            if not files:
                ring.problems.append(f"{path} holds no NAME.pub or NAME/{LOCAL_PUB} file")
            for file in files:
                ring.add_file(file)
        elif path.is_file():
            ring.add_file(path)
        else:
            ring.problems.append(f"{path} does not exist")
    return ring


def discover_keys(run_dir: Path) -> KeyRing:
    """The keys a simulation left in its client state root (``<run>/clients``)."""
    root = run_dir / CLIENT_STATE_DIR
    ring = KeyRing(source=f"{root} (the run's client state root)", found_in_run=True)
    for file in sorted(root.glob(f"*/{LOCAL_PUB}")) if root.is_dir() else []:
        ring.add_file(file)
    return ring


@dataclass
class Verified:
    """One record's signed report: ``authentic`` when the institution's key signed these
    bytes; ``report`` when it is also readable; ``findings`` as (kind, detail)."""

    authentic: bool = False
    report: PrivacyReport | None = None
    digest: str = ""
    findings: list[tuple[str, str]] = field(default_factory=list)


def verify_record(record: dict, ring: KeyRing) -> Verified:
    """Verify one ``client_trained`` record's signed report with its institution's key."""
    name = str(record.get("institution"))
    try:
        signed = SignedReport.from_json(record.get("signed_report"))
    except ReportError as exc:
        return Verified(findings=[(UNSIGNED, str(exc))])
    key = ring.keys.get(name)
    if key is None:
        where = ring.source or "no key source"
        return Verified(findings=[(NO_KEY, f"no public key for {name} in {where}")])
    if not verify(signed, key):
        claimed = _claimed_signer(signed.body)
        if claimed is not None and claimed != fingerprint(key):
            why = f"signed by a key that is not {name}'s (signer {claimed[:16]}...)"
        else:
            why = f"the signature does not verify with {name}'s key: altered after signing"
        return Verified(findings=[(FORGED, why)])
    out = Verified(authentic=True, digest=signed.digest)
    try:
        report = PrivacyReport.from_body(signed.body)
    except ReportError as exc:  # the institution signed it: its own malformed report
        out.findings.append(("malformed record", f"signed but unreadable: {exc}"))
        return out
    if report.signer != fingerprint(key):
        out.findings.append((FORGED, f"signed with {name}'s key but names another signer"))
        return out
    out.report = report
    out.findings += [(CONTRADICTS, d) for d in contradictions(record, report)]
    return out


def _claimed_signer(body: str) -> str | None:
    try:
        signer = json.loads(body).get("signer")
    except (ValueError, AttributeError, RecursionError):
        return None
    return signer if isinstance(signer, str) else None


# ledger field -> report field: the server's copy must say what the institution signed
_COPIES = {
    "institution": "institution",
    "noise_multiplier": "noise_multiplier",
    "sample_rate": "sample_rate",
    "steps": "steps",
    "max_grad_norm": "max_grad_norm",
    "delta": "delta",
    "epsilon_spent": "epsilon",
    "epsilon_reported": "epsilon",  # its name in records written before epsilon_spent
    "client_rounds": "client_rounds",
    "budget_epsilon": "budget_epsilon",
    "budget_delta": "budget_delta",
    "sampling": "sampling",
    "accountant": "accountant",
    "dp_event": "dp_event",
    "examples": "examples",
}


def contradictions(record: dict, report: PrivacyReport) -> list[str]:
    """The ledger's unsigned fields that differ from the signed report (absent ones are
    not contradictions; a non-private round's epsilon is absent on both sides)."""
    out = []
    for ledger_key, attr in _COPIES.items():
        if ledger_key not in record:
            continue
        theirs, signed = record[ledger_key], getattr(report, attr)
        if attr == "epsilon" and report.non_private:
            continue
        if _same(theirs, signed):
            continue
        if attr == "dp_event":
            out.append("dp_event is not the DpEvent in the signed report")
        else:
            out.append(f"{ledger_key} {_short(theirs)} but the signed report says {_short(signed)}")
    return out


def _same(a: object, b: object) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except OverflowError:
            return a == b
    return a == b


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def chain_findings(entries: list[tuple], run_id: str):
    """Findings for one institution's authentic reports, in ledger order: entries are
    (line, the ledger's round, report digest, report or None when unreadable); yields
    (line, kind, detail)."""
    prev: tuple | None = None
    for line, ledger_round, dig, report in entries:
        if report is not None and report.run_id != run_id:
            yield line, MOVED, f"signed for run {report.run_id!r}, not this ledger's {run_id!r}"
        if report is not None and (type(ledger_round) is not int or report.round != ledger_round):
            stored = repr(ledger_round)[:20]
            yield line, MOVED, f"signed for round {report.round}, stored as round {stored}"
        if prev is not None and report is not None:
            before = prev[2]
            if report.prev_report != prev[1]:
                yield (
                    line,
                    CHAIN,
                    f"its previous report is not line {prev[0]}'s "
                    "(a report was dropped, inserted or reordered)",
                )
            elif before is not None and report.run_id == before.run_id:
                if report.round <= before.round:
                    yield line, CHAIN, f"round {report.round} after round {before.round}"
        prev = (line, dig, report)


def receipt_findings(
    paths: list[Path], ring: KeyRing, ledger: dict[str, dict[str, int]], run_id: str
) -> tuple[dict[str, list[str]], list[str], set[str]]:
    """Cross-check receipt chains with the ledger. ``ledger``: institution -> {report digest
    -> line}. Returns ({institution: details}, problems with the receipt files, the
    institutions whose receipts were checked: at least one receipt verified with its key)."""
    found: dict[str, list[str]] = {}
    problems: list[str] = []
    covered: set[str] = set()
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif (path / RECEIPTS_FILE).is_file():
            files.append(path / RECEIPTS_FILE)
        elif path.is_dir() and sorted(path.glob(f"*/{RECEIPTS_FILE}")):
            files += sorted(path.glob(f"*/{RECEIPTS_FILE}"))
        else:
            problems.append(f"{path}: no {RECEIPTS_FILE} there")
    for file in files:
        try:
            receipts, bad = read_receipts(file.read_bytes())
        except OSError as exc:
            problems.append(f"{file}: unreadable ({exc.strerror})")
            continue
        problems += [f"{file}: {b}" for b in bad]
        kept: dict[str, set[str]] = {}  # institution -> digests of this run's receipts
        for number, signed in enumerate(receipts, start=1):
            try:
                report = PrivacyReport.from_body(signed.body)
            except ReportError as exc:
                problems.append(f"{file}: receipt {number} is unreadable ({exc})")
                continue
            key = ring.keys.get(report.institution)
            if key is None or not verify(signed, key):
                problems.append(
                    f"{file}: receipt {number} does not verify with {report.institution}'s key"
                )
                continue
            kept.setdefault(report.institution, set())
            if report.run_id != run_id:
                continue
            kept[report.institution].add(signed.digest)
            if signed.digest not in ledger.get(report.institution, {}):
                found.setdefault(report.institution, []).append(
                    f"receipt {number} ({file.name}, round {report.round}) is missing from "
                    "the ledger"
                )
        covered.update(kept)
        for name, digests in kept.items():
            for dig, line in ledger.get(name, {}).items():
                if dig not in digests:
                    found.setdefault(name, []).append(
                        f"line {line}: a report {name} never kept in {file}"
                    )
    return found, problems, covered
