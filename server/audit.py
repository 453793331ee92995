"""``ferry audit``: check a run's privacy ledger with an accountant the clients did not use.

Input: a run directory holding ``ledger.jsonl``, or the ledger file. Nothing is released: the
report is computed from the ledger alone. Steps:

1. Verify the hash chain and the head file (:func:`server.ledger.read_ledger`). A broken chain
   is reported with the line where it breaks, and nothing in the ledger is trusted further.
2. Replay each institution's ``client_trained`` records, in ledger order, with Google
   ``dp-accounting``'s privacy loss distributions (PLD, add-or-remove-one neighbours, the
   relation Opacus uses): the cumulative epsilon after every record, at that record's delta.
   Clients report Opacus PRV, so the replay shares no accounting code with them. The final
   epsilon is cross-checked with ``dp-accounting``'s RDP accountant, an upper bound that the
   PLD figure must not exceed.
3. Flag each institution, with a tolerance of :data:`TOLERANCE` (relative; both PRV and the
   pessimistic PLD bound the true epsilon from above, and the replay is kept within ~0.25 %
   of a fine PLD, so an honest PRV report never falls 1 % below it):
   *under-reported* (a reported epsilon below the replay), *budget overrun* (replayed or
   reported epsilon above ``budget_epsilon``, or ``delta`` above ``budget_delta``),
   *non-Poisson sampling* (``sampling`` is not "poisson" or the DpEvent is not a
   PoissonSampled Gaussian), *missing round* (a gap in ``client_rounds``), plus *mechanism
   mismatch* (the DpEvent contradicts the record's sigma/q/steps), *malformed record* and
   *accountants disagree* (PLD above RDP).

A ledger whose first record is client round N > 1 for an institution lacks that
institution's earlier history (it trained in earlier runs): its replay is a lower bound, so it
is marked *partial* and only definite findings (reported below the lower bound, overruns)
are flagged. Exit codes of :func:`run_audit`: 0 clean, 1 violation or tampering, 2 unreadable
input.

Above ~400 lines: the replay engine (PLD/RDP, memo, processes) would be its own module
(``server/audit_replay.py``) if this change could add one; the rest is parsing and output.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import FerryError
from common.privacy.accounting import MechanismSegment, compact_history
from common.privacy.dp_events import event_from_json
from server.ledger import HEAD_FILE, LEDGER_FILE, LedgerError, read_ledger

# Relative. Honest PRV reports sit above the replay (Opacus reports the top of its error
# bound), so the tolerance only absorbs the replay's own discretization (< 0.5 %, below).
TOLERANCE = 0.01
# PLD value discretization interval: 4e-3 (dp-accounting's default is 1e-4). On the audit
# benchmark (q 0.0014-0.16, sigma 0.4-3, 400-600 steps, epsilon 0.3-8) it stays within 0.31 %
# of the 1e-4 result and is ~25x faster; 3e-3 gives 0.18 % for 25 % more time. The error
# grows like interval**2 and is largest at small epsilon after many steps (15 % at 3e-3 for
# sigma 1.2, q 0.002, 500 steps), so every replay is checked against one at twice the
# interval (Richardson: error ~ (eps(2h) - eps(h)) / 3) and redone finer while that estimate
# exceeds PLD_ERROR_TARGET: the replay stays within ~0.5 % of a fine-grained PLD.
PLD_INTERVAL = 4e-3
PLD_ERROR_TARGET = 0.004
PLD_MIN_INTERVAL = 1e-5
# RDP orders: dp-accounting's default set has 99 fractional orders (1.1 to 10.9) whose series
# dominate its cost; a 0.25 grid halves it and loosens the bound by < 1 % (measured).
RDP_ORDERS = [1 + x / 4 for x in range(1, 45)] + list(range(13, 64)) + [128, 256, 512, 1024]
PLOT_FILE = "audit_epsilon.png"
PARALLEL_MIN_JOBS = 8  # fewer distinct histories than this: not worth starting processes

UNDER, OVERRUN, NON_POISSON, MISSING = (
    "under-reported",
    "budget overrun",
    "non-Poisson sampling",
    "missing round",
)
MISMATCH, MALFORMED, DISAGREE = "mechanism mismatch", "malformed record", "accountants disagree"


class AuditInputError(FerryError):
    """The input is not a ledger the audit can read (exit code 2)."""


@dataclass(frozen=True)
class TrainedRecord:
    """One ``client_trained`` record, as the audit replays it."""

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


@dataclass
class AuditReport:
    ledger: Path
    records: int = 0
    head_hash: str = ""
    institutions: list[InstitutionAudit] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    tampered: str | None = None  # the one-line reason the chain is not trusted

    @property
    def violations(self) -> Counter:
        return Counter(f for inst in self.institutions for f in inst.flags)

    @property
    def ok(self) -> bool:
        return self.tampered is None and not self.violations

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def verdict(self) -> str:
        if self.tampered:
            return f"FAIL: ledger chain broken: {self.tampered}"
        n = len(self.institutions)
        if self.violations:
            bad = sum(1 for inst in self.institutions if inst.flags)
            kinds = ", ".join(f"{k} ({c})" for k, c in self.violations.most_common())
            return f"FAIL: {bad} of {n} institutions in violation: {kinds}"
        partial = sum(1 for inst in self.institutions if inst.partial)
        return (
            f"PASS: chain intact ({self.records} records), {n} institutions replayed, "
            f"no violation"
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
                    "pld_interval": i.pld_interval,
                }
                for i in self.institutions
            ],
            "violations": dict(self.violations),
            "verdict": self.verdict(),
            "exit_code": self.exit_code,
        }


def replay_description() -> str:
    from importlib.metadata import version

    return (
        f"dp-accounting {version('dp-accounting')} PLD (add/remove one, interval "
        f"{PLD_INTERVAL:g}, finer where needed); RDP cross-check"
    )


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


def _mechanism(data: object) -> tuple[MechanismSegment | None, str, bool]:
    """(segment, shape, poisson) of a record's ``dp_event``; segment None if not replayable."""
    try:  # rounds repeat the same event: parse each distinct one once
        return _mechanism_of(json.dumps(data, sort_keys=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"dp_event is unreadable ({exc})") from None


@functools.lru_cache(maxsize=4096)
def _mechanism_of(text: str) -> tuple[MechanismSegment | None, str, bool]:
    from dp_accounting import dp_event as dpe

    try:
        event = event_from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError) as exc:
        return None, f"unreadable DpEvent ({exc})", False
    count = 1
    while isinstance(event, dpe.SelfComposedDpEvent):
        count, event = count * int(event.count), event.event
    inner = type(getattr(event, "event", None)).__name__.removesuffix("DpEvent")
    shape = (
        type(event).__name__.removesuffix("DpEvent")
        + (f"({inner})" if inner != "NoneType" else "")
        + f" x{count}"
    )
    if isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(
        event.event, dpe.GaussianDpEvent
    ):
        seg = MechanismSegment(
            float(event.event.noise_multiplier), float(event.sampling_probability), count
        )
        return seg, shape, True
    if isinstance(event, dpe.NonPrivateDpEvent):  # no parameters: nothing to contradict
        return MechanismSegment(0.0, 1.0, 0), shape, False
    return None, shape, False


