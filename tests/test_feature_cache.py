"""The frozen trunk runs once per example per run; features are reused from memory or disk."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import ferry.client.feature_cache as feature_cache
from ferry.client import runtime
from ferry.client.backbone_cache import BackboneCache
from ferry.client.feature_cache import FeatureCache, feature_key
from ferry.common.data.datasets import DataSpec, load_partition
from ferry.server.pretrain import random_artifact


class TrunkThatMustNotRun(nn.Module):
    def forward(self, x):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the trunk ran although cached features were available")


def _partition(client):
    run = client.run
    spec = DataSpec(
        examples=run.examples,
        num_partitions=run.clients,
        alpha=run.alpha,
        test_fraction=run.test_fraction,
        seed=run.seed,
        input_shape=tuple(client.artifact.manifest["input_shape"]),
    )
    return load_partition(spec, client.settings.partition_id)


def test_trunk_runs_once_per_example_over_three_train_rounds_and_evaluation(client):
    part = _partition(client)
    expected = part.num_train + len(part.test_y)
    assert part.num_train > 0 and len(part.test_y) > 0
    before = feature_cache.trunk_examples

    head = client.initial_head()
    for rnd in (1, 2, 3):
        head, metrics, _ = runtime.train_round(client.settings, client.request(rnd), head)
        assert metrics["num-examples"] == part.num_train
        # The first round extracts train and test features together; later rounds reuse them.
        assert feature_cache.trunk_examples - before == expected, f"after round {rnd}"
    evaluation = runtime.evaluate_round(client.settings, client.request(3), head)

    assert evaluation["num-examples"] == len(part.test_y)
    assert feature_cache.trunk_examples - before == expected


def test_restarted_client_loads_features_from_disk_without_running_trunk(client, restart_process):
    head = client.initial_head()
    runtime.train_round(client.settings, client.request(1), head)
    first = runtime.evaluate_round(client.settings, client.request(1), head)
    assert list((client.settings.cache_dir / "features").glob("*/train.npy"))
    after_first_process = feature_cache.trunk_examples

    restart_process()
    again = runtime.evaluate_round(client.settings, client.request(1), head)
    runtime.train_round(client.settings, client.request(2), head)

    assert feature_cache.trunk_examples == after_first_process
    assert again == first  # same features, same head: same held-out metrics


def test_fresh_feature_cache_instance_returns_disk_copy_without_calling_trunk(
    client, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    part = _partition(client)
    _, trunk = BackboneCache(client.settings.cache_dir).load(client.artifact.sha256)
    pre = client.artifact.manifest["preprocessing"]
    splits = {"train": part.train_x, "test": part.test_x}
    key = feature_key(client.artifact.sha256, part.fingerprint, pre)
    computed = FeatureCache(tmp_path / "features-home").get(key, trunk, pre, splits)
    count = feature_cache.trunk_examples

    monkeypatch.setattr(feature_cache, "_MEMORY", {})
    loaded = FeatureCache(tmp_path / "features-home").get(key, TrunkThatMustNotRun(), pre, splits)

    assert feature_cache.trunk_examples == count
    assert set(loaded) == {"train", "test"}
    for name in splits:
        np.testing.assert_array_equal(loaded[name], computed[name])


def test_damaged_feature_file_is_recomputed_not_trusted(
    client, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    part = _partition(client)
    _, trunk = BackboneCache(client.settings.cache_dir).load(client.artifact.sha256)
    pre = client.artifact.manifest["preprocessing"]
    splits = {"train": part.train_x, "test": part.test_x}
    key = feature_key(client.artifact.sha256, part.fingerprint, pre)
    cache = FeatureCache(tmp_path / "features-home")
    computed = cache.get(key, trunk, pre, splits)
    (cache.root / key / "train.npy").write_bytes(b"\x00garbage")
    monkeypatch.setattr(feature_cache, "_MEMORY", {})
    count = feature_cache.trunk_examples

    recomputed = FeatureCache(tmp_path / "features-home").get(key, trunk, pre, splits)

    assert feature_cache.trunk_examples - count == part.num_train + len(part.test_y)
    np.testing.assert_allclose(recomputed["train"], computed["train"], rtol=1e-6)


def test_feature_file_with_other_splits_or_row_counts_is_recomputed(
    client, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    part = _partition(client)
    _, trunk = BackboneCache(client.settings.cache_dir).load(client.artifact.sha256)
    pre = client.artifact.manifest["preprocessing"]
    splits = {"train": part.train_x, "test": part.test_x}
    key = feature_key(client.artifact.sha256, part.fingerprint, pre)
    cache = FeatureCache(tmp_path / "features-home")
    (cache.root / key).mkdir(parents=True)
    np.save(cache.root / key / "train.npy", np.zeros((3, 64), np.float32))
    np.save(cache.root / key / "test.npy", np.zeros((1, 64), np.float32))
    count = feature_cache.trunk_examples

    feats = cache.get(key, trunk, pre, splits)

    assert feature_cache.trunk_examples - count == part.num_train + len(part.test_y)
    assert len(feats["train"]) == part.num_train and len(feats["test"]) == len(part.test_y)


def test_feature_key_changes_with_backbone_hash_data_and_preprocessing():
    sha_a, sha_b = "a" * 64, "b" * 64
    pre = {"mean": 0.5, "std": 0.25}
    key = feature_key(sha_a, "synthetic:x", pre)

    assert feature_key(sha_a, "synthetic:x", dict(pre)) == key  # stable
    assert feature_key(sha_b, "synthetic:x", pre) != key
    assert feature_key(sha_a, "synthetic:y", pre) != key
    assert feature_key(sha_a, "synthetic:x", {**pre, "std": 0.5}) != key
    assert feature_key(sha_a, "synthetic:x", pre, split="layer4") != key


def test_client_with_new_backbone_recomputes_features_instead_of_reusing_old_ones(client, tmp_path):
    """Same data, same cache directory, different backbone hash: the trunk runs again."""
    head = client.initial_head()
    runtime.train_round(client.settings, client.request(1), head)
    part = _partition(client)
    count = feature_cache.trunk_examples

    other = random_artifact("ferry-cnn", seed=1)
    assert other.sha256 != client.artifact.sha256
    BackboneCache(client.settings.cache_dir).store(other.manifest, other.tensors, other.sha256)
    req = runtime.RoundRequest(client.run, 2, other.sha256, 4, "run-b")
    runtime.train_round(client.settings, req, head)

    assert feature_cache.trunk_examples - count == part.num_train + len(part.test_y)
    assert len(list((client.settings.cache_dir / "features").glob("*/train.npy"))) == 2
