"""The audit's per-institution checks: an authentic report's replayable form, and flags.

:func:`trained_record` turns one verified :class:`common.privacy.report.PrivacyReport` into
what the replay needs, after checking its ranges (before any arithmetic, so no number can
overflow it) and its own consistency (q = 1/ceil(n/B), steps = epochs * ceil(n/B), the DpEvent
against sigma/q/steps). :func:`check_institution` flags one replayed institution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ferry.common.privacy.accounting import MechanismSegment
from ferry.common.privacy.report import PrivacyReport
from ferry.server.audit_replay import mechanism

# Relative. Honest PRV reports sit above the replay (Opacus reports the top of its error
# bound), so the tolerance only absorbs the replay's own discretization (< 0.5 %).
TOLERANCE = 0.01
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


def trained_record(report: PrivacyReport, line: int) -> TrainedRecord:
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
            text = str(value) if abs(value) < 10**12 else f"~1e{len(str(abs(value))) - 1}"
            raise ValueError(f"{name} {text} is outside [{low}, {high:g}]")
    if not (r.noise_multiplier >= 0 and 0 <= r.sample_rate <= 1 and 0 < r.delta < 1):
        raise ValueError(
            f"impossible mechanism (sigma {r.noise_multiplier:g}, q {r.sample_rate:g}, "
            f"delta {r.delta:g})"
        )
    if not (0 < r.max_grad_norm < math.inf):
        raise ValueError(f"max_grad_norm {r.max_grad_norm:g} is not a positive clipping norm")
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


def _where(rec: TrainedRecord) -> str:
    return f"line {rec.line}" + (f" (round {rec.round})" if rec.round is not None else "")


def check_institution(inst: InstitutionAudit, dropped: list[int]) -> None:
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
