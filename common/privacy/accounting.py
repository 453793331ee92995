"""Privacy accounting for Ferry's per-client mechanism.

Unit of privacy: one example (record) at one institution. Each client round runs the
Poisson-subsampled Gaussian mechanism: every step includes each local example independently
with probability ``q`` (sample rate), clips per-example gradients to norm ``C`` and adds
Gaussian noise of standard deviation ``sigma * C`` (``sigma`` = noise multiplier). A client's
history is the list of :class:`MechanismSegment` it ran, over every round it took part in; its
cumulative epsilon composes the whole history (never reset per round).

Reported epsilon: Opacus' PRV accountant (``"prv"``); ``"rdp"`` is the looser cross-check.
The same segments are described in ``dp-accounting``'s DpEvent vocabulary by
:mod:`common.privacy.dp_events`, so an auditor can replay them with a library Ferry did not
write.

epsilon computations are costly (~0.1 s each), so they are memoised per distinct compacted
history: 1,000 clients with the same (sigma, q, steps) cost one computation.

Hostile mechanisms (a server-chosen sigma of 0.01, or steps in the billions) would make the PRV
accountant allocate a grid of billions of points (sigma 0.01, q 0.1, 100 steps: 3.5e9 points,
26 GiB); :func:`epsilon_for_history` refuses them first with :class:`UnaccountableMechanism`
(its grid size is predicted from the cheap RDP bound, exactly as Opacus sizes it), and
:func:`epsilon_lower_bound` gives a cheap, rigorous floor of any history's epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ferry.common.errors import FerryError

ACCOUNTANTS = ("prv", "rdp")

# The largest PRV grid epsilon_for_history runs: about 160 bytes and 1 µs per point measured
# (2e7 points: 3.3 GB above the process, 20 s), so 3e7 is ~5 GB. Honest runs stay far below:
# sigma derived for epsilon 10 at q 0.02 over 100,000 steps needs 1.8e7 points.
MAX_PRV_GRID_POINTS = 30_000_000


class UnaccountableMechanism(FerryError):
    """The PRV accountant cannot evaluate this history in bounded memory (a sigma far too
    small, or absurdly many steps); no accountant was run."""

    kind = "mechanism"


class UnreachableTarget(UnaccountableMechanism, ValueError):
    """No noise multiplier reaches the target epsilon (a target that is not a positive
    number, a delta no accountant takes, or a target too small for any bounded noise)."""


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


@functools.cache
def _opacus_accountants():
    """Opacus' (PRVAccountant, RDPAccountant), imported on first use (``ferry --help`` and
    the ledger readers never need them), with Opacus' per-order RDP of one step memoised.

    That RDP (``opacus.accountants.analysis.rdp._compute_rdp(q, sigma, order)``, a pure
    function of its three numbers) is what both accountants spend their time in: the PRV
    accountant sizes its grid with it, :func:`prv_grid_points` predicts that size with it, and
    the RDP accountant is it; Opacus recomputes it from scratch at every call, ~0.3 s for its
    151 default orders. One PRV epsilon computed it four times for the same (q, sigma), and a
    noise search repeats that per candidate sigma. Memoised, a client's noise search and every
    later epsilon of the same mechanism compute it once per (q, sigma); the values are the
    same floats as before."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.analysis import rdp

    one_step = getattr(rdp, "_compute_rdp", None)
    if one_step is not None and not hasattr(one_step, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(one_step)
    return PRVAccountant, RDPAccountant


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(compact: tuple[MechanismSegment, ...], delta: float, accountant: str) -> float:
    PRVAccountant, RDPAccountant = _opacus_accountants()
    if accountant == "prv":
        points = prv_grid_points(compact, delta)
        if points > MAX_PRV_GRID_POINTS:
            mechs = ", ".join(
                f"σ={s.noise_multiplier:g} q={s.sample_rate:g} steps={s.steps}" for s in compact
            )
            raise UnaccountableMechanism(
                f"the PRV accountant would need {points:.3g} grid points for {mechs} (limit "
                f"{MAX_PRV_GRID_POINTS:.0e}): the noise is far too small or the steps absurdly "
                "many; use a larger noise multiplier or fewer steps"
            )
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in compact]
    try:
        return float(acc.get_epsilon(delta))
    except (OverflowError, ValueError, ZeroDivisionError, FloatingPointError) as exc:
        # Hostile numbers (sigma 1e300, delta NaN) are a refusal, never a traceback.
        raise UnaccountableMechanism(
            f"the {accountant.upper()} accountant cannot evaluate "
            + ", ".join(
                f"σ={s.noise_multiplier:g} q={s.sample_rate:g} steps={s.steps}" for s in compact
            )
            + f" at δ={delta:g} ({type(exc).__name__}): use a noise multiplier and delta in "
            "a sensible range (e.g. σ 0.5 to 100, δ 1e-5)"
        ) from None


