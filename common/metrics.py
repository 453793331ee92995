"""Task metrics, and the sufficient statistics by which institutions release them.

An institution never releases a metric computed on its data; it releases the *sufficient
statistics* of its held-out split (counts and sums: what they are, how they are computed,
decoded, pooled and scaled is :mod:`common.evaluation_statistics`), and the server computes
every metric from them (:func:`metrics_from_statistics`), per institution and on the pool of
all institutions' statistics (:func:`pool_statistics`), i.e. as if on the pooled held-out set.

Metrics (names as in ``metrics.jsonl`` with ``_`` for ``-``): classification ``accuracy``,
``balanced-accuracy`` (mean recall over the classes present), ``macro-f1`` (over the classes
present in labels or predictions, as scikit-learn's), ``roc-auc`` (binary: class 1; more
classes: macro mean of one-vs-rest AUCs over the classes with positives and negatives) with
``roc-auc-bin-error``, ``loss`` (mean cross-entropy); regression ``rmse``, ``mae``, ``r2``,
``loss`` (MSE) and for returns ``directional-accuracy``. All are exact except ROC AUC, which
counts every positive/negative pair within one bin as a tie: its distance to the exact AUC is
at most ``roc-auc-bin-error`` = 0.5 * (pairs sharing a bin) / (positives * negatives),
computed from the same histograms. A metric undefined on the statistics (no example, one class
only, every true value 0) is absent.

:func:`classification_metrics` and :func:`regression_metrics` compute the metrics exactly
from predictions (ROC AUC as the exact rank statistic), for local use and as the reference.
"""

from __future__ import annotations

import math

import numpy as np

from ferry.common.evaluation_statistics import (
    EvaluationStatistics,
    RegressionStatistics,
    scored_predictions,
)

