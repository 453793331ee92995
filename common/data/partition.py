"""Splitting one dataset among virtual institutions (simulation only).

:func:`partition` picks a scheme by name; each scheme returns one sorted index array per
partition, and every example lands in exactly one partition.
"""

from __future__ import annotations

import numpy as np

from common.errors import FerryError


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


SCHEMES = ("dirichlet", "iid", "natural", "quantity")
REGRESSION_BINS = 5


def iid(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffled examples in ``num_partitions`` parts whose sizes differ by at most one."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_partitions)]


def quantity_skew(
    n: int, num_partitions: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Shuffled examples, partition sizes from Dirichlet(alpha): institutions of very
    different sizes (small ``alpha``) with the same distribution of examples.

    Each partition gets at least ``min_size`` examples (or n // parts), the rest is shared
    in the Dirichlet proportions (largest remainders round up).
    """
    rng = np.random.default_rng(seed)
    floor = min(min_size, n // num_partitions)
    shares = rng.dirichlet(np.full(num_partitions, alpha))
    spare = n - floor * num_partitions
    exact = shares * spare
    sizes = np.floor(exact).astype(np.int64)
    sizes[np.argsort(sizes - exact)[: spare - int(sizes.sum())]] += 1
    sizes += floor
    perm = rng.permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def natural(groups: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """One partition per distinct group value (a hospital, a branch), in sorted order."""
    keys = np.asarray(groups).astype(str)
    names = np.unique(keys)
    if len(names) != num_partitions:
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise FerryError(
            f"the partition column holds {len(names)} groups ({shown}) but {num_partitions} "
            f"clients were asked for: pass --clients {len(names)}"
        )
    return [np.flatnonzero(keys == name).astype(np.int64) for name in names]


def target_bins(y: np.ndarray, bins: int = REGRESSION_BINS) -> np.ndarray:
    """Quantile bin (0..bins-1) of each regression target: the 'classes' a Dirichlet split
    skews when the task is regression (simulation only: the simulator sees all the data)."""
    edges = np.quantile(np.asarray(y, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, y, side="right")


def partition(
    scheme: str,
    y: np.ndarray,
    groups: np.ndarray | None,
    num_partitions: int,
    alpha: float,
    seed: int,
    task: str = "classification",
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split a dataset's examples among ``num_partitions`` virtual institutions by ``scheme``:

    * ``iid``: shuffled, equal sizes;
    * ``dirichlet``: label skew (:func:`dirichlet_label_skew`); on a regression task the
      target's quantile bins (:func:`target_bins`) play the classes;
    * ``quantity``: size skew (:func:`quantity_skew`);
    * ``natural``: one institution per value of the partition column (``groups``).

    Every example lands in exactly one partition (sorted index arrays).
    """
    n = len(y)
    if scheme not in SCHEMES:
        raise FerryError(f"unknown partition scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if num_partitions < 1:
        raise FerryError(f"--clients {num_partitions}: give at least 1")
    if n < num_partitions:
        raise FerryError(
            f"{n} examples cannot be split among {num_partitions} clients: give more data or "
            "fewer --clients"
        )
    if scheme in ("dirichlet", "quantity") and not alpha > 0:
        raise FerryError(f"--alpha {alpha}: the Dirichlet concentration must be > 0 (e.g. 0.5)")
    if scheme == "iid":
        return iid(n, num_partitions, seed)
    if scheme == "quantity":
        return quantity_skew(n, num_partitions, alpha, seed, min_size)
    if scheme == "natural":
        if groups is None:
            raise FerryError(
                "--partition natural needs a column naming each example's institution: "
                "pass --partition-column COLUMN"
            )
        return natural(groups, num_partitions)
    labels = target_bins(y) if task == "regression" else np.asarray(y)
    return dirichlet_label_skew(labels, num_partitions, alpha, seed, min_size)


def chronological_split(
    indices: np.ndarray, groups: np.ndarray | None, test_fraction: float, horizon: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test split of time-ordered windows (price series): within each group (ticker),
    whose windows sit at consecutive indices in time order, the latest ``test_fraction`` are
    held out, and training windows whose forecast period reaches into the held-out period
    (the ``horizon - 1`` windows just before it) are dropped, so no training target overlaps
    a held-out target."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    keys = np.zeros(len(indices), dtype=np.int64) if groups is None else groups[indices]
    train, test = [], []
    for key in dict.fromkeys(keys.tolist()):
        mine = indices[keys == key]
        n_test = max(1, int(round(len(mine) * test_fraction))) if len(mine) > 1 else 0
        if not n_test:
            train.append(mine)
            continue
        held = mine[-n_test:]
        test.append(held)
        train.append(mine[:-n_test][mine[:-n_test] <= held[0] - horizon])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
    )
