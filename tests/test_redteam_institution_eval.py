"""Attack: of two institutions, the hostile one claims almost no evaluation examples.

The evaluation cap (:func:`server.aggregation.capped_statistics`) limits each institution
to ``weight_cap`` x the lower median count. With two institutions the lower median is the
smaller claim, so a hostile one claiming 1 example capped the honest one at 2 and rounded
its 1,000-example statistics to 2 examples: the honest 70% accuracy became 100% and the
federated accuracy 1.000, more than the 1e9-example claim the cap was built against gets.
Claiming 0 examples capped the honest one at 0 and erased the federated metrics. With the
fix, the pooled metrics are the capped-weight mix of the two, as the cap promises.
"""

from __future__ import annotations

import numpy as np
import pytest

from ferry.common.evaluation_statistics import (
    classification_statistics,
    pool_statistics,
    statistics_from_record,
)
from ferry.common.metrics import metrics_from_statistics
from ferry.server.aggregation import capped_statistics

CAP = 2.0


def _stats(n: int, confusion: list[int]):
    return statistics_from_record({"num-examples": n, "confusion": confusion}, "classification", 2)


HONEST = _stats(1_000, [400, 100, 200, 300])  # accuracy 0.7


def _pooled(hostile) -> dict[str, float]:
    capped = capped_statistics({"honest": HONEST, "mallory": hostile}, CAP)
    return metrics_from_statistics(pool_statistics(list(capped.values())))


def test_claiming_one_example_does_not_round_the_honest_statistics_away():
    pooled = _pooled(_stats(1, [1, 0, 0, 0]))  # one example, right
    # The honest institution weighs 2 (its cap), the hostile one 1: at most 1/3 of the pool.
    assert pooled["accuracy"] == pytest.approx(2 / 3 * 0.7 + 1 / 3 * 1.0, abs=1e-3)
    assert pooled["accuracy"] < 0.81  # was 1.000


def test_claiming_one_wrong_example_cannot_sink_the_metrics_either():
    pooled = _pooled(_stats(1, [0, 1, 0, 0]))
    assert pooled["accuracy"] == pytest.approx(2 / 3 * 0.7, abs=1e-3)


def test_claiming_no_examples_does_not_erase_the_federated_metrics():
    pooled = _pooled(_stats(0, [0, 0, 0, 0]))
    assert pooled["accuracy"] == pytest.approx(0.7)  # was: no examples, no metrics


def test_the_inflating_institution_is_still_bounded_and_honest_metrics_kept():
    honest = {f"h{i}": _stats(200, [80, 20, 40, 60]) for i in range(3)}
    liar = _stats(10**9, [5 * 10**8, 0, 0, 5 * 10**8])
    capped = capped_statistics({**honest, "mallory": liar}, CAP)
    for k in honest:
        assert metrics_from_statistics(capped[k])["accuracy"] == pytest.approx(0.7)
    assert capped["mallory"].num_examples == liar.num_examples  # scaled up, never down
    pooled = metrics_from_statistics(pool_statistics(list(capped.values())))
    assert pooled["accuracy"] == pytest.approx(3 / 5 * 0.7 + 2 / 5 * 1.0, abs=1e-6)


def test_pooled_auc_does_not_overflow_when_counts_are_scaled_up():
    """Reaching the capped proportions scales honest counts up to the largest claim (1e9):
    the AUC's products of pooled counts exceed int64 (the AUC came out 0.26, not 0.85)."""
    rng = np.random.default_rng(0)
    honest = {}
    for i in range(20):
        y = rng.integers(0, 2, 200)
        scores = rng.normal(size=(200, 2))
        scores[np.arange(200), y] += 1.0
        honest[f"h{i}"] = classification_statistics(y, scores, 2)
    n, bins = 10**9, 100
    histogram = [0] * (2 * bins)
    histogram[0], histogram[-1] = n // 2, n - n // 2  # all mass in the end bins: perfect
    liar = statistics_from_record(
        {
            "num-examples": n,
            "confusion": [n // 2, 0, 0, n - n // 2],
            "score-bins": bins,
            "score-histogram": histogram,
        },
        "classification",
        2,
    )
    capped = capped_statistics({**honest, "mallory": liar}, CAP)
    alone = metrics_from_statistics(pool_statistics(list(honest.values())))["roc-auc"]
    pooled = metrics_from_statistics(pool_statistics(list(capped.values())))["roc-auc"]
    assert alone - 0.05 <= pooled <= 1.0  # mallory weighs 2 of 22: it can only raise it a bit
