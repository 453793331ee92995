"""Aggregation with bounded influence: no single institution can take over the model.

:func:`aggregate_updates` combines one round's updates ``(institution, arrays, claimed
examples)`` under an :class:`AggregationPolicy`, in two steps:

1. **Bound each change.** Every update's change from the current arrays (``update -
   current``, all arrays as one vector) is clipped to an L2 bound: the policy's fixed
   ``max_update_norm``, or (0, the default) ``norm_factor`` x the median change norm of the
   round. While hostile institutions are fewer than half, the median is an honest one's, so
   a scaled update (x1e30) moves the model no further than ``norm_factor`` honest ones.
   "Median" here is the lower median (of an even count, the smaller middle value): with
   two institutions, one inflating, it is still the honest one's. The price, where half
   are hostile (one of two): one sending a change of (near) zero sets the bound to (near)
   zero, so the round moves nothing and the honest update is recorded as clipped: a
   stall, never a takeover. A fixed ``max_update_norm`` avoids it.
2. **Apply the rule** to the clipped changes, then add the result to the current arrays:

   * ``fedavg`` (McMahan et al. 2017): the mean weighted by claimed example counts, each
     count capped at ``weight_cap`` x the round's median claimed count
     (:func:`capped_weights`), so claiming 1e12 examples buys at most ``weight_cap`` x a
     typical institution's say. With nobody capped or clipped it is exactly FedAvg.
   * ``median`` (coordinate-wise; Yin et al. 2018): Flower's ``aggregate_median``.
   * ``trimmed-mean`` (coordinate-wise, ``hostile`` values cut at each end; Yin et al. 2018):
     Flower's ``aggregate_trimmed_avg``.
   * ``krum`` (Blanchard et al. 2017, f = ``hostile``): Flower's ``aggregate_krum``: the
     change closest to its n - f - 2 nearest others.

   The robust rules ignore claimed counts (nothing to inflate); they need enough updates to
   outvote ``hostile`` hostile ones (:func:`common.config.updates_needed`: krum n > 2f + 2,
   median and trimmed mean n > 2f); with fewer, :class:`TooFewUpdates` is raised and nothing
   is aggregated. All rules are translation-invariant, so working on changes gives what they
   give on the arrays, with the bound applied first.

:class:`AggregationResult` says what was done, for the ledger: the rule, the bound, each
institution's weight and every clipped update with its norm before clipping.
Evaluation counts are bounded the same way (:func:`capped_statistics`).

**The round's seam** (:class:`RoundAggregation`, on the plan the round loop works from):
what turns a round's usable updates into the new global arrays, in three slots the loop
calls in order and never needs editing for: ``decode`` (where a secure-aggregation
transport turns masked updates into what the rule combines; none: updates arrive in the
clear), ``combine`` (an :class:`Aggregator`; by default :class:`BoundedAggregator`, the
bound and a rule registered with :func:`register_rule`) and ``after`` (server-side
:class:`PostAggregationStep` s on the result, such as central DP noise, each adding its
own ledger entry to ``post``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from ferry.common.config import ASSUMED_HOSTILE, RunConfig, updates_needed
from ferry.common.errors import FerryError
from ferry.common.evaluation_statistics import EvaluationStatistics, scale_statistics
from ferry.common.imports import import_object, is_import_path

Arrays = dict[str, np.ndarray]
Update = tuple[str, Arrays, float]  # (institution, arrays, claimed example count)
Changes = list[np.ndarray]  # one update's change, one float64 array per key, in key order


class TooFewUpdates(ValueError):
    """The round has fewer usable updates than the rule needs to withstand the hostile
    institutions it is sized for: nothing may be aggregated this round."""


@dataclass(frozen=True)
class AggregationPolicy:
    """How a round's updates are combined (see the module docstring).

    ``rule``: fedavg | trimmed-mean | median | krum. ``weight_cap``: FedAvg weight of an
    institution at most this many times the round's median claimed count (inf: uncapped).
    ``max_update_norm``: > 0 a fixed L2 bound on each change; 0 adaptive, ``norm_factor`` x
    the round's median change norm (2: honest updates of similar size are left whole);
    inf: unbounded. ``hostile``: how many hostile institutions the robust rules are sized for
    (Krum's f; trimmed mean cuts this many at each end)."""

    rule: str = "fedavg"
    weight_cap: float = 2.0
    max_update_norm: float = 0.0
    norm_factor: float = 2.0
    hostile: int = ASSUMED_HOSTILE

    def __post_init__(self) -> None:
        rule_named(self.rule)
        if not self.weight_cap >= 1:
            raise ValueError(f"weight_cap {self.weight_cap!r} must be >= 1")
        if not self.max_update_norm >= 0:
            raise ValueError(f"max_update_norm {self.max_update_norm!r} must be >= 0")
        if not (self.norm_factor > 0 and math.isfinite(self.norm_factor)):
            raise ValueError(f"norm_factor {self.norm_factor!r} must be positive and finite")
        if self.hostile < 0:
            raise ValueError(f"hostile {self.hostile!r} must be >= 0")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> AggregationPolicy:
        return cls(
            rule=cfg.aggregation,
            weight_cap=float(cfg.weight_cap),
            max_update_norm=float(cfg.max_update_norm),
        )

    @property
    def updates_needed(self) -> int:
        """The fewest updates a round needs under this rule."""
        return updates_needed(self.rule, self.hostile)


@dataclass
class AggregationResult:
    """The new arrays and what the rule did: ``weights`` each institution's share (fedavg:
    its capped count over the total; median, trimmed mean: 1/n, as coordinate-wise rules give
    no institution more; krum: 1 for the one chosen, 0 for the others); ``norm_bound`` the
    L2 bound on each change (inf: none); ``clipped`` institution -> its change norm before
    clipping, for each update that was clipped."""

    arrays: Arrays
    rule: str
    weights: dict[str, float]
    norm_bound: float
    clipped: dict[str, float] = field(default_factory=dict)
    weight_cap: float = math.inf
    post: tuple[dict, ...] = ()  # one ledger entry per post-aggregation step, in order

    def ledger_fields(self) -> dict:
        """The ``round_aggregated`` fields (JSON: an absent bound or cap is None; ``post``
        only where a post-aggregation step ran)."""
        return {
            "rule": self.rule,
            "weight_cap": self.weight_cap if math.isfinite(self.weight_cap) else None,
            "norm_bound": self.norm_bound if math.isfinite(self.norm_bound) else None,
            "weights": {k: float(v) for k, v in self.weights.items()},
            "clipped": {k: {"norm": float(v)} for k, v in self.clipped.items()},
            **({"post": list(self.post)} if self.post else {}),
        }

    def after_step(self, arrays: Arrays, entry: dict) -> AggregationResult:
        """This result with a post-aggregation step's ``arrays`` and its ledger ``entry``."""
        return replace(self, arrays=arrays, post=(*self.post, entry))


def capped_weights(counts: dict[str, float], cap: float) -> dict[str, float]:
    """Each count, at most ``cap`` x the median of ``counts``. While fewer than half of the
    institutions inflate their count the median is an honest one's, so no claim buys more
    than ``cap`` typical institutions' weight."""
    if not counts:
        return {}
    limit = cap * lower_median(list(counts.values()))
    return {k: min(float(v), limit) for k, v in counts.items()}


def capped_statistics(
    stats: dict[str, EvaluationStatistics], cap: float
) -> dict[str, EvaluationStatistics]:
    """Evaluation statistics whose example counts are in the proportion of the counts
    :func:`capped_weights` allows, so pooled metrics weigh an institution by its capped
    count; each institution's own metrics stay as they were, up to integer rounding.

    Institutions releasing no examples carry no weight and do not enter the median (one of
    two claiming 0 would otherwise cap the other to 0 and erase the federated metrics). The
    proportion is reached by scaling counts up, never down: the most capped institution
    keeps its count and the others are scaled up to match (each count stays at most the
    largest claim). Scaling down would round an honest institution's statistics to the
    handful of examples a hostile one claims (one claiming 1 example of two caps the other
    at 2, whose 70% accuracy rounds to 100%)."""
    counted = {k: float(s.num_examples) for k, s in stats.items() if s.num_examples}
    capped = capped_weights(counted, cap)
    common = max((counted[k] / capped[k] for k in capped), default=1.0)
    return {
        k: s
        if k not in capped or common * capped[k] <= counted[k]
        else scale_statistics(s, common * capped[k] / counted[k])
        for k, s in stats.items()
    }


def lower_median(values: Sequence[float]) -> float:
    """The middle value, or of an even count the smaller of the two middle ones."""
    ordered = sorted(float(v) for v in values)
    return ordered[(len(ordered) - 1) // 2]


def change_norm(change: Changes) -> float:
    """L2 norm over all arrays, without overflow (float64 squares of values near the
    float64 maximum would be inf)."""
    peak = max((float(np.max(np.abs(c))) for c in change if c.size), default=0.0)
    if peak == 0 or not math.isfinite(peak):
        return peak
    return peak * math.sqrt(sum(float(np.sum(np.square(c / peak))) for c in change))


def aggregate_updates(
    current: Arrays, updates: Sequence[Update], policy: AggregationPolicy
) -> AggregationResult:
    """Combine ``updates`` (institution, arrays with ``current``'s keys and shapes, finite;
    claimed example count, positive and finite: validated where they arrive) under
    ``policy``. Raises :class:`TooFewUpdates` when the rule needs more updates, ValueError for
    an empty round or an institution named twice."""
    names = [name for name, _, _ in updates]
    if not updates:
        raise ValueError("nothing to aggregate")
    if len(set(names)) != len(names):
        raise ValueError(f"an institution sent two updates in one round: {names}")
    if len(updates) < policy.updates_needed:
        raise TooFewUpdates(
            f"{policy.rule} needs at least {policy.updates_needed} updates to withstand "
            f"{policy.hostile} hostile institution(s); this round has {len(updates)}: "
            f"nothing aggregated"
        )
    keys = list(current)
    changes = [
        [arrays[k].astype(np.float64) - current[k].astype(np.float64) for k in keys]
        for _, arrays, _ in updates
    ]
    norms = [change_norm(c) for c in changes]
    if policy.max_update_norm > 0:
        bound = float(policy.max_update_norm)
    else:
        bound = policy.norm_factor * lower_median(norms)
    clipped = {}
    for i, (name, norm) in enumerate(zip(names, norms, strict=True)):
        if norm > bound:
            clipped[name] = norm
            scale = bound / norm if norm > 0 else 0.0
            changes[i] = [c * scale for c in changes[i]]
    counts = {name: float(count) for name, _, count in updates}
    combined, shares = rule_named(policy.rule)(changes, names, counts, policy)
    shapes = [np.shape(c) for c in changes[0]]
    if len(combined) != len(keys) or [np.shape(c) for c in combined] != shapes:
        raise ValueError(
            f"aggregation rule {policy.rule!r} returned changes of shapes "
            f"{[np.shape(c) for c in combined][:4]}, not the updates' {shapes[:4]}"
        )
    arrays = {
        k: (current[k].astype(np.float64) + delta).astype(current[k].dtype)
        for k, delta in zip(keys, combined, strict=True)
    }
    return AggregationResult(arrays, policy.rule, shares, bound, clipped, policy.weight_cap)


# -------------------------------------------------------------------------- the rules
# Each takes the clipped changes, the institutions' names, their claimed counts and the
# policy; it returns the combined change and each institution's share.
Rule = Callable[
    [list[Changes], list[str], dict[str, float], AggregationPolicy],
    tuple[Changes, dict[str, float]],
]
_RULES: dict[str, Rule] = {}


def register_rule(name: str):
    """Register ``fn`` as the rule ``name`` (:data:`Rule`), usable in an
    :class:`AggregationPolicy` (and so a :class:`BoundedAggregator`)."""

    def decorator(fn: Rule) -> Rule:
        _RULES[name] = fn
        return fn

    return decorator


def rule_named(name: str) -> Rule:
    """The rule ``name``: a registered one, or the operator's own function at import path
    ``package.module:function`` (with :data:`Rule`'s signature), imported here, in the
    operator's server, and nowhere else: institutions only pass the name along."""
    if name not in _RULES and is_import_path(name):
        fn = import_object(name, "aggregation rule")
        if not callable(fn):
            raise FerryError(
                f"aggregation rule {name!r} is a {type(fn).__name__}, not a function: name a "
                "function (changes, names, counts, policy) -> (combined change, shares)"
            )
        _RULES[name] = fn
    if name not in _RULES:
        raise ValueError(f"unknown aggregation rule {name!r}: use {', '.join(_RULES)}")
    return _RULES[name]


@register_rule("fedavg")
def _fedavg(changes, names, counts, policy):
    capped = capped_weights(counts, policy.weight_cap)
    total = sum(capped.values())
    shares = {n: capped[n] / total for n in names}
    combined = [
        sum(shares[n] * c[j] for n, c in zip(names, changes, strict=True))
        for j in range(len(changes[0]))
    ]
    return combined, shares


def _uniform(names: list[str]) -> dict[str, float]:
    return {n: 1.0 / len(names) for n in names}


@register_rule("median")
def _median(changes, names, counts, policy):
    return aggregate_median([(c, 1) for c in changes]), _uniform(names)


@register_rule("trimmed-mean")
def _trimmed_mean(changes, names, counts, policy):
    # Flower cuts int(proportion x n) at each end; (f + 0.25) / n makes that exactly f and
    # stays below Flower's limit of 0.5 for n >= 2f + 1.
    proportion = (policy.hostile + 0.25) / len(changes) if policy.hostile else 0.0
    return aggregate_trimmed_avg([(c, 1) for c in changes], proportion), _uniform(names)


@register_rule("krum")
def _krum(changes, names, counts, policy):
    chosen = aggregate_krum([(c, 1) for c in changes], num_malicious=policy.hostile, to_keep=0)
    index = next(i for i, c in enumerate(changes) if c is chosen)
    return chosen, {n: float(i == index) for i, n in enumerate(names)}


# ------------------------------------------------------------------ the round's seam


class Aggregator(Protocol):
    """Combines one round's usable updates into the new arrays. Raises
    :class:`TooFewUpdates` when the round may not be aggregated (nothing is applied)."""

    def __call__(self, current: Arrays, updates: Sequence[Update]) -> AggregationResult: ...


class PostAggregationStep(Protocol):
    """A server-side step on the aggregated arrays before they are applied (central DP
    noise, for one): returns the result to apply, through
    :meth:`AggregationResult.after_step` so that its ledger entry is kept."""

    def __call__(self, result: AggregationResult, rnd: int) -> AggregationResult: ...


UpdateDecoder = Callable[[Sequence[Update]], Sequence[Update]]


@dataclass(frozen=True)
class BoundedAggregator:
    """A registered rule behind the influence bound: :func:`aggregate_updates` under
    ``policy`` (the default :class:`Aggregator`)."""

    policy: AggregationPolicy

    def __call__(self, current: Arrays, updates: Sequence[Update]) -> AggregationResult:
        return aggregate_updates(current, updates, self.policy)


@dataclass(frozen=True)
class RoundAggregation:
    """What the round loop (:func:`server.rounds.train_round`) does with a round's usable
    updates: ``decode`` them (a secure-aggregation transport's unmasking; None: they came in
    the clear), ``combine`` them (:class:`Aggregator`), then run each ``after`` step on the
    result (:class:`PostAggregationStep`). A new rule, central DP or secure aggregation is a
    new value here, never an edit of the loop."""

    combine: Aggregator
    decode: UpdateDecoder | None = None
    after: tuple[PostAggregationStep, ...] = ()

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RoundAggregation:
        """The run's rule and bounds (``--aggregation``, ``--weight-cap``, ...), nothing after."""
        return cls(BoundedAggregator(AggregationPolicy.from_config(cfg)))

    def __call__(self, current: Arrays, updates: Sequence[Update], rnd: int) -> AggregationResult:
        if self.decode is not None:
            updates = self.decode(updates)
        result = self.combine(current, updates)
        for step in self.after:
            result = step(result, rnd)
        return result