def _float(record: dict, key: str, required: bool = True) -> float | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{key} is {value!r}, not a number")
    return float(value)


def _trained(record: dict, line: int) -> TrainedRecord:
    """Parse one ``client_trained`` record; ValueError names what is wrong."""
    seg, shape, poisson = _mechanism(record.get("dp_event"))
    fields = [record.get(k) for k in ("noise_multiplier", "sample_rate", "steps")]
    stated = None
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in fields):
        stated = MechanismSegment(float(fields[0]), float(fields[1]), int(fields[2]))
    mismatch = bool(
        seg
        and stated
        and seg.steps
        and (
            seg.steps != stated.steps
            or not math.isclose(seg.noise_multiplier, stated.noise_multiplier, rel_tol=1e-9)
            or not math.isclose(seg.sample_rate, stated.sample_rate, rel_tol=1e-9)
        )
    )
    if seg and not poisson and stated:  # NonPrivate: its steps are in the fields
        seg = MechanismSegment(0.0, stated.sample_rate, stated.steps)
    seg = seg or stated  # a non-Poisson event is replayed from its fields, for reference only
    if seg is None:
        raise ValueError(f"no replayable mechanism ({shape}, no sigma/q/steps fields)")
    sigma, q = seg.noise_multiplier, seg.sample_rate
    if not (math.isfinite(sigma) and sigma >= 0 and 0 <= q <= 1 and seg.steps >= 0):
        raise ValueError(f"impossible mechanism {seg}")
    delta = _float(record, "delta")
    if not 0 < delta < 1:
        raise ValueError(f"delta is {delta}, not in (0, 1)")
    client_rounds = record.get("client_rounds")
    return TrainedRecord(
        line=line,
        round=record.get("round") if isinstance(record.get("round"), int) else None,
        client_rounds=client_rounds if isinstance(client_rounds, int) else None,
        segment=seg,
        delta=delta,
        epsilon_reported=_float(record, "epsilon_reported", required=False),
        budget_epsilon=_float(record, "budget_epsilon", required=False),
        budget_delta=_float(record, "budget_delta", required=False),
        sampling=str(record.get("sampling")),
        mechanism=shape,
        poisson=poisson and record.get("sampling") == "poisson",
        mismatch=mismatch,
    )


