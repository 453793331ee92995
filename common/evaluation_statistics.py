"""The sufficient statistics by which an institution releases its held-out metrics: what is
released, how it is computed from predictions, decoded and checked where it arrives
(:func:`statistics_from_record`), pooled over institutions (:func:`pool_statistics`) and scaled
to a bounded weight (:func:`scale_statistics`). The metrics computed from them are
:func:`common.metrics.metrics_from_statistics`.

Released per institution and round (not covered by DP; see
:func:`common.privacy.statement.privacy_statement`):

* classification: ``num-examples``; ``confusion`` (k x k counts, rows the true class,
  columns the predicted one); ``score-histogram``: for each scored class (class 1 when k = 2;
  every class, one-vs-rest, when k > 2) the counts of held-out examples whose predicted
  probability of that class falls in each of ``score-bins`` equal bins on [0, 1], split into
  examples of another class and of that class; ``log-loss-sum`` (sum of cross-entropies).
* regression: ``num-examples``, ``squared-error-sum``, ``absolute-error-sum``,
  ``target-sum``, ``target-squared-sum``; with returns also ``direction-moved`` (true value
  nonzero) and ``direction-correct`` (of those, prediction of the same sign).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AUC_BINS = 100  # equal bins on [0, 1] of the released score histograms


def log_probabilities(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """Per-class log-probabilities of ``scores``: class probabilities, or logits (log-softmax)."""
    if probabilities:
        with np.errstate(divide="ignore"):
            return np.log(np.clip(scores, 0.0, 1.0))
    z = scores - scores.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def scored_predictions(
    y_true: np.ndarray, scores: np.ndarray, num_classes: int, probabilities: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, log-probabilities (n, k), predicted classes), after checking the input."""
    y = np.asarray(y_true).ravel()
    if len(y) and not (np.all(np.mod(y, 1) == 0) and y.min() >= 0 and y.max() < num_classes):
        raise ValueError(f"labels must be integers in [0, {num_classes}), got {np.unique(y)[:8]}")
    y = y.astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    s = s.reshape(len(y), -1) if len(y) else np.zeros((0, num_classes))
    if s.shape[1] == 1 and num_classes == 2:  # one score for class 1
        s = np.hstack([1.0 - s, s]) if probabilities else np.hstack([np.zeros_like(s), s])
    if s.shape[1] != num_classes:
        raise ValueError(f"scores have {s.shape[1]} columns for {num_classes} classes")
    return y, log_probabilities(s, probabilities), s.argmax(axis=1)


@dataclass(frozen=True)
class ClassificationStatistics:
    """Sufficient statistics of one held-out split (or a pool of them), classification.

    ``confusion``: (k, k) counts, ``[true, predicted]``. ``score_histogram``: (m, 2, bins)
    counts; m = 1 (class 1) when k = 2, else k (one-vs-rest); ``[c, 0]`` examples not of the
    scored class, ``[c, 1]`` examples of it; None when a score was not finite (AUC unknown).
    ``log_loss_sum``: None when not finite."""

    confusion: np.ndarray
    score_histogram: np.ndarray | None
    log_loss_sum: float | None

    @property
    def num_examples(self) -> int:
        return int(self.confusion.sum())

    def to_record(self) -> dict:
        """The released record (a Flower MetricRecord's values: ints, floats, lists)."""
        record: dict = {
            "num-examples": self.num_examples,
            "confusion": [int(v) for v in self.confusion.ravel()],
        }
        if self.score_histogram is not None:
            record["score-bins"] = int(self.score_histogram.shape[2])
            record["score-histogram"] = [int(v) for v in self.score_histogram.ravel()]
        if self.log_loss_sum is not None:
            record["log-loss-sum"] = float(self.log_loss_sum)
        return record


@dataclass(frozen=True)
class RegressionStatistics:
    """Sufficient statistics of one held-out split (or a pool), regression. The direction
    counts are None unless the targets are returns."""

    num_examples: int
    squared_error_sum: float
    absolute_error_sum: float
    target_sum: float
    target_squared_sum: float
    direction_moved: int | None = None
    direction_correct: int | None = None

    def to_record(self) -> dict:
        record: dict = {
            "num-examples": int(self.num_examples),
            "squared-error-sum": float(self.squared_error_sum),
            "absolute-error-sum": float(self.absolute_error_sum),
            "target-sum": float(self.target_sum),
            "target-squared-sum": float(self.target_squared_sum),
        }
        if self.direction_moved is not None:
            record["direction-moved"] = int(self.direction_moved)
            record["direction-correct"] = int(self.direction_correct or 0)
        return record


