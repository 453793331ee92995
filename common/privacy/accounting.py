"""Privacy accounting for Ferry's per-client mechanism.

Unit of privacy: one example (record) at one institution. Each client round runs the
Poisson-subsampled Gaussian mechanism: every step includes each local example independently
with probability ``q`` (sample rate), clips per-example gradients to norm ``C`` and adds
Gaussian noise of standard deviation ``sigma * C`` (``sigma`` = noise multiplier). A client's
history is the list of :class:`MechanismSegment` it ran, over every round it took part in; its
cumulative epsilon composes the whole history (never reset per round).

Reported epsilon: Opacus' PRV accountant (``"prv"``); ``"rdp"`` is the looser cross-check.
The same segments are described in ``dp-accounting``'s DpEvent vocabulary by
:func:`as_dp_event`, so an auditor can replay them with a library Ferry did not write.

epsilon computations are costly (~0.1 s each), so they are memoised per distinct compacted
history: 1,000 clients with the same (sigma, q, steps) cost one computation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class MechanismSegment:
    """``steps`` steps of PoissonSampled(q=sample_rate, Gaussian(noise_multiplier))."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


def compact_history(history: Iterable[MechanismSegment]) -> tuple[MechanismSegment, ...]:
    """Merge segments with the same (sigma, q): composition only depends on the step count.

    The order of segments does not change the composed privacy loss, so the result is sorted,
    which also makes it a good memoisation key.
    """
    steps: dict[tuple[float, float], int] = {}
    for seg in history:
        if seg.steps <= 0:
            continue
        key = (float(seg.noise_multiplier), float(seg.sample_rate))
        steps[key] = steps.get(key, 0) + int(seg.steps)
    return tuple(MechanismSegment(s, q, k) for (s, q), k in sorted(steps.items()))


def as_dp_event(history: Sequence[MechanismSegment]):
    """The history as a ``dp_accounting`` DpEvent (composed PoissonSampled Gaussians)."""
    import dp_accounting

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                seg.sample_rate, dp_accounting.GaussianDpEvent(seg.noise_multiplier)
            ),
            seg.steps,
        )
        for seg in history
    ]
    return dp_accounting.ComposedDpEvent(events)


def epsilon_for_history(
    history: Iterable[MechanismSegment], delta: float, accountant: str = "prv"
) -> float:
    """Cumulative epsilon at ``delta`` of every segment in ``history``; 0 for no steps.

    Returns ``math.inf`` if any segment ran without noise.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    compact = compact_history(history)
    if not compact:
        return 0.0
    if any(seg.noise_multiplier <= 0 for seg in compact):
        return math.inf
    return _epsilon_cached(compact, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(compact: tuple[MechanismSegment, ...], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in compact]
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=1024)
def noise_multiplier_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    rel_tol: float = 0.01,
) -> float:
    """Smallest noise multiplier (within ``rel_tol``) whose ``steps`` steps at ``sample_rate``
    stay at or below ``target_epsilon`` at ``delta``. The answer is always on the safe side:
    the returned sigma satisfies epsilon <= target.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a positive number, got {target_epsilon}")

    def eps(sigma: float, acc: str = accountant) -> float:
        seg = MechanismSegment(sigma, sample_rate, steps)
        return _epsilon_cached((seg,), float(delta), acc)

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), then bisect. RDP bounds PRV from
    # above and is cheaper, so RDP's answer is a safe upper end for a PRV search.
    hi = _bisect_sigma(lambda s: eps(s, "rdp"), target_epsilon, rel_tol, sample_rate, steps)
    if accountant == "rdp":
        return hi
    lo = hi * 0.7
    while eps(lo) <= target_epsilon:
        if lo < 1e-3:
            return lo
        lo, hi = lo * 0.7, lo
    while (hi - lo) / hi > rel_tol:
        mid = (lo + hi) / 2
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def _bisect_sigma(eps, target: float, rel_tol: float, sample_rate: float, steps: int) -> float:
    lo, hi = 0.5, 1.0
    if eps(hi) <= target:
        while eps(lo) <= target:
            if lo < 1e-3:
                return lo
            lo, hi = lo / 2, lo
    else:
        lo, hi = hi, hi * 2
        while eps(hi) > target:
            if hi > 1e4:
                raise ValueError(
                    f"no noise multiplier reaches epsilon={target} with sample rate "
                    f"{sample_rate} over {steps} steps"
                )
            lo, hi = hi, hi * 2
    while (hi - lo) / hi > rel_tol:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