# The metric a run is judged by, per task: read it through headline_metric.
HEADLINE = {"classification": "accuracy", "regression": "rmse"}
_HIGHER = {"accuracy", "balanced-accuracy", "macro-f1", "roc-auc", "r2", "directional-accuracy"}
_LOWER = {"loss", "rmse", "mae", "roc-auc-bin-error"}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (``roc-auc`` and ``roc_auc`` alike).
    ValueError for a name this module does not produce."""
    name = metric.replace("_", "-")
    if name in _HIGHER:
        return True
    if name in _LOWER:
        return False
    raise ValueError(f"unknown metric {metric!r}: known are {', '.join(sorted(_HIGHER | _LOWER))}")


def headline_metric(task: str) -> str:
    """The metric a run on ``task`` is judged by (``HEADLINE``): the one ``ferry server``
    reports at the end, a pretrained backbone records (``source_val_<metric>``) and ``ferry
    tune`` maximises. ValueError for a task this module does not know."""
    try:
        return HEADLINE[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}: known are {', '.join(HEADLINE)}") from None


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Exact ROC AUC of ``score`` for the positive class (``y_true`` truthy = positive):
    the Mann-Whitney U statistic over average ranks, so a positive and a negative with
    equal scores count one half. NaN when either class is absent or a score is NaN."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if len(s) != len(y):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    new_run = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(new_run)  # 0-based first position of each run of equal scores
    ends = np.r_[starts[1:], len(s)]  # exclusive
    run_rank = (starts + ends + 1) / 2.0  # average of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = run_rank[np.cumsum(new_run) - 1]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def classification_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    num_classes: int,
    *,
    probabilities: bool = False,
) -> dict[str, float]:
    """Metrics of class ``scores`` against integer labels ``y_true`` in ``[0, num_classes)``,
    exactly, from the predictions (local use; the reference for the released statistics).

    ``scores`` is ``(n, num_classes)`` logits (default) or, with ``probabilities=True``,
    class probabilities whose rows sum to 1. For ``num_classes == 2`` an ``(n,)`` or
    ``(n, 1)`` array is accepted too: the logit (or probability) of class 1.

    Returns ``accuracy``; ``balanced-accuracy`` (mean recall over the classes present in
    ``y_true``, as scikit-learn's); ``roc-auc`` (binary: AUC of class 1's probability;
    more classes: macro mean of one-vs-rest AUCs over the classes that have both positives
    and negatives in ``y_true``; NaN when there is none, e.g. one class only) and ``loss``
    (mean cross-entropy, natural log). Empty input gives ``{}``."""
    y, log_p, pred = scored_predictions(y_true, scores, num_classes, probabilities)
    if not len(y):
        return {}
    probs = np.exp(log_p)
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    if num_classes == 2:
        auc = binary_auc(y == 1, probs[:, 1])
    else:
        aucs = [binary_auc(y == c, probs[:, c]) for c in range(num_classes)]
        aucs = [a for a in aucs if not math.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    return {
        "accuracy": float((pred == y).mean()),
        "balanced-accuracy": float(np.mean(recalls)),
        "roc-auc": auc,
        "loss": float(-np.mean(log_p[np.arange(len(y)), y])),
    }


def regression_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, directional: bool
) -> dict[str, float]:
    """``rmse``, ``mae`` and ``loss`` (mean squared error) of ``y_pred``, exactly (local use);
    with ``directional`` (targets are returns) also ``directional-accuracy``: the fraction of
    examples with a nonzero true value whose prediction has the same sign (a prediction
    of exactly 0 counts as wrong; NaN when every true value is 0). Empty input gives ``{}``."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    if not len(y):
        return {}
    p = np.asarray(y_pred, dtype=np.float64).reshape(len(y))
    err = p - y
    mse = float(np.mean(err**2))
    out = {"rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(err))), "loss": mse}
    if directional:
        moved = y != 0
        out["directional-accuracy"] = (
            float((np.sign(p[moved]) == np.sign(y[moved])).mean()) if moved.any() else float("nan")
        )
    return out


def _histogram_auc(neg: np.ndarray, pos: np.ndarray) -> tuple[float, float]:
    """(AUC counting same-bin pairs as ties, its largest distance to the exact AUC).
    In float64: products of pooled int64 counts (up to 1e9 per institution) overflow."""
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    p, n = float(pos.sum()), float(neg.sum())
    if not p or not n:
        return math.nan, math.nan
    below = np.cumsum(neg) - neg  # negatives in lower bins
    ties = float(np.dot(pos, neg))
    return float(np.dot(pos, below) + 0.5 * ties) / (p * n), 0.5 * ties / (p * n)


def metrics_from_statistics(stats: EvaluationStatistics) -> dict[str, float]:
    """The metrics (see the module docstring) of a held-out set with these statistics;
    undefined metrics are absent, so every value is finite."""
    n = stats.num_examples
    if not n:
        return {}
    if isinstance(stats, RegressionStatistics):
        mse = stats.squared_error_sum / n
        out = {"rmse": math.sqrt(mse), "mae": stats.absolute_error_sum / n, "loss": mse}
        spread = stats.target_squared_sum - stats.target_sum**2 / n
        if spread > 0:
            out["r2"] = 1.0 - stats.squared_error_sum / spread
        if stats.direction_moved:
            out["directional-accuracy"] = stats.direction_correct / stats.direction_moved
        return out
    cm = stats.confusion.astype(np.float64)
    true, predicted, hits = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = true > 0
    seen = present | (predicted > 0)
    out = {
        "accuracy": float(hits.sum() / n),
        "balanced-accuracy": float(np.mean(hits[present] / true[present])),
        "macro-f1": float(np.mean(2 * hits[seen] / (true[seen] + predicted[seen]))),
    }
    if stats.score_histogram is not None:
        pairs = [_histogram_auc(h[0], h[1]) for h in stats.score_histogram]
        pairs = [pair for pair in pairs if not math.isnan(pair[0])]
        if pairs:
            out["roc-auc"] = float(np.mean([a for a, _ in pairs]))
            out["roc-auc-bin-error"] = float(np.mean([e for _, e in pairs]))
    if stats.log_loss_sum is not None:
        out["loss"] = stats.log_loss_sum / n
    return out
