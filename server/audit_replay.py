"""The audit's replay engine: a client's mechanisms through an accountant it did not use.

Each institution's history (one PoissonSampled(Gaussian) segment per reported round, in
ledger order) is replayed with Google ``dp-accounting``'s privacy loss distributions (PLD,
add-or-remove-one neighbours, the relation Opacus uses): the cumulative epsilon after every
record, at that record's delta; the final epsilon is cross-checked with ``dp-accounting``'s
RDP accountant, an upper bound the PLD figure must not exceed.

Hostile numbers never escape as exceptions: a history whose RDP bound exceeds
:data:`EPSILON_CEILING` (no privacy worth the name: sigma 1e-6, or 1e18 steps) is not run
through PLD, and any accountant failure (overflow, memory) is returned as the reason the
history could not be replayed (:class:`ReplayFailure`), which the audit turns into a finding.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass

from ferry.common.privacy.accounting import MechanismSegment, compact_history
from ferry.common.privacy.dp_events import event_from_json, event_mechanism, history_event

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
PARALLEL_MIN_JOBS = 8  # fewer distinct histories than this: not worth starting processes
# Beyond this RDP epsilon a history is not replayed with PLD: its interval would have to grow
# past what the PLD code can represent (sigma 1e-6 overflowed it), and no budget is that large.
EPSILON_CEILING = 1e4


@dataclass(frozen=True)
class ReplayFailure:
    """Why a history could not be replayed (a finding, never an exception)."""

    reason: str


def replay_description() -> str:
    from importlib.metadata import version

    return (
        f"dp-accounting {version('dp-accounting')} PLD (add/remove one, interval "
        f"{PLD_INTERVAL:g}, finer where needed); RDP cross-check"
    )


def mechanism(data: object) -> tuple[MechanismSegment | None, str, bool]:
    """(segment, shape, poisson) of a report's ``dp_event``; segment None if not replayable."""
    try:  # rounds repeat the same event: parse each distinct one once
        return _mechanism_of(json.dumps(data, sort_keys=True))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ValueError(f"dp_event is unreadable ({str(exc)[:80]})") from None


@functools.lru_cache(maxsize=4096)
def _mechanism_of(text: str) -> tuple[MechanismSegment | None, str, bool]:
    try:
        event = event_from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError) as exc:
        return None, f"unreadable DpEvent ({exc})", False
    return event_mechanism(event)


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
    from absl import logging as absl_logging
    from dp_accounting.rdp import RdpAccountant

    if not compact:
        return 0.0
    if any(s.noise_multiplier <= 0 for s in compact):
        return math.inf
    event = history_event(compact)
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
    if math.isnan(rdp) or (math.isfinite(rdp) and rdp > EPSILON_CEILING):
        raise ArithmeticError(
            f"its RDP bound is {rdp:.3g}, beyond the replay's ceiling {EPSILON_CEILING:g}: "
            "no meaningful privacy"
        )
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
    try:
        return job, replay(*job)
    except (ArithmeticError, ValueError, MemoryError, RecursionError) as exc:
        return job, ReplayFailure(f"{type(exc).__name__}: {str(exc)[:120]}")


def replay_all(jobs: set[tuple]) -> dict[tuple, tuple | ReplayFailure]:
    """Replay distinct (segments, deltas) histories, on every core when there are enough of
    them. A history that cannot be replayed maps to a :class:`ReplayFailure`."""
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
    for (segments, deltas), result in results.items():  # this process's memo
        if not isinstance(result, ReplayFailure):
            keys = [(_live(segments[: i + 1]), d) for i, d in enumerate(deltas)]
            _remember(keys, *result)
    return results