# -- replay ----------------------------------------------------------------------------------

_EPSILON: dict[tuple, float] = {}  # (compacted history, delta) -> PLD epsilon
_FINAL: dict[tuple, tuple[float, float]] = {}  # (whole history, delta) -> (interval, RDP)


def _pld_curve(segments: tuple, deltas: tuple, interval: float) -> list[float]:
    """Cumulative PLD epsilon after each segment. ``PLDAccountant`` would rebuild a segment's
    PLD on every ``compose``; this drives the same library objects it composes
    (``from_gaussian_mechanism(...).self_compose(k)``, then ``compose``), built once per
    (sigma, q, k), so a 50-round history costs 50 cheap convolutions, not 50 replays."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    built: dict[MechanismSegment, object] = {}
    current, curve, infinite = None, [], False
    for seg, delta in zip(segments, deltas, strict=True):
        if seg.noise_multiplier <= 0:
            infinite = True
        elif seg.steps and seg.sample_rate > 0 and not infinite:
            if seg not in built:
                built[seg] = pld.from_gaussian_mechanism(
                    seg.noise_multiplier,
                    sampling_prob=seg.sample_rate,
                    value_discretization_interval=interval,
                ).self_compose(seg.steps)
            current = built[seg] if current is None else current.compose(built[seg])
        eps = math.inf if infinite else current.get_epsilon_for_delta(delta) if current else 0.0
        curve.append(float(eps))
    return curve


def _pld_final(compact: tuple, delta: float, interval: float) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld

    total = None
    for seg in compact:
        p = pld.from_gaussian_mechanism(
            seg.noise_multiplier,
            sampling_prob=seg.sample_rate,
            value_discretization_interval=interval,
        )
        p = p.self_compose(seg.steps)
        total = p if total is None else total.compose(p)
    return float(total.get_epsilon_for_delta(delta)) if total else 0.0


def _rdp_epsilon(compact: tuple, delta: float) -> float:
    import dp_accounting
    from absl import logging as absl_logging
    from dp_accounting.rdp import RdpAccountant

    if not compact:
        return 0.0
    if any(s.noise_multiplier <= 0 for s in compact):
        return math.inf
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    s.sample_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)
                ),
                s.steps,
            )
            for s in compact
        ]
    )
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # "excluding this order": expected, noise
    try:
        return float(RdpAccountant(RDP_ORDERS).compose(event).get_epsilon(delta))
    finally:
        absl_logging.set_verbosity(verbosity)


def _live(segments: tuple) -> tuple:
    return compact_history(s for s in segments if s.sample_rate > 0)


def replay(segments: tuple, deltas: tuple) -> tuple[list[float], float, float]:
    """(PLD curve, interval used, RDP epsilon of the whole history) for one institution."""
    keys = [(_live(segments[: i + 1]), d) for i, d in enumerate(deltas)]
    if keys[-1] in _FINAL and all(k in _EPSILON for k in keys):
        return [_EPSILON[k] for k in keys], *_FINAL[keys[-1]]
    rdp = _rdp_epsilon(keys[-1][0], deltas[-1])
    # PLD's cost grows with the range of privacy losses, i.e. with epsilon (sigma 0.01 takes
    # minutes at 3e-3); an interval of epsilon/1e4 keeps it bounded, and loses nothing the
    # tolerance could see. Such epsilons are far beyond any budget anyway.
    interval = max(PLD_INTERVAL, rdp / 1e4) if math.isfinite(rdp) else PLD_INTERVAL
    curve = _pld_curve(segments, deltas, interval)
    for _ in range(3):  # refine while the estimated discretization error is above target
        final = curve[-1]
        if not 0 < final < math.inf or interval <= PLD_MIN_INTERVAL:
            break
        error = (_pld_final(keys[-1][0], deltas[-1], 2 * interval) - final) / (3 * final)
        if error <= PLD_ERROR_TARGET:
            break
        interval = max(PLD_MIN_INTERVAL, 0.8 * interval * math.sqrt(PLD_ERROR_TARGET / error))
        curve = _pld_curve(segments, deltas, interval)
    _remember(keys, curve, interval, rdp)
    return curve, interval, rdp


def _remember(keys: list[tuple], curve: list[float], interval: float, rdp: float) -> None:
    _EPSILON.update(zip(keys, curve, strict=True))
    _FINAL[keys[-1]] = (interval, rdp)


def _replay_job(job: tuple) -> tuple:
    return job, replay(*job)


def _replay_all(jobs: set[tuple]) -> dict[tuple, tuple]:
    """Replay distinct histories, on every core when there are enough of them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    todo = sorted(jobs, key=lambda j: -len(j[0]))
    if cores < 2 or len(todo) < PARALLEL_MIN_JOBS or sys.platform != "linux":
        return dict(_replay_job(j) for j in todo)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # fork: workers inherit the imported libraries; the audit holds no threads of its own.
    with ProcessPoolExecutor(min(cores, len(todo)), mp_context=get_context("fork")) as pool:
        results = dict(pool.map(_replay_job, todo, chunksize=1))
    for (segments, deltas), (curve, interval, rdp) in results.items():  # this process's memo
        _remember(
            [(_live(segments[: i + 1]), d) for i, d in enumerate(deltas)], curve, interval, rdp
        )
    return results


