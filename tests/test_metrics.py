"""Task metrics (common.metrics) against scikit-learn, and the pooled released statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ferry.common.evaluation_statistics import (
    classification_statistics,
    pool_statistics,
    regression_statistics,
    statistics_from_record,
)
from ferry.common.metrics import (
    HEADLINE,
    binary_auc,
    classification_metrics,
    headline_metric,
    higher_is_better,
    metrics_from_statistics,
    regression_metrics,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _classified(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits that carry some signal. Logit rows come from a small pool, so many
    examples (of both labels) share a row and their scores tie exactly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pool = rng.normal(size=(12, k))
    logits = pool[rng.integers(0, len(pool), n)] + 1.5 * np.eye(k)[rng.integers(0, k, n)]
    right = rng.random(n) < 0.5  # half the examples get their true class pushed up
    logits[right] = pool[rng.integers(0, len(pool), right.sum())] + 1.5 * np.eye(k)[y[right]]
    return y, logits


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn_with_tied_scores(seed):
    y, logits = _classified(seed, 300, 2)
    probs = _softmax(logits)
    assert len(np.unique(probs[:, 1])) < 200  # ties really occur
    got = classification_metrics(y, logits, 2)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, logits.argmax(1)))
    assert got["balanced-accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, logits.argmax(1))
    )
    assert got["roc-auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert got["loss"] == pytest.approx(skm.log_loss(y, probs, labels=[0, 1]))


@pytest.mark.parametrize("k", [3, 5])
def test_multiclass_auc_is_sklearn_macro_one_vs_rest(k):
    y, logits = _classified(k, 400, k)
    probs = _softmax(logits)
    got = classification_metrics(y, logits, k)
    want = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(k))
    assert got["roc-auc"] == pytest.approx(want, abs=1e-12)
    assert got["balanced-accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, logits.argmax(1))
    )
    assert got["loss"] == pytest.approx(skm.log_loss(y, probs, labels=range(k)))


def test_auc_counts_ties_one_half_exactly():
    assert binary_auc([0, 1], [0.3, 0.3]) == 0.5
    # positives 0.2, 0.5; negatives 0.2, 0.1: pairs (0.2 vs 0.2) = 1/2, the other three = 1.
    assert binary_auc([1, 0, 1, 0], [0.2, 0.2, 0.5, 0.1]) == pytest.approx(3.5 / 4)
    assert binary_auc([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.1]) == 1.0
    assert binary_auc([1, 1, 0, 0], [0.1, 0.2, 0.7, 0.9]) == 0.0


def test_auc_of_many_ties_matches_sklearn_on_a_large_sample():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 20_000)
    score = rng.integers(0, 30, 20_000) + 3 * y  # 33 distinct values
    assert binary_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)


def test_single_class_split_gives_nan_auc_but_defined_accuracy():
    y = np.zeros(6, dtype=np.int64)
    logits = np.array([[2.0, 0.0]] * 4 + [[0.0, 2.0]] * 2)
    got = classification_metrics(y, logits, 2)
    assert math.isnan(got["roc-auc"])
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["balanced-accuracy"] == pytest.approx(4 / 6)  # recall of the one class present
    got3 = classification_metrics(np.full(4, 2), np.eye(3)[[0, 1, 2, 2]], 3)
    assert math.isnan(got3["roc-auc"])


def test_multiclass_auc_averages_only_classes_present_with_both_labels():
    y, logits = _classified(11, 200, 4)
    keep = y != 3  # class 3 absent: its one-vs-rest AUC is undefined and left out
    y, logits = y[keep], logits[keep]
    probs = _softmax(logits)
    want = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert classification_metrics(y, logits, 4)["roc-auc"] == pytest.approx(want, abs=1e-12)


def test_probabilities_and_single_binary_score_give_the_same_metrics_as_logits():
    y, logits = _classified(3, 120, 2)
    reference = classification_metrics(y, logits, 2)
    from_probs = classification_metrics(y, _softmax(logits), 2, probabilities=True)
    one_logit = classification_metrics(y, logits[:, 1] - logits[:, 0], 2)
    one_prob = classification_metrics(y, _softmax(logits)[:, 1:], 2, probabilities=True)
    for other in (from_probs, one_logit, one_prob):
        assert other.keys() == reference.keys()
        for key in reference:
            assert other[key] == pytest.approx(reference[key], abs=1e-9), key


def test_cross_entropy_stays_exact_for_confident_wrong_logits():
    got = classification_metrics(np.array([0]), np.array([[0.0, 100.0]]), 2)
    assert got["loss"] == pytest.approx(100.0)  # not capped by a probability clip


def test_classification_rejects_labels_and_widths_that_do_not_fit():
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.array([0, 3]), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="columns"):
        classification_metrics(np.array([0, 1]), np.zeros((2, 4)), 3)


def test_empty_splits_give_no_metrics():
    assert classification_metrics(np.zeros(0, np.int64), np.zeros((0, 1)), 3) == {}
    assert regression_metrics(np.zeros(0), np.zeros((0, 1)), directional=True) == {}


# ---------------------------------------------------------------- regression


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.5, size=200)
    got = regression_metrics(y, pred[:, None], directional=False)
    assert set(got) == {"rmse", "mae", "loss"}
    assert got["loss"] == pytest.approx(skm.mean_squared_error(y, pred))
    assert got["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, pred)))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))


def test_directional_accuracy_ignores_flat_targets_and_counts_zero_predictions_wrong():
    y = np.array([1.0, -2.0, 0.0, 3.0, -1.0, 0.0])
    pred = np.array([0.5, -0.1, 5.0, -1.0, 0.0, -3.0])
    # Moved examples: right, right, wrong (sign), wrong (0 predicted) -> 2 / 4.
    assert regression_metrics(y, pred, directional=True)["directional-accuracy"] == 0.5
    flat = regression_metrics(np.zeros(3), np.ones(3), directional=True)
    assert math.isnan(flat["directional-accuracy"])


# ---------------------------------------------------------------- released statistics


def _pooled_classification(seed: int, k: int, cuts) -> tuple:
    y, logits = _classified(seed, cuts[-1][1], k)
    parts = [classification_statistics(y[a:b], logits[a:b], k) for a, b in cuts]
    return y, logits, parts


@pytest.mark.parametrize("k", [2, 3, 5])
def test_metrics_of_pooled_statistics_equal_sklearn_on_pooled_predictions(k):
    y, logits, parts = _pooled_classification(k, k, [(0, 40), (40, 41), (41, 180), (180, 400)])
    pooled = metrics_from_statistics(pool_statistics(parts))
    pred, probs = logits.argmax(1), _softmax(logits)
    assert pooled["accuracy"] == skm.accuracy_score(y, pred)
    assert pooled["balanced-accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, pred), abs=1e-15
    )
    assert pooled["macro-f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-15)
    assert pooled["loss"] == pytest.approx(skm.log_loss(y, probs, labels=range(k)), rel=1e-12)
    exact = classification_metrics(y, logits, k)["roc-auc"]
    assert 0 < pooled["roc-auc-bin-error"] < 0.05
    assert abs(pooled["roc-auc"] - exact) <= pooled["roc-auc-bin-error"] + 1e-12


def test_histogram_auc_is_exact_when_no_pair_shares_a_bin():
    y = np.array([0, 0, 1, 0, 1, 1])
    p1 = np.array([0.05, 0.15, 0.25, 0.45, 0.75, 0.95])  # one example per bin
    stats = classification_statistics(y, p1, 2, probabilities=True)
    got = metrics_from_statistics(stats)
    assert got["roc-auc-bin-error"] == 0.0
    assert got["roc-auc"] == pytest.approx(skm.roc_auc_score(y, p1), abs=1e-15)


def test_histogram_auc_error_bound_is_reached_when_all_scores_share_one_bin():
    y = np.array([0, 1, 0, 1])
    p1 = np.array([0.500, 0.501, 0.502, 0.503])  # exact AUC 0.75, one bin: counted 0.5
    got = metrics_from_statistics(classification_statistics(y, p1, 2, probabilities=True))
    assert got["roc-auc"] == 0.5 and got["roc-auc-bin-error"] == 0.5
    assert abs(got["roc-auc"] - skm.roc_auc_score(y, p1)) <= got["roc-auc-bin-error"]


def test_regression_statistics_pool_to_sklearn_metrics():
    rng = np.random.default_rng(5)
    parts = [(rng.normal(2, 1, n), rng.normal(2, 1, n)) for n in (10, 40, 150)]
    parts[0][0][:3] = 0.0  # true values of 0 do not count for direction
    stats = [regression_statistics(y, p, directional=True) for y, p in parts]
    got = metrics_from_statistics(pool_statistics(stats))
    y = np.concatenate([y for y, _ in parts])
    p = np.concatenate([p for _, p in parts])
    assert got["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)), rel=1e-12)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, p), rel=1e-12)
    assert got["loss"] == pytest.approx(skm.mean_squared_error(y, p), rel=1e-12)
    assert got["r2"] == pytest.approx(skm.r2_score(y, p), rel=1e-9)
    exact = regression_metrics(y, p, directional=True)
    assert got["directional-accuracy"] == exact["directional-accuracy"]
    plain_mean_rmse = np.mean([metrics_from_statistics(s)["rmse"] for s in stats])
    assert got["rmse"] != pytest.approx(plain_mean_rmse)


def test_statistics_record_round_trips_and_undefined_metrics_are_absent():
    y, logits = _classified(1, 50, 3)
    stats = classification_statistics(y, logits, 3)
    back = statistics_from_record(stats.to_record(), "classification", 3)
    assert metrics_from_statistics(back) == metrics_from_statistics(stats)
    one_class = metrics_from_statistics(
        classification_statistics(np.zeros(4), np.eye(3)[[0, 0, 0, 1]], 3)
    )
    assert "roc-auc" not in one_class and one_class["accuracy"] == 0.75
    empty = classification_statistics(np.zeros(0, np.int64), np.zeros((0, 3)), 3)
    assert empty.num_examples == 0 and metrics_from_statistics(empty) == {}
    flat = metrics_from_statistics(regression_statistics(np.zeros(3), np.ones(3), True))
    assert "directional-accuracy" not in flat and "r2" not in flat and flat["rmse"] == 1.0
    reg = regression_statistics(np.ones(3), np.zeros(3), True)
    assert statistics_from_record(reg.to_record(), "regression", 0) == reg


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"num-examples": 51}, "confusion counts add up"),
        ({"confusion": [1] * 8}, "list of 9 counts"),
        ({"confusion": [-1] + [0] * 8}, "non-negative integer"),
        ({"score-bins": 0}, "outside"),
        ({"log-loss-sum": float("inf")}, "finite"),
        ({"num-examples": True}, "not a count"),
    ],
)
def test_hostile_statistics_record_is_refused_with_the_reason(change, problem):
    y, logits = _classified(1, 50, 3)
    record = {**classification_statistics(y, logits, 3).to_record(), **change}
    with pytest.raises(ValueError, match=problem):
        statistics_from_record(record, "classification", 3)


def test_hostile_histogram_that_disagrees_with_confusion_is_refused():
    y, logits = _classified(1, 50, 2)
    record = classification_statistics(y, logits, 2).to_record()
    hist = record["score-histogram"]
    i, j = hist.index(next(v for v in hist if v > 0)), len(hist) - 1
    hist[i], hist[j] = hist[i] - 1, hist[j] + 1  # one negative moved to the positives
    with pytest.raises(ValueError, match="disagrees"):
        statistics_from_record(record, "classification", 2)


def test_headline_metrics_and_their_direction():
    assert HEADLINE == {"classification": "accuracy", "regression": "rmse"}
    assert higher_is_better("accuracy") and higher_is_better("roc_auc")
    assert higher_is_better("directional-accuracy")
    assert not higher_is_better("rmse") and not higher_is_better("loss")
    with pytest.raises(ValueError, match="unknown metric"):
        higher_is_better("train-loss")


def test_each_task_has_one_headline_metric_that_every_run_summarises():
    from ferry.server.outputs import FINAL_METRICS

    assert headline_metric("classification") == "accuracy"
    assert headline_metric("regression") == "rmse"
    assert all(headline_metric(task) in FINAL_METRICS for task in HEADLINE)
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        headline_metric("ranking")
