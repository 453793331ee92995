"""Task metrics, computed by each institution on its held-out split, and their federated
aggregation on the server.

Classification: accuracy, balanced accuracy, ROC AUC, cross-entropy. Regression: RMSE, MAE,
MSE, and for returns directional accuracy. Pure numpy; ROC AUC is the exact rank statistic
(Mann-Whitney U with tie handling). A metric that is undefined on a split (AUC with one class
present) is NaN, and NaN values are dropped before release.
Evaluation metrics are released without DP (see the README's privacy model).
"""

from __future__ import annotations

import math

import numpy as np

HEADLINE = {"classification": "accuracy", "regression": "rmse"}
_LOWER_IS_BETTER = {"loss", "rmse", "mae"}


def higher_is_better(metric: str) -> bool:
    return metric.replace("_", "-") not in _LOWER_IS_BETTER


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the positive class (``y_true`` in {0, 1}); NaN when one
    class is absent. Ties count one half."""
    y = np.asarray(y_true).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, num_classes: int) -> dict:
    """``accuracy``, ``balanced-accuracy`` (mean recall over the classes present),
    ``roc-auc`` (binary: of class 1's score; more classes: macro one-vs-rest over classes
    with positives and negatives present) and ``loss`` (cross-entropy) of ``logits``."""
    y = np.asarray(y_true, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64).reshape(len(y), -1)
    if not len(y):
        return {}
    probs = _softmax(logits)
    pred = probs.argmax(axis=1)
    present = np.unique(y)
    recalls = [float((pred[y == c] == c).mean()) for c in present]
    if num_classes == 2:
        auc = binary_auc(y == 1, probs[:, 1])
    else:
        aucs = [binary_auc(y == c, probs[:, c]) for c in range(num_classes)]
        aucs = [a for a in aucs if not math.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    return {
        "accuracy": float((pred == y).mean()),
        "balanced-accuracy": float(np.mean(recalls)),
        "roc-auc": auc,
        "loss": loss,
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, directional: bool) -> dict:
    """``rmse``, ``mae``, ``loss`` (MSE), and with ``directional`` the fraction of examples
    whose predicted sign matches the true sign (examples with a true value of 0 ignored)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64).reshape(len(y))
    if not len(y):
        return {}
    err = p - y
    out = {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "loss": float(np.mean(err**2)),
    }
    if directional:
        moved = y != 0
        out["directional-accuracy"] = (
            float((np.sign(p[moved]) == np.sign(y[moved])).mean()) if moved.any() else float("nan")
        )
    return out


def aggregate_metrics(per_client: list[tuple[int, dict]]) -> dict:
    """Federated metrics: example-weighted means of the clients' local values (RMSE: the
    square root of the weighted mean of squares), each over the clients that report it.

    Federated ROC AUC and balanced accuracy are weighted means of local values, not the
    metric of the pooled predictions (which no one holds)."""
    keys = sorted({k for _, m in per_client for k in m})
    out = {}
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