# -- checks ----------------------------------------------------------------------------------


def _check(
    name: str, records: list[TrainedRecord], result: tuple, dropped: list[int]
) -> InstitutionAudit:
    """Flag one institution; ``dropped``: lines of its ``client_dropped`` at stage "train"."""
    curve, interval, rdp = result
    inst = InstitutionAudit(name, records, curve, rdp, interval)
    found: dict[str, list[str]] = {}
    prev = None
    for rec, eps in zip(records, curve, strict=True):
        where = f"line {rec.line}" + (f" (round {rec.round})" if rec.round is not None else "")
        if not rec.poisson:
            found.setdefault(NON_POISSON, []).append(
                f"{where}: sampling {rec.sampling!r}, DpEvent {rec.mechanism}"
            )
        if rec.mismatch:
            found.setdefault(MISMATCH, []).append(f"{where}: DpEvent differs from sigma/q/steps")
        if prev is not None and (
            rec.client_rounds is None
            or prev.client_rounds is None
            or rec.client_rounds != prev.client_rounds + 1
        ):
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
    if curve[-1] > rdp * (1 + TOLERANCE):
        found.setdefault(DISAGREE, []).append(
            f"PLD replay {curve[-1]:.4g} above the RDP bound {rdp:.4g}: replay not trusted"
        )
    for kind, where in found.items():
        inst.flags.append(kind)
        more = f" (and {len(where) - 1} more records)" if len(where) > 1 else ""
        inst.details.append(f"{name}: {kind}: {where[0]}{more}")
    if inst.partial:
        inst.details.append(
            f"{name}: partial: its first record here (line {records[0].line}) is client round "
            f"{records[0].client_rounds}; earlier rounds are not in this ledger, so the replay "
            "is a lower bound and only definite under-reports and overruns are flagged"
        )
    return inst


