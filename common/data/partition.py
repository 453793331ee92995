"""Splitting one dataset among virtual institutions (simulation only), and each institution's
train/test split.

:func:`partition` picks a scheme by name; each scheme returns one sorted index array per
partition, and every example lands in exactly one partition. The shuffled schemes look at
the pooled data (the simulator plays every institution); a deployed institution holds all of
its own data as one partition. Its held-out split (:func:`train_test_split`) is decided per
record, so one record's presence moves no other record in or out of DP training.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ferry.common.errors import FerryError


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


def record_digests(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One 64-bit digest of each example's own content (its ``x`` row and ``y``), uint64."""
    x = np.ascontiguousarray(x)
    y = np.ascontiguousarray(y)
    out = np.empty(len(y), dtype=np.uint64)
    for i in range(len(y)):
        h = hashlib.blake2b(x[i].tobytes(), digest_size=8)
        h.update(y[i].tobytes())
        out[i] = int.from_bytes(h.digest(), "big")
    return out


def raw_digest(parts) -> int:
    """One 64-bit digest of a raw source record given as a sequence of text or bytes parts
    (a row's cells as read, or a file's bytes): independent of every run setting."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return int.from_bytes(h.digest(), "big")


def row_digests(frame) -> np.ndarray:
    """uint64 digest of each row of a table as read (every column's name and cell text, in the
    file's column order), before any column is parsed or chosen as the label."""
    names = [str(c) for c in frame.columns]
    out = np.empty(len(frame), dtype=np.uint64)
    for i, row in enumerate(frame.itertuples(index=False, name=None)):
        out[i] = raw_digest(
            [p for n, v in zip(names, row, strict=True) for p in (n, "" if v is None else v)]
        )
    return out


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijection of uint64 that spreads every input bit."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def train_test_split(
    indices: np.ndarray, test_fraction: float, seed: int, digests: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each institution's own held-out split for federated evaluation: (train, test) sorted.

    Membership is decided per record: example ``i`` is held out when a hash of the public
    ``seed`` and its content digest ``digests[i]`` (:func:`record_digests`) falls below
    ``test_fraction``. So adding or removing one record moves no *other* record between
    train and test (a seeded permutation of the rows would move many, and so change other
    records' presence in DP training). Identical records land on the same side. Without
    ``digests`` the example's index stands for its content (bookkeeping tests only).
    """
    indices = np.asarray(indices, dtype=np.int64)
    keys = indices.astype(np.uint64) if digests is None else np.asarray(digests)[indices]
    salt = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    draws = (_mix(keys ^ salt) >> np.uint64(11)).astype(np.float64) / float(2**53)
    held = draws < test_fraction
    return np.sort(indices[~held]), np.sort(indices[held])


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


def natural_groups(groups: np.ndarray) -> list[str]:
    """The distinct group values of a natural split, in partition order (sorted as text)."""
    return [str(g) for g in np.unique(np.asarray(groups).astype(str))]


def natural(groups: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """One partition per distinct group value (a hospital, a branch), in sorted order."""
    keys = np.asarray(groups).astype(str)
    names = natural_groups(groups)
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
    a held-out target.

    Not decided per record: the held-out count is a fraction of the group's windows, so one
    added window can shift the boundary and move one *other* window in or out of training.
    Ferry splits price series with :func:`cutoff_split` (a public cutoff date) instead.
    """
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


def cutoff_split(
    indices: np.ndarray, spans: np.ndarray, cutoff: np.datetime64
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test split of forecasting windows by a public cutoff date: (train, test) sorted.

    ``spans[i]`` is the first and last date of example ``i``'s forecast period and (third
    column) the first date of its input window. Example ``i`` is held out when its whole input
    window (hence also its forecast) starts on or after ``cutoff``, trained on when its
    forecast ends before ``cutoff``, and used for neither otherwise (the embargo: the windows
    whose inputs or forecast straddle the cutoff). So no held-out window's inputs or target
    contain a training target: the evaluation's non-DP sums reveal nothing trained on.
    Membership is a function of the example's own dates and the public cutoff alone, so
    adding or removing one window moves no other.
    """
    indices = np.asarray(indices, dtype=np.int64)
    spans = np.asarray(spans, dtype="datetime64[ns]")[indices]
    cutoff = np.datetime64(cutoff, "ns")
    held = spans[:, 2 if spans.shape[1] > 2 else 0] >= cutoff
    train = spans[:, 1] < cutoff
    return np.sort(indices[train]), np.sort(indices[held])


def default_cutoff(spans: np.ndarray, test_fraction: float) -> np.datetime64:
    """Simulation only (the researcher's side, whose data is public to the researcher): the
    cutoff that holds out about the latest ``test_fraction`` of the pooled windows' forecast
    starts. A deployment takes its cutoff from the run config instead."""
    spans = np.asarray(spans, dtype="datetime64[ns]")
    starts = np.sort(spans[:, 2 if spans.shape[1] > 2 else 0].astype(np.int64))
    k = min(len(starts) - 1, max(0, int(np.floor(len(starts) * (1.0 - test_fraction)))))
    return np.datetime64(int(starts[k]), "ns")
