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

This module runs the steps; reading the ledger is :mod:`server.audit_input`'s, the result and
its verdict :mod:`server.audit_report`'s, the table and plot :mod:`server.audit_render`'s.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.server import audit_signatures as sigs
from ferry.server.audit_checks import (
    MALFORMED,
    UNREPLAYABLE,
    InstitutionAudit,
    TrainedRecord,
    check_institution,
    trained_record,
)
from ferry.server.audit_input import AuditInputError, ledger_file, read_verified
from ferry.server.audit_institution import (
    check_target,
    institution_audit,
    write_institution_report,
)
from ferry.server.audit_presence import REPORT_MISSING, missing_reports
from ferry.server.audit_render import render, write_plot
from ferry.server.audit_replay import PLD_INTERVAL, ReplayFailure, replay_all
from ferry.server.audit_report import NO_RECEIPTS, SELF_CONSISTENT, AuditReport

PLOT_FILE = "audit_epsilon.png"


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
    ledger = ledger_file(Path(path))
    report = AuditReport(ledger)
    records = read_verified(report, ledger)
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
    institution: str = "",
    institution_report: str = "",
) -> int:
    """``ferry audit``: print the report (table or one JSON object); return the exit code.
    ``institution`` and ``institution_report``: also write that institution's privacy
    report (:mod:`server.audit_institution`)."""
    if institution_report:
        if not institution:
            raise FerryError("--report needs --institution NAME: the report is one institution's")
        check_target(institution_report)
    try:
        report = audit_ledger(path, keys=keys, receipts=receipts)
    except AuditInputError as exc:
        print(f"ferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if institution:
        institution_audit(report, institution)  # an unknown name: one line, before output
    if institution_report and report.tampered:
        print(f"privacy report not written: the ledger is not trusted ({report.tampered})")
    elif institution_report:
        written = write_institution_report(report, institution, Path(institution_report))
        print(f"privacy report: {written}")
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
