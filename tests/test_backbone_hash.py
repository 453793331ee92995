"""A backbone is identified by its sha256; anything that does not hash to it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ferry.client.backbone_cache import BackboneCache
from ferry.common.errors import FerryError
from ferry.common.serialization import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    BackboneArtifact,
    backbone_digest,
    instantiate,
    load_artifact,
)


def _nudge_one_weight(weights_file: Path, name: str = "0.weight") -> None:
    """Rewrite the safetensors file with a single float moved to its next representable value."""
    tensors = load_file(str(weights_file))
    flat = tensors[name].reshape(-1)
    flat[0] = np.nextafter(flat[0], np.float32(np.inf))
    save_file(tensors, str(weights_file))


def _rehashed(manifest: dict, tensors: dict[str, np.ndarray]) -> BackboneArtifact:
    """An artifact whose manifest hash honestly covers ``tensors`` (self-consistent)."""
    manifest = {k: v for k, v in manifest.items() if k != "sha256"}
    manifest["sha256"] = backbone_digest(manifest, tensors)
    return BackboneArtifact(manifest, tensors)


def test_saved_backbone_loads_back_with_the_same_hash_and_weights(artifact, artifact_dir):
    loaded = load_artifact(artifact_dir, expected_sha256=artifact.sha256)
    assert loaded.sha256 == artifact.sha256
    assert sorted(loaded.tensors) == sorted(artifact.tensors)
    for name, tensor in artifact.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[name].reshape(tensor.shape), tensor)
    # Either file of the directory names the artifact too.
    assert load_artifact(artifact_dir / WEIGHTS_FILE).sha256 == artifact.sha256


def test_load_refuses_backbone_with_one_weight_changed(artifact_dir):
    _nudge_one_weight(artifact_dir / WEIGHTS_FILE)
    with pytest.raises(FerryError, match="hash mismatch"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.update(feature_dim=m["feature_dim"] + 1),
        lambda m: m["preprocessing"].update(mean=0.4),
        lambda m: m["pretraining"].update(kind="synthetic-shapes"),
        lambda m: m.update(note="added field"),
        lambda m: m.update(sha256="f" * 64),  # claims another identity
    ],
    ids=["feature_dim", "preprocessing", "pretraining", "extra-field", "sha256"],
)
def test_load_refuses_backbone_with_altered_manifest(artifact_dir, tamper):
    path = artifact_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    tamper(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(FerryError, match="hash mismatch"):
        load_artifact(artifact_dir)


def test_load_refuses_intact_backbone_that_is_not_the_expected_one(artifact_dir):
    with pytest.raises(FerryError, match="hash mismatch"):
        load_artifact(artifact_dir, expected_sha256="0" * 64)


def test_load_refuses_weights_stored_with_another_dtype(artifact_dir):
    weights = artifact_dir / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors["0.weight"] = tensors["0.weight"].astype(np.float64)  # same values, other bytes
    save_file(tensors, str(weights))
    with pytest.raises(FerryError, match="hash mismatch"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize("keep", [0, 7, 9, 100, 0.5, -1], ids=str)
def test_truncated_weights_file_is_a_ferry_error_not_a_traceback(artifact_dir, keep):
    weights = artifact_dir / WEIGHTS_FILE
    data = weights.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    weights.write_bytes(data[:cut])
    with pytest.raises(FerryError, match="corrupt"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize(
    "content",
    [b"not json {", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'{"format": "other/9"}'],
    ids=["bad-json", "not-utf8", "list", "null", "wrong-format"],
)
def test_unreadable_manifest_is_a_ferry_error(artifact_dir, content):
    (artifact_dir / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(FerryError, match="corrupt"):
        load_artifact(artifact_dir)


def test_missing_backbone_files_are_a_ferry_error_naming_the_fix(artifact_dir):
    (artifact_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(FerryError, match="ferry pretrain"):
        load_artifact(artifact_dir)


# --- instantiate ------------------------------------------------------------------------


def test_instantiate_gives_a_frozen_eval_mode_trunk(artifact):
    trunk = instantiate(artifact)
    assert not trunk.training
    assert not any(p.requires_grad for p in trunk.parameters())


def test_instantiate_refuses_weights_of_wrong_shape(artifact):
    tensors = dict(artifact.tensors)
    tensors["0.weight"] = np.zeros((8, 1, 3, 3), dtype=np.float32)  # ferry-cnn wants 16 filters
    with pytest.raises(FerryError, match="do not match architecture 'ferry-cnn'"):
        instantiate(_rehashed(artifact.manifest, tensors))


def test_instantiate_refuses_weights_with_missing_tensor(artifact):
    tensors = {k: v for k, v in artifact.tensors.items() if k != "0.weight"}
    with pytest.raises(FerryError, match="do not match architecture"):
        instantiate(_rehashed(artifact.manifest, tensors))


def test_instantiate_refuses_unknown_architecture(artifact):
    with pytest.raises(FerryError, match="unknown backbone 'nope'"):
        instantiate(_rehashed({**artifact.manifest, "architecture": "nope"}, artifact.tensors))


# --- the client's backbone cache ---------------------------------------------------------


def test_cache_stores_verified_backbone_and_serves_it(tmp_path, artifact):
    cache = BackboneCache(tmp_path / "cache")
    assert not cache.has(artifact.sha256)

    cache.store(artifact.manifest, artifact.tensors, artifact.sha256)

    assert cache.has(artifact.sha256)
    loaded, trunk = cache.load(artifact.sha256)
    assert loaded.sha256 == artifact.sha256
    assert not trunk.training


def test_cache_store_refuses_wrong_sha_and_stores_nothing(tmp_path, artifact):
    cache = BackboneCache(tmp_path / "cache")
    wrong = "0" * 64
    with pytest.raises(FerryError, match="hash mismatch"):
        cache.store(artifact.manifest, artifact.tensors, wrong)
    assert not cache.has(wrong)
    assert not cache.has(artifact.sha256)
    assert not cache.root.exists() or not any(cache.root.iterdir())


def test_cache_store_refuses_tensors_altered_in_transit(tmp_path, artifact):
    cache = BackboneCache(tmp_path / "cache")
    tensors = {k: v.copy() for k, v in artifact.tensors.items()}
    tensors["0.weight"].reshape(-1)[0] += 1e-3
    with pytest.raises(FerryError, match="hash mismatch"):
        cache.store(artifact.manifest, tensors, artifact.sha256)
    assert not cache.has(artifact.sha256)
    assert not cache.path(artifact.sha256).exists()


def test_cache_refuses_ids_that_are_not_sha256(tmp_path):
    cache = BackboneCache(tmp_path / "cache")
    for bad in ("../../etc", "A" * 64, "0" * 63, ""):
        with pytest.raises(FerryError, match="not a sha256"):
            cache.has(bad)


@pytest.mark.parametrize("damage", ["weight", "manifest", "truncate", "delete-weights"])
def test_cache_entry_tampered_on_disk_is_reported_absent_and_moved_aside(
    tmp_path, artifact, restart_process, damage
):
    cache = BackboneCache(tmp_path / "cache")
    cache.store(artifact.manifest, artifact.tensors, artifact.sha256)
    entry = cache.path(artifact.sha256)
    if damage == "weight":
        _nudge_one_weight(entry / WEIGHTS_FILE)
    elif damage == "manifest":
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
        manifest["feature_dim"] = 65
        (entry / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif damage == "truncate":
        data = (entry / WEIGHTS_FILE).read_bytes()
        (entry / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    else:
        (entry / WEIGHTS_FILE).unlink()
    restart_process()  # a new worker: nothing verified in memory yet

    assert cache.has(artifact.sha256) is False

    assert not entry.exists()
    aside = [p for p in cache.root.iterdir() if p.name.startswith(".corrupt-")]
    assert len(aside) == 1 and (aside[0] / MANIFEST_FILE).is_file()
    with pytest.raises(FerryError, match="not in the cache"):
        cache.load(artifact.sha256)
    # The server re-ships it; the fresh copy is accepted.
    cache.store(artifact.manifest, artifact.tensors, artifact.sha256)
    assert cache.has(artifact.sha256)
