"""Checks on every client reply before it may touch the global model."""

from __future__ import annotations

import math

import numpy as np


def check_update(global_arrays: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> str | None:
    """None if ``update`` has the global arrays' keys, shapes, dtypes and only finite values;
    otherwise the reason it is rejected."""
    if set(update) != set(global_arrays):
        return f"array keys {sorted(update)} differ from {sorted(global_arrays)}"
    for k, g in global_arrays.items():
        u = update[k]
        if u.shape != g.shape or u.dtype != g.dtype:
            return f"array {k!r} is {u.dtype}{list(u.shape)}, expected {g.dtype}{list(g.shape)}"
        if not np.isfinite(u).all():
            return f"array {k!r} holds non-finite values"
    return None


def check_metrics(metrics: dict) -> str | None:
    n = metrics.get("num-examples")
    if not isinstance(n, int | float) or n <= 0 or not math.isfinite(n):
        return f"num-examples {n!r} is not a positive count"
    return None
