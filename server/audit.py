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
   *not replayable* and *accountants disagree* (PLD above RDP), plus the signature findings.

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

from common.errors import FerryError
from common.privacy.accounting import MechanismSegment
from common.privacy.report import PrivacyReport, digest
from server import audit_signatures as sigs
from server.audit_render import render, write_plot
from server.audit_replay import PLD_INTERVAL, ReplayFailure, mechanism, replay_all
from server.audit_replay import replay_description as replay_description
from server.ledger import HEAD_FILE, LEDGER_FILE, LedgerError, read_ledger

# Relative. Honest PRV reports sit above the replay (Opacus reports the top of its error
# bound), so the tolerance only absorbs the replay's own discretization (< 0.5 %).
TOLERANCE = 0.01
PLOT_FILE = "audit_epsilon.png"
# Beyond these a report is not a round anyone ran (1e9 steps is weeks of a GPU per round).
MAX_STEPS, MAX_EXAMPLES, MAX_EPOCHS = 10**9, 10**12, 10**6

UNDER, OVERRUN, NON_POISSON, MISSING = (
    "under-reported",
    "budget overrun",
    "non-Poisson sampling",
    "missing round",
)
MISMATCH, MALFORMED, DISAGREE = "mechanism mismatch", "malformed record", "accountants disagree"
INCONSISTENT, UNREPLAYABLE = "inconsistent report", "not replayable"


class AuditInputError(FerryError):
    """The input is not a ledger the audit can read (exit code 2)."""


@dataclass(frozen=True)
class TrainedRecord:
    """One authentic signed report of a ``client_trained`` record, as the audit replays it."""

    line: int
    round: int | None
    client_rounds: int | None
    segment: MechanismSegment  # sigma 0: a round without noise (epsilon infinite)
    delta: float
    epsilon_reported: float | None
    budget_epsilon: float | None
    budget_delta: float | None
    sampling: str
    mechanism: str  # the DpEvent's shape, e.g. "PoissonSampled(Gaussian) x10"
    poisson: bool
    mismatch: bool
    inconsistent: str = ""  # why q or steps do not follow from examples, batch and epochs