def _not_a_ledger(path: Path) -> bool:
    """True when line 1 is a JSON object without the chain's fields (some other JSON Lines)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "seq" not in first and "prev" not in first


def audit_ledger(path: str | os.PathLike) -> AuditReport:
    """Verify, replay and check the ledger at ``path`` (a run directory or the file).

    Raises :class:`AuditInputError` (exit 2) when the input is not a readable ledger; a
    broken chain is a report with ``tampered`` set (exit 1)."""
    ledger = _ledger_file(Path(path))
    report = AuditReport(ledger)
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
        return report
    except (ValueError, AttributeError, OSError) as exc:  # read_ledger leaves a bad head raw
        report.tampered = f"{HEAD_FILE} is unreadable ({exc}): the last record cannot be verified"
        return report
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
    by_institution: dict[str, list[TrainedRecord]] = {}
    malformed: dict[str, list[str]] = {}
    self_audited = set()
    dropped: dict[str, list[int]] = {}
    for line, record in enumerate(contents.records, start=1):
        report.events[str(record.get("event"))] += 1
        if record.get("event") == "client_dropped" and record.get("stage") == "train":
            dropped.setdefault(str(record.get("institution")), []).append(line)
        if record.get("event") != "client_trained":
            continue
        name = str(record.get("institution"))
        if str(record.get("accountant_library", "")).startswith("dp-accounting"):
            self_audited.add(name)
        try:
            parsed = _trained(record, line)
        except (ValueError, TypeError, OverflowError) as exc:
            malformed.setdefault(name, []).append(f"line {line}: {exc}")
        else:
            by_institution.setdefault(name, []).append(parsed)
    if self_audited:
        report.warnings.append(
            f"{len(self_audited)} institution(s) report with dp-accounting, the audit's own "
            "library: for them only the RDP cross-check is independent"
        )
    histories = {
        name: (tuple(r.segment for r in recs), tuple(r.delta for r in recs))
        for name, recs in by_institution.items()
    }
    results = _replay_all(set(histories.values()))
    for name, recs in by_institution.items():
        result = results[histories[name]]
        report.institutions.append(_check(name, recs, result, dropped.get(name, [])))
    known = {inst.institution: inst for inst in report.institutions}
    for name, problems in malformed.items():
        if name not in known:  # every record unusable: an entry of its own, epsilon unknown
            known[name] = InstitutionAudit(name, [], [], math.nan, PLD_INTERVAL)
            report.institutions.append(known[name])
        known[name].flags.append(MALFORMED)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        known[name].details.append(f"{name}: {MALFORMED}: {problems[0]}{more}")
    if not by_institution and not malformed:
        report.warnings.append("no client_trained record: nothing to replay")
    return report


# -- output ----------------------------------------------------------------------------------


def _eps(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else "inf" if math.isinf(x) else f"{x:.3f}"


def render(report: AuditReport) -> str:
    lines = [
        f"ledger: {report.ledger}: {report.records} records, chain intact "
        f"(head {report.head_hash[:12]}); events: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.events.items())),
        f"replay: {replay_description()}; tolerance {TOLERANCE:.0%}",
    ]
    lines += [f"warning: {w}" for w in report.warnings]
    header = (
        "institution",
        "rounds",
        "steps",
        "ε reported",
        "ε replayed (PLD)",
        "ε RDP",
        "budget (ε, δ)",
        "status",
    )
    rows = [
        (
            i.institution,
            str(i.rounds),
            str(i.steps),
            _eps(i.epsilon_reported),
            _eps(i.epsilon_replayed),
            _eps(i.epsilon_rdp),
            "-" if i.budget_epsilon is None else f"{i.budget_epsilon:g}, {i.budget_delta:g}",
            i.status,
        )
        for i in report.institutions
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        lines.append(
            "  ".join(
                cell.ljust(w) if c in (0, 7) else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    details = [d for i in report.institutions for d in i.details]
    if details:
        lines.append("findings:")
        lines += [f"  {d}" for d in details]
    return "\n".join(lines)


def write_plot(report: AuditReport, path: Path) -> str:
    """Cumulative replayed epsilon per round, one line per institution, budgets dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'matplotlib>=3.8')"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    few = len(report.institutions) <= 12
    for inst in report.institutions:
        pts = [(x, y if math.isfinite(y) else math.nan) for x, y in inst.points()]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = (
            {"color": "tab:red", "lw": 1.6, "alpha": 0.9}
            if inst.flags
            else {"lw": 1.2 if few else 0.6, "alpha": 0.9 if few else 0.35}
        )
        label = inst.institution if few or inst.flags else None
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label, **style)
    budgets = sorted({i.budget_epsilon for i in report.institutions if i.budget_epsilon})
    for b in budgets:
        ax.axhline(b, color="black", ls="--", lw=0.9)
        ax.annotate(
            f"budget ε={b:g}",
            (0.005, b),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (replayed, PLD)")
    ax.set_title(
        f"ferry audit: {len(report.institutions)} institutions, "
        f"{'PASS' if report.ok else 'FAIL'} ({report.ledger.parent.name})"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        return f"plot not written: {path.parent} is not writable ({exc.strerror})"
    finally:
        plt.close(fig)
    return f"plot: {path}"


def run_audit(path: str | os.PathLike, as_json: bool = False, plot: bool = True) -> int:
    """``ferry audit``: print the report (table or one JSON object); return the exit code."""
    try:
        report = audit_ledger(path)
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
