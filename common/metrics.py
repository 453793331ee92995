"""Task metrics, computed by each institution on its held-out split, and their federated
aggregation on the server.

Classification: ``accuracy``, ``balanced-accuracy``, ``roc-auc``, ``loss`` (cross-entropy).
Regression: ``rmse``, ``mae``, ``loss`` (MSE), and for returns ``directional-accuracy``.
Pure numpy; ROC AUC is the exact rank statistic (Mann-Whitney U, tied scores count one
half), equal to scikit-learn's ``roc_auc_score``.

A metric that is undefined on a split (AUC when ``y_true`` holds one class; directional
accuracy when every true value is 0) is NaN here. NaN (non-finite) values are dropped before
a client releases its metrics (:func:`client.runtime.evaluate_round`) and skipped by
:func:`aggregate_metrics`, so a released record only ever holds defined numbers.
Evaluation metrics are released without DP (see the README's privacy model).
"""

from __future__ import annotations

import math

import numpy as np

# The metric a run is judged by, per task (``ferry simulate``'s summary, benchmarks).
HEADLINE = {"classification": "accuracy", "regression": "rmse"}
_HIGHER = {"accuracy", "balanced-accuracy", "roc-auc", "directional-accuracy"}
_LOWER = {"loss", "rmse", "mae"}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (``roc-auc`` and ``roc_auc`` alike).
    ValueError for a name this module does not produce."""
    name = metric.replace("_", "-")
    if name in _HIGHER:
        return True
    if name in _LOWER:
        return False
    raise ValueError(f"unknown metric {metric!r}: known are {', '.join(sorted(_HIGHER | _LOWER))}")


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


def _log_probabilities(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    if probabilities:
        with np.errstate(divide="ignore"):
            return np.log(np.clip(scores, 0.0, 1.0))
    z = scores - scores.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def classification_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    num_classes: int,
    *,
    probabilities: bool = False,
) -> dict[str, float]:
    """Metrics of class ``scores`` against integer labels ``y_true`` in ``[0, num_classes)``.

    ``scores`` is ``(n, num_classes)`` logits (default) or, with ``probabilities=True``,
    class probabilities whose rows sum to 1. For ``num_classes == 2`` an ``(n,)`` or
    ``(n, 1)`` array is accepted too: the logit (or probability) of class 1.

    Returns ``accuracy``; ``balanced-accuracy`` (mean recall over the classes present in
    ``y_true``, as scikit-learn's); ``roc-auc`` (binary: AUC of class 1's probability;
    more classes: macro mean of one-vs-rest AUCs over the classes that have both positives
    and negatives in ``y_true``; NaN when there is none, e.g. one class only) and ``loss``
    (mean cross-entropy, natural log). Empty input gives ``{}``."""
    y = np.asarray(y_true).ravel()
    if not len(y):
        return {}
    if not (np.all(np.mod(y, 1) == 0) and y.min() >= 0 and y.max() < num_classes):
        raise ValueError(f"labels must be integers in [0, {num_classes}), got {np.unique(y)[:8]}")
    y = y.astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(len(y), -1)
    if s.shape[1] == 1 and num_classes == 2:  # one score for class 1
        s = np.hstack([1.0 - s, s]) if probabilities else np.hstack([np.zeros_like(s), s])
    if s.shape[1] != num_classes:
        raise ValueError(f"scores have {s.shape[1]} columns for {num_classes} classes")
    log_p = _log_probabilities(s, probabilities)
    probs = np.exp(log_p)
    pred = s.argmax(axis=1)
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
    """``rmse``, ``mae`` and ``loss`` (mean squared error) of ``y_pred``; with
    ``directional`` (targets are returns) also ``directional-accuracy``: the fraction of
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


def aggregate_metrics(per_client: list[tuple[int, dict]]) -> dict[str, float]:
    """Federated metrics from ``(num_examples, local_metrics)`` per client.

    Each metric is the example-weighted mean of the local values over the clients that
    report it with a finite value and at least one example (weights renormalised over
    those clients); ``rmse`` is the square root of the weighted mean of squared local RMSEs,
    i.e. the pooled RMSE. Accuracy, MAE, MSE ``loss`` and cross-entropy ``loss`` are thus
    the pooled metrics exactly. Federated ``roc-auc``, ``balanced-accuracy`` and
    ``directional-accuracy`` are weighted means of local values, *not* the metric of the
    pooled predictions (which no one holds). A metric no client reports is absent."""
    keys = sorted({k for _, m in per_client for k in m})
    out: dict[str, float] = {}
    for key in keys:
        pairs = [
            (n, float(m[key]))
            for n, m in per_client
            if key in m and n > 0 and math.isfinite(float(m[key]))
        ]
        total = sum(n for n, _ in pairs)
        if not total:
            continue
        if key == "rmse":
            out[key] = math.sqrt(sum(n * v * v for n, v in pairs) / total)
        else:
            out[key] = sum(n * v for n, v in pairs) / total
    return out
