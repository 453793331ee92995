"""``ferry audit``: check a run's privacy ledger without trusting the server that wrote it.

Input: a run directory holding ``ledger.jsonl``, or the ledger file; the institutions' public
keys (``--keys``; a simulation's are found in the run); optionally institutions' receipt
chains (``--receipts``). Nothing is released: the report is computed from these alone.

1. Verify the hash chain and the head file (:func:`server.ledger.read_ledger`). A broken chain
   is reported with the line where it breaks, and nothing in the ledger is trusted further.
2. Verify each ``client_trained`` record's signed report with its institution's public key
   (:mod:`server.audit_signatures`): forged, altered, unsigned, moved, dropped or reordered
   reports are findings, and so is a server field that contradicts what was signed. Every
   number the audit checks or replays comes from an authentic signed report, never from the
   server's fields. Without any key the audit cannot pass.
3. Check each report's own consistency (q = 1/ceil(n/B), steps = epochs * ceil(n/B), the
   DpEvent against sigma/q/steps, plausible ranges): hostile numbers are findings.
4. Replay each institution's reports, in ledger order, with Google ``dp-accounting``'s PLD
   (:mod:`server.audit_replay`; clients report Opacus PRV, so the replay shares no accounting
   code with them), cross-checked by RDP.
5. Flag each institution, with a tolerance of :data:`TOLERANCE` (relative; both PRV and the
   pessimistic PLD bound the true epsilon from above, and the replay is kept within ~0.25 %
   of a fine PLD, so an honest PRV report never falls 1 % below it): *under-reported*,
   *budget overrun* (replayed or reported epsilon above ``budget_epsilon``, or ``delta``
   above ``budget_delta``), *non-Poisson sampling*, *missing round* (a gap in the client's
   own round count), *mechanism mismatch*, *inconsistent report*, *malformed record*,
   *not replayable* and *accountants disagree* (PLD above RDP), plus the signature findings,
   *key conflict* (a key file claiming another institution's name, or two keys for one) and
   *report missing* (:mod:`server.audit_presence`: an institution a participants list, a
   backbone shipment, a drop while training or a trusted key names, without its report).

What a PASS cannot show, it says: with keys found in the run directory (no ``--keys``), that
the signatures are only self-consistent (:data:`SELF_CONSISTENT`); without ``--receipts``,
that a report dropped from the end of a chain, or an institution left out with every trace,
goes unseen (:data:`NO_RECEIPTS`). Both stay exit 0 for an honest run, in the text and JSON.

A ledger whose first report for an institution is client round N > 1 lacks that
institution's earlier history (it trained in earlier runs): its replay is a lower bound, so
it is marked *partial* and only definite findings are flagged. Exit codes of
:func:`run_audit`: 0 clean, 1 violation, tampering or no keys, 2 unreadable input.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.server import audit_signatures as sigs
from ferry.server.audit_checks import (
    MALFORMED,
    TOLERANCE,
    UNREPLAYABLE,
    InstitutionAudit,
    TrainedRecord,
    check_institution,
    trained_record,
)
from ferry.server.audit_presence import REPORT_MISSING, missing_reports
from ferry.server.audit_render import render, write_plot
from ferry.server.audit_replay import PLD_INTERVAL, ReplayFailure, replay_all, replay_description
from ferry.server.ledger import HEAD_FILE, LEDGER_FILE, LedgerError, read_ledger

PLOT_FILE = "audit_epsilon.png"
# What a verdict says the audit could not see, so that a PASS never claims more than it checked.
SELF_CONSISTENT = (
    "signatures are self-consistent; the keys were found in the run directory written by the "
    "operator, so they do not show who signed: give --keys from the institutions for an "
    "independent check"
)
NO_RECEIPTS = (
    "a report dropped from the end of an institution's chain, or an institution left out "
    "entirely, is visible only with --receipts"
)


class AuditInputError(FerryError):
    """The input is not a ledger the audit can read (exit code 2)."""


@dataclass
class AuditReport:
    ledger: Path
    records: int = 0
    head_hash: str = ""
    institutions: list[InstitutionAudit] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    tampered: str | None = None  # the one-line reason the chain is not trusted
    signatures: str = ""  # which keys verified the reports
    keyless: str | None = None  # why no signature could be verified at all
    keys_in_run: bool = False  # the keys came from the run directory, not from --keys
    not_checked: list[str] = field(default_factory=list)  # what only --receipts would show
    receipts_checked: list[str] = field(default_factory=list)  # institutions cross-checked
    tolerance: float = TOLERANCE

    @property
    def violations(self) -> Counter:
        return Counter(f for inst in self.institutions for f in inst.flags)

    @property
    def ok(self) -> bool:
        return self.tampered is None and self.keyless is None and not self.violations

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def verdict(self) -> str:
        if self.tampered:
            return f"FAIL: ledger chain broken: {self.tampered}"
        if self.keyless:
            return f"FAIL: {self.keyless}"
        n = len(self.institutions)
        if self.violations:
            bad = sum(1 for inst in self.institutions if inst.flags)
            kinds = ", ".join(f"{k} ({c})" for k, c in self.violations.most_common())
            return f"FAIL: {bad} of {n} institutions in violation: {kinds}"
        partial = sum(1 for inst in self.institutions if inst.partial)
        signed = "" if self.keys_in_run else "signatures verified with the given keys, "
        receipts = (
            f", receipts of {len(self.receipts_checked)} institution(s) match the ledger"
            if self.receipts_checked
            else ""
        )
        return (
            f"PASS: chain intact ({self.records} records), {signed}"
            f"{n} institutions replayed, no violation{receipts}"
            + (f" ({partial} partial: earlier history not in this ledger)" if partial else "")
            + "".join(f"; {c}" for c in self.caveats())
        )

    def caveats(self) -> list[str]:
        """What a PASS does not show: who signed (keys from the run), and what only the
        institutions' receipts would show."""
        return ([SELF_CONSISTENT] if self.keys_in_run else []) + [
            f"not checked: {n}" for n in self.not_checked
        ]

    def to_json(self) -> dict:
        def num(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None  # JSON has no inf/nan

        return {
            "ledger": str(self.ledger),
            "records": self.records,
            "chain": "broken" if self.tampered else "intact",
            "tampered": self.tampered,
            "signatures": self.signatures,
            "keys": "found in the run directory" if self.keys_in_run else "given (--keys)",
            "signature_check": SELF_CONSISTENT
            if self.keys_in_run
            else "independent: verified with the keys the auditor gave",
            "receipts_checked": self.receipts_checked,
            "not_checked": self.not_checked,
            "keyless": self.keyless,
            "events": dict(self.events),
            "replay": replay_description(),
            "tolerance": TOLERANCE,
            "warnings": self.warnings,
            "institutions": [
                {
                    "institution": i.institution,
                    "rounds": i.rounds,
                    "steps": i.steps,
                    "epsilon_reported": num(i.epsilon_reported),
                    "epsilon_replayed_pld": num(i.epsilon_replayed),
                    "epsilon_rdp": num(i.epsilon_rdp),
                    "budget_epsilon": i.budget_epsilon,
                    "budget_delta": i.budget_delta,
                    "delta": i.delta,
                    "partial": i.partial,
                    "status": i.status,
                    "flags": i.flags,
                    "details": i.details,
                    "pld_interval": num(i.pld_interval),
                }
                for i in self.institutions
            ],
            "violations": dict(self.violations),
            "verdict": self.verdict(),
            "exit_code": self.exit_code,
        }


def _ledger_file(path: Path) -> Path:
    if path.is_dir():
        path = path / LEDGER_FILE
    if not path.exists():
        if path.with_name(HEAD_FILE).exists() and path.name == LEDGER_FILE:
            return path  # the head says records existed: read_ledger's error is tampering
        raise AuditInputError(
            f"{path} does not exist: give a run directory holding {LEDGER_FILE}, or the file"
        )
    return path


def _not_a_ledger(path: Path) -> bool:
    """True when line 1 is a JSON object without the chain's fields (some other JSON Lines)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "seq" not in first and "prev" not in first


@dataclass
class _Institution:
    """What the audit gathers for one institution while reading the ledger."""

    records: list[TrainedRecord] = field(default_factory=list)
    chain: list[tuple] = field(default_factory=list)  # (line, round, digest, report)
    findings: dict[str, list[str]] = field(default_factory=dict)  # kind -> where: detail
    dropped: list[int] = field(default_factory=list)

    def find(self, kind: str, line: int, record_round: object, detail: str) -> None:
        where = f"line {line}" + (
            f" (round {record_round})" if isinstance(record_round, int) else ""
        )
        self.findings.setdefault(kind, []).append(f"{where}: {detail}")


def _read(report: AuditReport, ledger: Path):
    """The verified chain's records, or None when the report says why there are none."""
    head = ledger.with_name(HEAD_FILE)
    try:
        contents = read_ledger(ledger)
    except LedgerError as exc:
        if head.exists() and not ledger.exists():
            report.tampered = f"{ledger.name} is missing but {HEAD_FILE} records a chain"
        elif head.exists() and ledger.is_file() and not ledger.stat().st_size:
            report.tampered = f"{ledger.name} is empty but {HEAD_FILE} records a chain"
        elif exc.tampered and not (exc.line == 1 and _not_a_ledger(ledger)):
            report.tampered = str(exc)
        else:
            raise AuditInputError(str(exc)) from None
        return None
    except (ValueError, AttributeError, OSError) as exc:  # read_ledger leaves a bad head raw
        report.tampered = f"{HEAD_FILE} is unreadable ({exc}): the last record cannot be verified"
        return None
    report.records, report.head_hash = len(contents.records), contents.head_hash
    if contents.head_behind:
        report.warnings.append(
            f"{HEAD_FILE} is one record behind line {report.records}: the server stopped "
            "between writing that record and updating the head (or the line was appended "
            "afterwards); the chain up to it verifies"
        )
    if contents.incomplete_tail is not None:
        report.warnings.append(
            f"line {report.records + 1} is incomplete (a crash mid-write?) and was ignored: "
            f"{contents.incomplete_tail[:60]!r}"
        )
    return contents.records


def audit_ledger(
    path: str | os.PathLike,
    keys: list[str | os.PathLike] | None = None,
    receipts: list[str | os.PathLike] | None = None,
) -> AuditReport:
    """Verify, replay and check the ledger at ``path`` (a run directory or the file).

    ``keys``: public key files or directories (default: the run's client state root);
    ``receipts``: institutions' state directories (or their root) to cross-check. Raises
    :class:`AuditInputError` (exit 2) when the input is not a readable ledger; a broken
    chain is a report with ``tampered`` set (exit 1)."""
    ledger = _ledger_file(Path(path))
    report = AuditReport(ledger)
    records = _read(report, ledger)
    if records is None:
        return report
    ring = sigs.load_keys([Path(k) for k in keys]) if keys else sigs.discover_keys(ledger.parent)
    report.signatures = _describe(ring)
    report.keys_in_run = ring.found_in_run
    report.warnings += ring.problems
    if not ring.keys:
        report.keyless = (
            f"no public keys to verify the institutions' signed reports ({ring.source}): "
            "give --keys DIR with their NAME.pub files (`ferry certs`)"
        )
    run_id = next((r.get("run_id") for r in records if r.get("event") == "run_started"), None)
    gathered: dict[str, _Institution] = {}
    for name, detail in ring.conflicts:  # a key claiming a name is a finding, never a warning
        gathered.setdefault(name, _Institution()).findings.setdefault(sigs.KEY_CONFLICT, []).append(
            detail
        )
    self_audited = set()
    for line, record in enumerate(records, start=1):
        report.events[str(record.get("event"))] += 1
        name = str(record.get("institution"))
        if record.get("event") == "client_dropped" and record.get("stage") == "train":
            gathered.setdefault(name, _Institution()).dropped.append(line)
        if record.get("event") != "client_trained":
            continue
        inst = gathered.setdefault(name, _Institution())
        rnd = record.get("round")
        verified = sigs.verify_record(record, ring)
        for kind, detail in verified.findings:
            inst.find(kind, line, rnd, detail)
        if verified.authentic:
            inst.chain.append((line, rnd, verified.digest, verified.report))
        signed = verified.report
        if signed is None:
            continue
        if signed.accountant_library.startswith("dp-accounting"):
            self_audited.add(name)
        try:
            inst.records.append(trained_record(signed, line))
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            inst.find(MALFORMED, line, rnd, str(exc))
    if self_audited:
        report.warnings.append(
            f"{len(self_audited)} institution(s) report with dp-accounting, the audit's own "
            "library: for them only the RDP cross-check is independent"
        )
    this_run = run_id if isinstance(run_id, str) else None
    for inst in gathered.values():
        ids = this_run or next((rep.run_id for *_, rep in inst.chain if rep), "")
        for line, kind, detail in sigs.chain_findings(inst.chain, ids):
            inst.find(kind, line, None, detail)
    missing, notes = missing_reports(records, ring.keys, ring.source)
    for name, details in missing.items():
        gathered.setdefault(name, _Institution()).findings.setdefault(REPORT_MISSING, []).extend(
            details
        )
    report.warnings += notes
    covered: set[str] = set()
    if receipts:
        covered = _cross_check(report, gathered, ring, [Path(p) for p in receipts], this_run or "")
    report.receipts_checked = sorted(covered)
    _replay_and_flag(report, gathered)
    unchecked = sorted({i.institution for i in report.institutions} - covered - set(missing))
    if not receipts:
        report.not_checked.append(NO_RECEIPTS)
    elif unchecked:
        report.not_checked.append(
            f"no receipts were given for {', '.join(unchecked)}: a report dropped from the "
            "end of their chains is visible only with their receipts (--receipts)"
        )
    if not any(r.get("event") == "client_trained" for r in records):
        report.warnings.append("no client_trained record: nothing to replay")
    return report


def _describe(ring: sigs.KeyRing) -> str:
    if not ring.keys:
        return f"no keys ({ring.source})"
    text = f"{len(ring.keys)} public key(s) from {ring.source}"
    if ring.found_in_run:
        text += f": {SELF_CONSISTENT}"
    return text


def _cross_check(report, gathered, ring, paths: list[Path], run_id: str) -> set[str]:
    """Flag receipts that differ from the ledger; return the institutions cross-checked."""
    in_ledger = {
        name: {dig: line for line, _, dig, _ in inst.chain} for name, inst in gathered.items()
    }  # authentic reports only: a forged one is no institution's receipt
    found, problems, covered = sigs.receipt_findings(paths, ring, in_ledger, run_id)
    report.warnings += problems
    for name, details in found.items():
        inst = gathered.setdefault(name, _Institution())
        inst.findings.setdefault(sigs.RECEIPTS, []).extend(details)
    return covered


def _replay_and_flag(report: AuditReport, gathered: dict[str, _Institution]) -> None:
    histories = {
        name: (tuple(r.segment for r in g.records), tuple(r.delta for r in g.records))
        for name, g in gathered.items()
        if g.records
    }
    results = replay_all(set(histories.values()))
    for name, g in gathered.items():
        if not g.records and not g.findings:
            continue  # only client_dropped records: nothing was reported
        result = results.get(histories.get(name))
        if isinstance(result, ReplayFailure) or result is None:
            nan = [math.nan] * len(g.records)
            inst = InstitutionAudit(name, g.records, nan, math.nan, PLD_INTERVAL)
        else:
            curve, interval, rdp = result
            inst = InstitutionAudit(name, g.records, curve, rdp, interval)
        for kind, where in g.findings.items():  # the records' own findings first
            inst.flag(kind, where)
        if isinstance(result, ReplayFailure):
            first = g.records[0].line
            inst.flag(UNREPLAYABLE, [f"its reports from line {first} on: {result.reason}"])
        check_institution(inst, g.dropped)
        if inst.partial:
            first = inst.records[0]
            inst.details.append(
                f"{name}: partial: its first record here (line {first.line}) is client round "
                f"{first.client_rounds}; earlier rounds are not in this ledger, so the replay "
                "is a lower bound and only definite under-reports and overruns are flagged"
            )
        report.institutions.append(inst)


# -- command ---------------------------------------------------------------------------------


def run_audit(
    path: str | os.PathLike,
    as_json: bool = False,
    plot: bool = True,
    keys: list[str] | None = None,
    receipts: list[str] | None = None,
) -> int:
    """``ferry audit``: print the report (table or one JSON object); return the exit code."""
    try:
        report = audit_ledger(path, keys=keys, receipts=receipts)
    except AuditInputError as exc:
        print(f"ferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if report.tampered:
        print(json.dumps(report.to_json(), indent=2) if as_json else report.verdict())
        return report.exit_code
    plot_note = None
    if plot and report.institutions:
        plot_note = write_plot(report, report.ledger.with_name(PLOT_FILE))
    if as_json:
        print(json.dumps({**report.to_json(), "plot": plot_note}, indent=2))
    else:
        print(render(report))
        if plot_note:
            print(plot_note)
        print(report.verdict())
    return report.exit_code
