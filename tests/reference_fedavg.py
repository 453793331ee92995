"""The reference the aggregation tests compare against: plain, unbounded FedAvg.

Not Ferry's aggregation (:func:`ferry.server.aggregation.aggregate_updates` bounds every
institution's influence); the textbook example-weighted mean of trusted updates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fedavg(updates: Sequence[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Example-weighted mean of ``[(arrays, weight)]``, each array in its own dtype."""
    if not updates:
        raise ValueError("nothing to aggregate")
    total = float(sum(w for _, w in updates))
    return {
        k: (sum(a[k].astype(np.float64) * w for a, w in updates) / total).astype(
            updates[0][0][k].dtype
        )
        for k in updates[0][0]
    }
