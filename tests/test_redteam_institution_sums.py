"""Attack: an institution releases finite but absurd evaluation sums.

The evaluation codec checked that each regression sum is finite. A target sum of 1e200
(finite) passed, and computing R^2 squares it: ``OverflowError`` out of
:func:`common.metrics.metrics_from_statistics`, which the server runs on every parsed
reply outside any rejection, so one institution ended the run. Sums near the float maximum
also overflowed to inf once pooled with others or scaled to a capped count. The codec now
bounds each mean square (and the log loss) per example and checks Cauchy-Schwarz
(``|sum x| <= sqrt(n sum x^2)``); honest statistics pass unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

from ferry.common.evaluation_statistics import (
    classification_statistics,
    pool_statistics,
    regression_statistics,
)
from ferry.common.messages import EvaluationReply, MessageRejected
from ferry.common.metrics import metrics_from_statistics
from ferry.server.aggregation import capped_statistics

HONEST = {
    "num-examples": 4,
    "squared-error-sum": 1.0,
    "absolute-error-sum": 2.0,
    "target-sum": 2.0,
    "target-squared-sum": 3.0,
}

ABSURD = {
    "target sum 1e200": {"target-sum": 1e200},
    "target sum beyond its squares": {"target-sum": 100.0},
    "absolute errors beyond their squares": {"absolute-error-sum": 1e6},
    "squares near the float maximum": {"target-squared-sum": 1.7e308, "target-sum": 0.0},
    "squared errors near the float maximum": {"squared-error-sum": 1.7e308},
}


def _parse(values: dict) -> EvaluationReply:
    return EvaluationReply.from_record({**HONEST, **values}, "regression", 0)


@pytest.mark.parametrize("name", list(ABSURD))
def test_absurd_regression_sums_are_rejected(name):
    with pytest.raises(MessageRejected):
        stats = _parse(ABSURD[name]).statistics
        # What the server did next with a parsed reply (old code: OverflowError or inf).
        pooled = pool_statistics(
            list(capped_statistics({"a": stats, "b": _parse({}).statistics}, 2.0).values())
        )
        metrics = metrics_from_statistics(pooled)
        assert all(np.isfinite(v) for v in metrics.values()), metrics


def test_absurd_log_loss_is_rejected():
    record = {"num-examples": 2, "confusion": [1, 0, 0, 1], "log-loss-sum": 1.7e308}
    with pytest.raises(MessageRejected, match="log-loss-sum"):
        EvaluationReply.from_record(record, "classification", 2)


def test_honest_statistics_still_parse():
    rng = np.random.default_rng(0)
    y = rng.normal(size=500) * 1e6
    for y_true in (y, np.full(50, 3.0), np.zeros(10)):
        reg = regression_statistics(y_true, y_true + rng.normal(size=len(y_true)), True)
        assert _parse(reg.to_record()).statistics == reg
    scores = rng.normal(size=(300, 3))
    cls = classification_statistics(rng.integers(0, 3, 300), scores, 3)
    back = EvaluationReply.from_record(cls.to_record(), "classification", 3).statistics
    assert back.to_record() == cls.to_record()


def test_no_examples_carry_no_sums():
    """Zero examples escape the count cap (nothing to scale), so sums beside them went into
    the pool at full size: n = 0 with a squared-error sum of 1e300 set the federated RMSE."""
    empty = {k: 0.0 for k in HONEST} | {"num-examples": 0}
    with pytest.raises(MessageRejected):
        _parse({**empty, "squared-error-sum": 1e300})
    with pytest.raises(MessageRejected):
        _parse({**empty, "target-sum": 5.0})
    assert _parse(empty).statistics.num_examples == 0