EvaluationStatistics = ClassificationStatistics | RegressionStatistics


def _scored_classes(num_classes: int) -> list[int]:
    return [1] if num_classes == 2 else list(range(num_classes))


def classification_statistics(
    y_true: np.ndarray,
    scores: np.ndarray,
    num_classes: int,
    *,
    probabilities: bool = False,
    bins: int = AUC_BINS,
) -> ClassificationStatistics:
    """The released statistics of predictions ``scores`` (as :func:`classification_metrics`
    takes them) on labels ``y_true``: confusion counts, score histograms, log-loss sum."""
    y, log_p, pred = scored_predictions(y_true, scores, num_classes, probabilities)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    probs = np.exp(log_p)
    classes = _scored_classes(num_classes)
    histogram = None
    if np.isfinite(probs).all():
        histogram = np.zeros((len(classes), 2, bins), dtype=np.int64)
        for i, c in enumerate(classes):
            b = np.clip(np.floor(probs[:, c] * bins), 0, bins - 1).astype(np.int64)
            np.add.at(histogram[i], ((y == c).astype(np.int64), b), 1)
    loss = float(-log_p[np.arange(len(y)), y].sum()) if len(y) else 0.0
    return ClassificationStatistics(confusion, histogram, loss if math.isfinite(loss) else None)