@dataclass
class InstitutionAudit:
    institution: str
    records: list[TrainedRecord]
    curve: list[float]  # cumulative replayed epsilon after each record (PLD)
    epsilon_rdp: float
    pld_interval: float
    flags: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def _last(self, name: str) -> float | None:
        return getattr(self.records[-1], name) if self.records else None

    rounds = property(lambda self: len(self.records))
    steps = property(lambda self: sum(r.segment.steps for r in self.records))
    epsilon_replayed = property(lambda self: self.curve[-1] if self.curve else math.nan)
    epsilon_reported = property(lambda self: self._last("epsilon_reported"))
    budget_epsilon = property(lambda self: self._last("budget_epsilon"))
    budget_delta = property(lambda self: self._last("budget_delta"))
    delta = property(lambda self: self._last("delta"))
    partial = property(lambda self: bool(self.records) and (self.records[0].client_rounds or 1) > 1)

    @property
    def status(self) -> str:
        return ", ".join(self.flags) or ("partial" if self.partial else "ok")

    def points(self) -> list[tuple[float, float]]:
        """(round, cumulative replayed epsilon) per record, for the plot."""
        return [
            (r.round if r.round is not None else i + 1, e)
            for i, (r, e) in enumerate(zip(self.records, self.curve, strict=True))
        ]

    def flag(self, kind: str, where: list[str]) -> None:
        if kind not in self.flags:
            self.flags.append(kind)
        more = f" (and {len(where) - 1} more records)" if len(where) > 1 else ""
        self.details.append(f"{self.institution}: {kind}: {where[0]}{more}")


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
        return (
            f"PASS: chain intact ({self.records} records), signatures verified, "
            f"{n} institutions replayed, no violation"
            + (f" ({partial} partial: earlier history not in this ledger)" if partial else "")
        )

    def to_json(self) -> dict:
        def num(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None  # JSON has no inf/nan

        return {
            "ledger": str(self.ledger),
            "records": self.records,
            "chain": "broken" if self.tampered else "intact",
            "tampered": self.tampered,
            "signatures": self.signatures,
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


# -- reading ---------------------------------------------------------------------------------


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


def _trained(report: PrivacyReport, line: int) -> TrainedRecord:
    """The replayable form of an authentic report; ValueError names what is impossible.
    Ranges are checked before any arithmetic, so no number can overflow it."""
    r = report
    limits = [
        ("steps", r.steps, 0, MAX_STEPS),
        ("examples", r.examples, 1, MAX_EXAMPLES),
        ("batch_size", r.batch_size, 1, MAX_EXAMPLES),
        ("local_epochs", r.local_epochs, 1, MAX_EPOCHS),
        ("client_rounds", r.client_rounds, 1, MAX_STEPS),
        ("round", r.round, 0, MAX_STEPS),
    ]
    for name, value, low, high in limits:
        if not low <= value <= high:
            raise ValueError(f"{name} {value:.3g} is outside [{low}, {high:g}]")
    if not (r.noise_multiplier >= 0 and 0 <= r.sample_rate <= 1 and 0 < r.delta < 1):
        raise ValueError(
            f"impossible mechanism (sigma {r.noise_multiplier:g}, q {r.sample_rate:g}, "
            f"delta {r.delta:g})"
        )
    for name, value in (("epsilon", r.epsilon), ("budget_epsilon", r.budget_epsilon)):
        if value is not None and value < 0:
            raise ValueError(f"{name} {value:g} is negative")
    if r.budget_delta is not None and not 0 < r.budget_delta < 1:
        raise ValueError(f"budget_delta {r.budget_delta:g} is not in (0, 1)")
    seg, shape, poisson = mechanism(r.dp_event)
    stated = MechanismSegment(r.noise_multiplier, r.sample_rate, r.steps)
    if seg is not None and not (
        math.isfinite(seg.noise_multiplier)
        and seg.noise_multiplier >= 0
        and 0 <= seg.sample_rate <= 1
        and 0 <= seg.steps <= MAX_STEPS
    ):
        raise ValueError(f"impossible DpEvent {shape} ({seg})")
    mismatch = bool(
        seg
        and seg.steps
        and (
            seg.steps != stated.steps
            or not math.isclose(seg.noise_multiplier, stated.noise_multiplier, rel_tol=1e-9)
            or not math.isclose(seg.sample_rate, stated.sample_rate, rel_tol=1e-9)
        )
    )
    if seg is None or not poisson:  # non-Poisson or non-private: replayed from the fields
        seg = MechanismSegment(0.0 if seg else r.noise_multiplier, r.sample_rate, r.steps)
    inconsistent = ""
    if not r.non_private and r.steps:
        batches = -(-r.examples // r.batch_size)  # ceil, in integers: no overflow
        if not math.isclose(r.sample_rate, 1 / batches, rel_tol=1e-9):
            inconsistent = (
                f"q {r.sample_rate:.6g} but 1/ceil(n/B) = 1/ceil({r.examples}/{r.batch_size}) "
                f"= {1 / batches:.6g}"
            )
        elif r.steps != r.local_epochs * batches:
            inconsistent = f"steps {r.steps} but epochs * ceil(n/B) = {r.local_epochs} * {batches}"
    return TrainedRecord(
        line=line,
        round=r.round,
        client_rounds=r.client_rounds,
        segment=seg,
        delta=r.delta,
        epsilon_reported=r.epsilon,
        budget_epsilon=r.budget_epsilon,
        budget_delta=r.budget_delta,
        sampling=r.sampling,
        mechanism=shape,
        poisson=poisson and r.sampling == "poisson",
        mismatch=mismatch,
        inconsistent=inconsistent,
    )


# -- checks ----------------------------------------------------------------------------------


def _where(rec: TrainedRecord) -> str:
    return f"line {rec.line}" + (f" (round {rec.round})" if rec.round is not None else "")


def _check(inst: InstitutionAudit, dropped: list[int]) -> None:
    """Flag one replayed institution; ``dropped``: lines of its ``client_dropped`` at stage
    "train"."""
    found: dict[str, list[str]] = {}
    prev = None
    for rec, eps in zip(inst.records, inst.curve, strict=True):
        where = _where(rec)
        if not rec.poisson:
            found.setdefault(NON_POISSON, []).append(
                f"{where}: sampling {rec.sampling!r}, DpEvent {rec.mechanism}"
            )
        if rec.mismatch:
            found.setdefault(MISMATCH, []).append(f"{where}: DpEvent differs from sigma/q/steps")
        if rec.inconsistent:
            found.setdefault(INCONSISTENT, []).append(f"{where}: {rec.inconsistent}")
        if prev is not None and rec.client_rounds != prev.client_rounds + 1:
            why = [d for d in dropped if prev.line < d < rec.line]
            found.setdefault(MISSING, []).append(
                f"{where}: client_rounds {prev.client_rounds} -> {rec.client_rounds}"
                + (
                    f" (dropped at line {why[0]}: that round's spend is not in this ledger)"
                    if why
                    else ""
                )
            )
        reported = rec.epsilon_reported
        if reported is None and math.isfinite(eps):
            found.setdefault(UNDER, []).append(f"{where}: no epsilon reported")
        elif reported is not None and reported < eps * (1 - TOLERANCE):
            found.setdefault(UNDER, []).append(
                f"{where}: reports {reported:.4g}, replay gives {eps:.4g}"
            )
        worst = max(eps, reported if reported is not None else 0.0)
        if rec.budget_epsilon is not None and worst > rec.budget_epsilon * (1 + TOLERANCE):
            found.setdefault(OVERRUN, []).append(
                f"{where}: epsilon {worst:.4g} > budget {rec.budget_epsilon:g}"
            )
        if rec.budget_delta is not None and rec.delta > rec.budget_delta * (1 + 1e-9):
            found.setdefault(OVERRUN, []).append(
                f"{where}: delta {rec.delta:g} > budget delta {rec.budget_delta:g}"
            )
        prev = rec
    if inst.curve and inst.curve[-1] > inst.epsilon_rdp * (1 + TOLERANCE):
        found.setdefault(DISAGREE, []).append(
            f"PLD replay {inst.curve[-1]:.4g} above the RDP bound {inst.epsilon_rdp:.4g}: "
            "replay not trusted"
        )
    for kind, where in found.items():
        inst.flag(kind, where)


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
    report.warnings += ring.problems
    if not ring.keys:
        report.keyless = (
            f"no public keys to verify the institutions' signed reports ({ring.source}): "
            "give --keys DIR with their NAME.pub files (`ferry certs`)"
        )
    run_id = next((r.get("run_id") for r in records if r.get("event") == "run_started"), None)
    gathered: dict[str, _Institution] = {}
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
        signed, findings = sigs.verify_record(record, ring)
        for kind, detail in findings:
            inst.find(kind, line, rnd, detail)
        if signed is None:
            continue
        if signed.accountant_library.startswith("dp-accounting"):
            self_audited.add(name)
        body = record["signed_report"]["body"]
        inst.chain.append((line, rnd if isinstance(rnd, int) else None, digest(body), signed))
        try:
            inst.records.append(_trained(signed, line))
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            inst.find(MALFORMED, line, rnd, str(exc))
    if self_audited:
        report.warnings.append(
            f"{len(self_audited)} institution(s) report with dp-accounting, the audit's own "
            "library: for them only the RDP cross-check is independent"
        )
    this_run = run_id if isinstance(run_id, str) else None
    for inst in gathered.values():
        ids = this_run or next((rep.run_id for *_, rep in inst.chain), "")
        for line, kind, detail in sigs.chain_findings(inst.chain, ids):
            inst.find(kind, line, None, detail)
    if receipts:
        _cross_check(report, gathered, ring, [Path(p) for p in receipts], this_run or "")
    _replay_and_flag(report, gathered)
    if not any(r.get("event") == "client_trained" for r in records):
        report.warnings.append("no client_trained record: nothing to replay")
    return report


def _describe(ring: sigs.KeyRing) -> str:
    if not ring.keys:
        return f"no keys ({ring.source})"
    text = f"{len(ring.keys)} public key(s) from {ring.source}"
    if ring.found_in_run:
        text += (
            "; found in the run directory, so they show what the simulation's clients signed "
            "(give --keys with keys you hold to check a deployment)"
        )
    return text


def _cross_check(report, gathered, ring, paths: list[Path], run_id: str) -> None:
    in_ledger = {
        name: {dig: line for line, _, dig, _ in inst.chain} for name, inst in gathered.items()
    }
    found, problems = sigs.receipt_findings(paths, ring, in_ledger, run_id)
    report.warnings += problems
    for name, details in found.items():
        inst = gathered.setdefault(name, _Institution())
        inst.findings.setdefault(sigs.RECEIPTS, []).extend(details)


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
            if result is not None:
                inst.flag(UNREPLAYABLE, [f"lines {g.records[0].line}-: {result.reason}"])
        else:
            curve, interval, rdp = result
            inst = InstitutionAudit(name, g.records, curve, rdp, interval)
        _check(inst, g.dropped)
        for kind, where in g.findings.items():
            inst.flag(kind, where)
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
