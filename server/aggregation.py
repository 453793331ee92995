"""Aggregation rules, by name. Each takes [(arrays, weight)] and returns the new arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
_RULES: dict[str, Callable[[Sequence[tuple[Arrays, float]]], Arrays]] = {}


def register_rule(name: str):
    def decorator(fn):
        _RULES[name] = fn
        return fn

    return decorator


def aggregate(name: str, updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    if not updates:
        raise ValueError("nothing to aggregate")
    return _RULES[name](updates)


@register_rule("fedavg")
def fedavg(updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    """Example-weighted mean (McMahan et al. 2017)."""
    total = float(sum(w for _, w in updates))
    keys = updates[0][0].keys()
    return {
        k: (sum(a[k].astype(np.float64) * w for a, w in updates) / total).astype(
            updates[0][0][k].dtype
        )
        for k in keys
    }