def prv_grid_points(compact: Sequence[MechanismSegment], delta: float) -> float:
    """How many grid points Opacus' PRV accountant would discretise ``compact`` on, at
    ``get_epsilon(delta)``'s default errors (its own ``_get_domain`` formula, from the cheap
    RDP bound); ``inf`` when even the RDP bound overflows."""
    _, RDPAccountant = _opacus_accountants()
    eps_error, delta_error = 0.01, delta / 1000
    total = sum(int(s.steps) for s in compact)
    try:
        rdp = RDPAccountant()
        rdp.history = [(s.noise_multiplier, s.sample_rate, int(s.steps)) for s in compact]
        size = rdp.get_epsilon(delta_error / 4)
        for s in compact:
            one = RDPAccountant()
            one.history = [(s.noise_multiplier, s.sample_rate, 1)]
            size = max(size, one.get_epsilon(delta_error / (8 * total)))
        half_width = max(size, eps_error) + 3
        mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
        points = 2 * half_width / mesh
    except (OverflowError, ValueError, ZeroDivisionError, FloatingPointError):
        return math.inf
    return points if math.isfinite(points) else math.inf


def epsilon_lower_bound(history: Iterable[MechanismSegment], delta: float) -> float:
    """A rigorous floor of the epsilon (at ``delta``) of ``history``, in microseconds.

    Dropping every step but one is post-processing, so a history is at least as leaky as its
    leakiest single step; one step of PoissonSampled(q, Gaussian(sigma)) has an exact
    epsilon(delta) (the hockey-stick divergence of (1-q)N(0,σ²)+qN(1,σ²) from N(0,σ²), the
    direction Opacus' PRV accounts). A round whose floor exceeds the budget cannot fit it,
    whatever the accountant says; honest runs (sigma near 1) have floors near 0.
    """
    floor = 0.0
    for seg in compact_history(history):
        if seg.noise_multiplier <= 0:
            return math.inf
        try:
            one = _one_step_epsilon(seg.noise_multiplier, seg.sample_rate, delta)
        except (OverflowError, ZeroDivisionError, FloatingPointError):
            one = 0.0  # 0 is always a valid floor (hostile numbers, e.g. sigma 1e300)
        floor = max(floor, one)
    return floor


def _one_step_epsilon(sigma: float, q: float, delta: float) -> float:
    from scipy.special import log_ndtr

    q = min(max(float(q), 0.0), 1.0)
    if q == 0.0:
        return 0.0
    if not (math.isfinite(sigma) and math.isfinite(delta) and 0 < delta < 1):
        return math.inf if sigma == 0 or math.isnan(sigma) else 0.0

    def log_delta(x: float) -> float:
        # delta at the threshold x where the privacy loss equals epsilon(x), divided by q:
        # Φ̄((x-1)/σ) - exp((2x-1)/(2σ²)) Φ̄(x/σ), computed in logs (σ may be 1e-6).
        a = log_ndtr(-(x - 1) / sigma)
        b = (2 * x - 1) / (2 * sigma**2) + log_ndtr(-x / sigma)
        if b >= a:
            return -math.inf
        return math.log(q) + a + math.log1p(-math.exp(b - a))

    def eps_at(x: float) -> float:
        z = (2 * x - 1) / (2 * sigma**2)
        return z if q == 1.0 else float(np.logaddexp(math.log1p(-q), math.log(q) + z))

    target = math.log(delta)
    lo, step = 0.5, max(sigma, 1e-3)
    if log_delta(lo) <= target:
        return 0.0
    hi = lo + step
    for _ in range(2000):  # doubling: reaches any finite x; bounded for hostile numbers
        if not log_delta(hi) > target:
            break
        lo, step = hi, step * 2
        hi = lo + step
    for _ in range(100):
        mid = (lo + hi) / 2
        if log_delta(mid) > target:
            lo = mid
        else:
            hi = mid
    return max(0.0, eps_at(lo))  # lo: delta(lo) > target, so eps_at(lo) is below the answer


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
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise UnreachableTarget(
            f"target epsilon must be a positive number, got {target_epsilon}: use e.g. 3"
        )
    if not 0 < delta < 1:
        raise UnreachableTarget(f"delta must be in (0, 1), got {delta}: use e.g. 1e-5")
    try:
        return _search_sigma(target_epsilon, delta, sample_rate, steps, accountant, rel_tol)
    except UnaccountableMechanism:
        raise
    except (OverflowError, ValueError, ZeroDivisionError, FloatingPointError) as exc:
        raise UnreachableTarget(
            f"no noise multiplier reaches epsilon={target_epsilon:g} at delta={delta:g} "
            f"with sample rate {sample_rate:g} over {steps} steps ({exc}): ask for a larger "
            "target epsilon"
        ) from None


def _search_sigma(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    rel_tol: float,
) -> float:

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
                raise UnreachableTarget(
                    f"no noise multiplier up to 1e4 reaches epsilon={target:g} with sample "
                    f"rate {sample_rate:g} over {steps} steps: ask for a larger target epsilon"
                )
            lo, hi = hi, hi * 2
    while (hi - lo) / hi > rel_tol:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
