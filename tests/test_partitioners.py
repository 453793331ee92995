"""Partitioners split a simulated dataset among virtual institutions: every example lands in
exactly one partition, and each scheme produces the skew it promises."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.common.data.partition import (
    dirichlet_label_skew,
    iid,
    natural,
    partition,
    quantity_skew,
    target_bins,
    train_test_split,
)
from ferry.common.errors import FerryError


def _each_example_once(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


LABELS = np.random.default_rng(0).integers(0, 4, 1000)
GROUPS = np.random.default_rng(1).choice(["h1", "h2", "h3"], 1000)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity", "natural"])
def test_every_scheme_places_each_example_in_exactly_one_partition(scheme):
    parts = partition(scheme, LABELS, GROUPS, 3, 0.3, seed=5, task="classification")
    assert len(parts) == 3
    _each_example_once(parts, len(LABELS))
    again = partition(scheme, LABELS, GROUPS, 3, 0.3, seed=5, task="classification")
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_follow_the_seed():
    parts = iid(103, 10, seed=0)
    _each_example_once(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid(103, 10, 1), strict=True))


def test_quantity_skew_gives_unequal_sizes_above_the_floor():
    parts = quantity_skew(2000, 8, alpha=0.3, seed=2, min_size=25)
    _each_example_once(parts, 2000)
    sizes = np.asarray([len(p) for p in parts])
    assert sizes.min() >= 25 and sizes.max() > 4 * sizes.min()
    flat = quantity_skew(2000, 8, alpha=1000.0, seed=2)
    assert max(len(p) for p in flat) - min(len(p) for p in flat) < 60


def test_quantity_skew_on_tiny_data_still_covers_every_example():
    for n, k in ((5, 5), (7, 3), (30, 4)):
        parts = quantity_skew(n, k, alpha=0.1, seed=0, min_size=10)
        _each_example_once(parts, n)
        assert min(len(p) for p in parts) >= n // k


def test_dirichlet_skews_labels_and_large_alpha_approaches_iid():
    def spread(alpha: float) -> float:
        parts = dirichlet_label_skew(LABELS, 5, alpha, seed=3)
        _each_example_once(parts, len(LABELS))
        shares = np.asarray([np.bincount(LABELS[p], minlength=4) / len(p) for p in parts])
        return float(shares.std(axis=0).mean())

    assert spread(0.1) > 3 * spread(100.0)


def test_natural_split_follows_the_group_column():
    parts = natural(GROUPS, 3)
    _each_example_once(parts, len(GROUPS))
    assert [set(GROUPS[p]) for p in parts] == [{"h1"}, {"h2"}, {"h3"}]


def test_natural_split_with_the_wrong_client_count_says_how_many_groups():
    with pytest.raises(FerryError) as info:
        partition("natural", LABELS, GROUPS, 5, 0.5, 0)
    assert "3 groups (h1, h2, h3)" in str(info.value) and "--clients 3" in str(info.value)


def test_partition_refuses_unknown_schemes_and_natural_without_a_column():
    with pytest.raises(FerryError, match="use one of dirichlet, iid, natural, quantity"):
        partition("random", LABELS, None, 3, 0.5, 0)
    with pytest.raises(FerryError, match="--partition-column"):
        partition("natural", LABELS, None, 3, 0.5, 0)
    with pytest.raises(FerryError, match="--alpha"):
        partition("dirichlet", LABELS, None, 3, 0.0, 0)
    with pytest.raises(FerryError, match="cannot be split among 4 clients"):
        partition("iid", LABELS[:3], None, 4, 0.5, 0)


def test_dirichlet_on_a_regression_target_skews_its_quantile_bins():
    y = np.random.default_rng(4).normal(size=900).astype(np.float32)
    bins = target_bins(y)
    assert np.bincount(bins).tolist() == [180] * 5
    parts = partition("dirichlet", y, None, 4, 0.1, seed=1, task="regression")
    _each_example_once(parts, 900)
    means = [float(y[p].mean()) for p in parts]
    assert max(means) - min(means) > 0.3  # institutions see different target ranges


def test_train_test_split_keeps_every_example_once():
    train, test = train_test_split(np.arange(0, 4000), 0.25, seed=0)
    assert abs(len(test) - 1000) < 100  # membership is drawn per record, about 25% held out
    assert np.array_equal(np.sort(np.r_[train, test]), np.arange(0, 4000))


def test_train_test_split_membership_is_per_record_so_one_more_record_moves_no_other():
    digests = np.arange(1000, 1401, dtype=np.uint64) * np.uint64(7919)
    _, test = train_test_split(np.arange(400), 0.2, 0, digests)
    _, test_plus = train_test_split(np.arange(401), 0.2, 0, digests)
    assert np.array_equal(test_plus[test_plus < 400], test)


def test_chronological_split_holds_out_each_tickers_latest_windows_with_an_embargo():
    from ferry.common.data.partition import chronological_split

    groups = np.array(["a"] * 20 + ["b"] * 10)
    mine = np.arange(0, 30, 1)[::1]
    train, test = chronological_split(mine, groups, 0.2, horizon=3)

    assert test.tolist() == [16, 17, 18, 19, 28, 29]
    # a: windows 14 and 15 forecast into 16..; b: 26 and 27 into 28..
    assert train.tolist() == [*range(0, 14), *range(20, 26)]
    assert not set(train) & set(test)
