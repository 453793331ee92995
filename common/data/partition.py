"""Splitting one dataset among virtual institutions (simulation only)."""

from __future__ import annotations

import numpy as np


def dirichlet_label_skew(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Non-IID split: for each class, shares across partitions drawn from Dirichlet(alpha).

    Small ``alpha`` gives strong label skew; large ``alpha`` approaches IID. Redraws (up to
    100 times) until every partition holds at least ``min_size`` examples (or n // parts).
    Returns one sorted index array per partition; every example lands in exactly one.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    floor = min(min_size, n // num_partitions)
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= floor:
            break
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def train_test_split(indices: np.ndarray, test_fraction: float, seed: int):
    """Each institution's own held-out split for federated evaluation."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(indices)
    n_test = max(1, int(round(len(perm) * test_fraction))) if len(perm) > 1 else 0
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