def regression_statistics(
    y_true: np.ndarray, y_pred: np.ndarray, directional: bool
) -> RegressionStatistics:
    """The released statistics of ``y_pred`` against ``y_true`` (see the module docstring)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).reshape(len(y))
    err = p - y
    moved = y != 0
    return RegressionStatistics(
        len(y),
        float(np.sum(err**2)),
        float(np.sum(np.abs(err))),
        float(np.sum(y)),
        float(np.sum(y**2)),
        int(moved.sum()) if directional else None,
        int((np.sign(p[moved]) == np.sign(y[moved])).sum()) if directional else None,
    )


def _count(record: dict, key: str) -> int:
    v = record.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} {v!r} is not a count")
    return v


def _finite(record: dict, key: str, nonnegative: bool = False) -> float:
    v = record.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key} {v!r} is not a finite number")
    if nonnegative and v < 0:
        raise ValueError(f"{key} {v!r} is negative")
    return float(v)


def _counts(record: dict, key: str, size: int) -> np.ndarray:
    v = record.get(key)
    if not isinstance(v, list) or len(v) != size:
        raise ValueError(f"{key} must be a list of {size} counts")
    a = np.asarray(v)
    if a.dtype.kind not in "iu" or (a < 0).any():
        raise ValueError(f"{key} must hold non-negative integer counts")
    return a.astype(np.int64)


def statistics_from_record(record: dict, task: str, num_classes: int) -> EvaluationStatistics:
    """Decode and check a released record (what arrives from an institution); ValueError
    naming the first inconsistency (wrong sizes, negative or non-integer counts, counts that
    do not add up to ``num-examples``, non-finite sums)."""
    n = _count(record, "num-examples")
    if task == "regression":
        moved = correct = None
        if "direction-moved" in record:
            moved, correct = _count(record, "direction-moved"), _count(record, "direction-correct")
            if not correct <= moved <= n:
                raise ValueError(f"direction counts {correct} <= {moved} <= {n} do not hold")
        return RegressionStatistics(
            n,
            _finite(record, "squared-error-sum", True),
            _finite(record, "absolute-error-sum", True),
            _finite(record, "target-sum"),
            _finite(record, "target-squared-sum", True),
            moved,
            correct,
        )
    k = num_classes
    confusion = _counts(record, "confusion", k * k).reshape(k, k)
    if confusion.sum() != n:
        raise ValueError(f"confusion counts add up to {confusion.sum()}, not num-examples {n}")
    histogram = None
    if "score-histogram" in record:
        bins = _count(record, "score-bins")
        if not 1 <= bins <= 10_000:
            raise ValueError(f"score-bins {bins} is outside [1, 10000]")
        classes = _scored_classes(k)
        histogram = _counts(record, "score-histogram", len(classes) * 2 * bins)
        histogram = histogram.reshape(len(classes), 2, bins)
        for i, c in enumerate(classes):
            pos, neg = int(histogram[i, 1].sum()), int(histogram[i, 0].sum())
            if pos != confusion[c].sum() or pos + neg != n:
                raise ValueError(f"score histogram of class {c} disagrees with the confusion")
    loss = _finite(record, "log-loss-sum", True) if "log-loss-sum" in record else None
    return ClassificationStatistics(confusion, histogram, loss)


def pool_statistics(parts: list[EvaluationStatistics]) -> EvaluationStatistics | None:
    """The statistics of the union of the parts' held-out sets (None for no part). A sum
    or histogram that one part with examples lacks is unknown for the pool."""
    if not parts:
        return None
    if isinstance(parts[0], RegressionStatistics):
        directional = all(p.direction_moved is not None for p in parts)
        return RegressionStatistics(
            sum(p.num_examples for p in parts),
            sum(p.squared_error_sum for p in parts),
            sum(p.absolute_error_sum for p in parts),
            sum(p.target_sum for p in parts),
            sum(p.target_squared_sum for p in parts),
            sum(p.direction_moved for p in parts) if directional else None,
            sum(p.direction_correct for p in parts) if directional else None,
        )
    counted = [p for p in parts if p.num_examples]
    shapes = {p.score_histogram.shape for p in counted if p.score_histogram is not None}
    histogram = None
    if len(shapes) == 1 and all(p.score_histogram is not None for p in counted):
        histogram = sum(p.score_histogram for p in counted)
    losses = [p.log_loss_sum for p in counted]
    return ClassificationStatistics(
        sum(p.confusion for p in parts),
        histogram,
        None if None in losses else float(sum(losses)),
    )


def _rounded(counts: np.ndarray, factor: float, total: int) -> np.ndarray:
    """``counts`` x ``factor`` as integers adding up to ``total`` (largest remainders; each
    is its exact value's floor or ceiling when ``total`` is within 1 of the exact sum)."""
    exact = counts.astype(np.float64).ravel() * factor
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        out[np.argsort(out - exact, kind="stable")[:short]] += 1
    elif short < 0:  # only from float rounding: take from the smallest remainders
        order = np.argsort(exact - out, kind="stable")
        out[order[out[order] > 0][:-short]] -= 1
    return out.reshape(counts.shape)


def scale_statistics(stats: EvaluationStatistics, factor: float) -> EvaluationStatistics:
    """The statistics of a held-out set ``factor`` times as large with the same metrics, so
    that pooling weighs the institution by a bounded count (server.aggregation caps it).
    Counts stay integers (largest-remainder rounding: the confusion adds up to the new
    count, each score histogram to it and to its class's row); sums are scaled by the
    rounded count's ratio, so regression metrics and the mean loss are unchanged exactly."""
    if not (factor >= 0 and math.isfinite(factor)):
        raise ValueError(f"scale factor {factor!r} must be finite and >= 0")
    n = stats.num_examples
    if not n:
        return stats
    total = int(round(n * factor))
    ratio = total / n
    if isinstance(stats, RegressionStatistics):
        moved = correct = None
        if stats.direction_moved is not None:
            moved = min(total, int(round(stats.direction_moved * ratio)))
            correct = min(moved, int(round((stats.direction_correct or 0) * ratio)))
        return RegressionStatistics(
            total,
            stats.squared_error_sum * ratio,
            stats.absolute_error_sum * ratio,
            stats.target_sum * ratio,
            stats.target_squared_sum * ratio,
            moved,
            correct,
        )
    # Row totals first, then each row within its total: every rounded count stays within 1
    # of its exact value, so the histograms can be rounded to the rows' totals.
    rows = _rounded(stats.confusion.sum(axis=1), ratio, total)
    confusion = np.stack(
        [_rounded(r, ratio, t) for r, t in zip(stats.confusion, rows, strict=True)]
    )
    histogram = None
    if stats.score_histogram is not None:
        histogram = np.zeros_like(stats.score_histogram)
        for i, c in enumerate(_scored_classes(len(confusion))):
            positives = int(confusion[c].sum())
            histogram[i, 1] = _rounded(stats.score_histogram[i, 1], ratio, positives)
            histogram[i, 0] = _rounded(stats.score_histogram[i, 0], ratio, total - positives)
    loss = None if stats.log_loss_sum is None else stats.log_loss_sum * ratio
    return ClassificationStatistics(confusion, histogram, loss)
