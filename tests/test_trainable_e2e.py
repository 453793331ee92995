"""Trainable parts end to end: through the client runtime, a real simulation and the CLI.

* ``client.runtime`` with head, last-block and conv-adapter on ferry-cnn: the frozen trunk
  runs once per example at the split point over three rounds and an evaluation, the cached
  activations keep the split point's shape, only the trainable arrays come back, and the
  verified backbone in the client's cache is bit-identical afterwards.
* LoRA on ``vit_b_16`` built for 32 px images: one round returns only LoRA factors and the
  head; arrays of another LoRA rank fail the round with one line naming the mismatch.
* One simulation per non-head part (its plan and round loop, the institutions in this process:
  :func:`inprocess_grid.simulate_in_process`): the summary's head bytes are the trainable
  arrays' and the ledger audits clean.
* Bad trainable-part input to ``ferry simulate``: exit 2, one line, nothing in ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flwr.simulation
import numpy as np
import pytest
import torch
from conftest import Client  # the one-institution driver of the feature-cache tests

import ferry.client.feature_cache as feature_cache
from ferry.cli import main
from ferry.client import runtime
from ferry.client.backbone_cache import BackboneCache
from ferry.client.privacy_state import PrivacyState
from ferry.common.config import RunConfig
from ferry.common.data.datasets import DataSpec, load_partition
from ferry.common.errors import FerryError
from ferry.common.model import initial_trainable_arrays
from ferry.common.serialization import (
    BackboneArtifact,
    backbone_digest,
    load_artifact,
    save_artifact,
)
from ferry.server.audit import audit_ledger
from ferry.server.backbone_import import import_backbone
from ferry.server.pretrain import random_artifact

from inprocess_grid import simulate_in_process

NUM_CLASSES = 4  # the hospital-imaging target task (conftest's Client asks for 4 outputs)
# ferry-cnn on 1x32x32 images: three 2x2 max-pools (32 -> 4 px) before the fourth conv block
# (child "12", its last stage), which has 64 input channels; the head sees 64 features.
SPLIT_SHAPE = {"head": (64,), "last-block": (64, 4, 4), "conv-adapter": (64, 4, 4)}
EXPECTED_NAMES = {
    "head": {"weight", "bias"},
    "last-block": {"12.weight", "output.weight", "output.bias"},
    "conv-adapter": {"12.down.weight", "12.up.weight", "output.weight", "output.bias"},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- head, last-block, conv-adapter through client.runtime -----------------------------------


@pytest.fixture(params=["head", "last-block", "conv-adapter"])
def small_run(request) -> RunConfig:
    """Overrides conftest's ``small_run``: its ``client`` fixture then trains this part."""
    return RunConfig(examples=400, clients=2, rounds=3, trainable=request.param)


def _partition(client):
    run = client.run
    spec = DataSpec.from_run(run, run.clients, tuple(client.artifact.manifest["input_shape"]))
    return load_partition(spec, client.settings.partition_id)


def _three_rounds_and_evaluation(client) -> tuple[dict, dict, list[dict]]:
    """(initial arrays, final arrays, each round's returned arrays)."""
    initial = initial_trainable_arrays(client.artifact, client.run, NUM_CLASSES)
    arrays, returned = initial, []
    for rnd in (1, 2, 3):
        arrays, _, _ = runtime.train_round(client.settings, client.request(rnd), arrays)
        returned.append(arrays)
    runtime.evaluate_round(client.settings, client.request(3), arrays)
    return initial, arrays, returned


def test_trunk_runs_once_per_example_at_the_split_point_over_three_rounds_and_evaluation(client):
    part = _partition(client)
    assert part.num_train > 0 and len(part.test_y) > 0
    before = feature_cache.trunk_examples

    _three_rounds_and_evaluation(client)

    assert feature_cache.trunk_examples - before == part.num_train + len(part.test_y)
    files = list((client.settings.cache_dir / "features").glob("*/*.npy"))
    shapes = {f.stem: np.load(f, mmap_mode="r").shape for f in files}
    want = SPLIT_SHAPE[client.run.trainable]
    assert shapes == {"train": (part.num_train, *want), "test": (len(part.test_y), *want)}


def test_round_returns_only_the_trainable_arrays_and_trains_them(client):
    initial, final, returned = _three_rounds_and_evaluation(client)
    names = EXPECTED_NAMES[client.run.trainable]

    assert set(initial) == names  # what the server sends in round 1
    for rnd, arrays in enumerate(returned, start=1):
        assert set(arrays) == names, f"round {rnd}"
        assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in initial.items()}
    # DP-SGD moved every trained array (noise alone would move it).
    assert all(not np.array_equal(final[k], initial[k]) for k in names)


def test_frozen_backbone_in_the_client_cache_is_bit_identical_after_training(client):
    sha = client.artifact.sha256
    # As the artifact hash sees them (np.ascontiguousarray stores a scalar as shape (1,)).
    original = {k: np.ascontiguousarray(v).copy() for k, v in client.artifact.tensors.items()}

    _three_rounds_and_evaluation(client)

    cache = BackboneCache(client.settings.cache_dir)
    # The trunk this process trained with (kept in memory across rounds) ...
    _, trunk = cache.load(sha)
    state = {k: t.detach().numpy() for k, t in trunk.state_dict().items()}
    assert set(state) == set(original)
    changed = [
        k for k, v in state.items() if not np.array_equal(np.ascontiguousarray(v), original[k])
    ]
    assert changed == []
    assert backbone_digest(client.artifact.manifest, state) == sha
    assert not trunk.training and not any(p.requires_grad for p in trunk.parameters())
    # ... and the copy on disk, which a new process verifies against the hash.
    stored = load_artifact(cache.path(sha), sha)
    assert all(np.array_equal(v, original[k]) for k, v in stored.tensors.items())


# --- LoRA on vit_b_16 (32 px) through client.runtime --------------------------------------


@pytest.fixture(scope="module")
def vit_artifact_dir(tmp_path_factory) -> Path:
    """A randomly initialised vit_b_16 for 3x32x32 images (343 MB; about 5 s to build)."""
    out = tmp_path_factory.mktemp("vit32") / "backbone"
    import_backbone("vit_b_16", "random", 32, out, log=lambda *_: None)
    return out


def _vit_client(root: Path, vit_dir: Path, run: RunConfig) -> Client:
    """One institution holding the 32 px ViT in its backbone cache."""
    return Client(root, load_artifact(vit_dir), run)


VIT_RUN = RunConfig(
    examples=200, clients=2, rounds=2, backbone="vit_b_16", trainable="lora", batch_size=16
)


@pytest.mark.slow
def test_lora_round_on_vit_returns_only_lora_factors_and_head(tmp_path, vit_artifact_dir):
    client = _vit_client(tmp_path / "hospital-000", vit_artifact_dir, VIT_RUN)
    initial = initial_trainable_arrays(client.artifact, VIT_RUN, NUM_CLASSES)

    arrays, metrics, report = runtime.train_round(client.settings, client.request(1), initial)

    lora = {k for k in initial if ".lora_A." in k or ".lora_B." in k}
    assert set(initial) == lora | {"output.weight", "output.bias"}
    # The default targets: query/value projections and both MLP Linears of blocks 10 and 11.
    assert len(lora) == 2 * 2 * 4
    assert all(k.startswith(("block10.", "block11.")) for k in lora)
    assert set(arrays) == set(initial)
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in initial.items()}
    assert metrics["num-examples"] > 0 and report["steps"] > 0
    # LoRA's B factors start at zero; one DP round moves them.
    assert all(not np.any(initial[k]) for k in lora if ".lora_B." in k)
    assert all(np.any(arrays[k]) for k in lora if ".lora_B." in k)


@pytest.mark.slow
def test_lora_arrays_of_another_rank_fail_the_round_in_one_line_and_spend_nothing(
    tmp_path, vit_artifact_dir
):
    client_run = dataclasses.replace(VIT_RUN, lora_rank=4)
    client = _vit_client(tmp_path / "hospital-000", vit_artifact_dir, client_run)
    server_arrays = initial_trainable_arrays(client.artifact, VIT_RUN, NUM_CLASSES)  # rank 8

    with pytest.raises(FerryError) as failed:
        runtime.train_round(client.settings, client.request(1), server_arrays)
    with pytest.raises(FerryError) as failed_eval:
        runtime.evaluate_round(client.settings, client.request(1), server_arrays)

    message = str(failed.value)
    assert "\n" not in message
    assert "do not fit this model" in message and "wrong shape" in message
    assert "lora_A.weight (8, 768) (want (4, 768))" in message
    assert "LoRA rank" in message  # the fix: the same rank on server and clients
    assert str(failed_eval.value) == message
    state = PrivacyState.open(client.settings.state_dir, client.settings.institution)
    assert state.rounds() == 0  # refused before any DP step: nothing spent


# --- one simulation per non-head part ------------------------------------------------------


@pytest.fixture(scope="module", params=["last-block", "conv-adapter"])
def simulated(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(f"sim-{request.param}")
    cfg = RunConfig(
        clients=3,
        rounds=2,
        examples=300,
        partition="iid",
        trainable=request.param,
        weights="random",
        out=str(root / "out"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(root / "ferry-home"))
        summary = simulate_in_process(cfg)
    expected = initial_trainable_arrays(random_artifact("ferry-cnn", seed=0), cfg, NUM_CLASSES)
    return {"cfg": cfg, "summary": summary, "out": Path(cfg.out), "expected": expected}


@pytest.mark.slow
def test_simulation_of_a_non_head_part_ships_exactly_its_trainable_arrays(simulated):
    summary, expected = simulated["summary"], simulated["expected"]
    trainable_bytes = sum(int(v.nbytes) for v in expected.values())

    assert set(expected) == EXPECTED_NAMES[simulated["cfg"].trainable]
    assert summary["rounds_completed"] == 2
    assert summary["bytes"]["head_bytes"] == trainable_bytes
    # Round 2's largest message carries the trainable arrays and nothing else.
    assert summary["bytes"]["largest_message_arrays_after_round_1"] == trainable_bytes
    assert summary["bytes"]["per_round"][1]["backbone_sent"] == 0


@pytest.mark.slow
def test_simulation_of_a_non_head_part_audits_clean(simulated):
    report = audit_ledger(simulated["out"])

    assert report.ok, report.verdict()
    assert report.tampered is None
    assert len(report.institutions) == 3
    trained = [
        json.loads(line)
        for line in (simulated["out"] / "ledger.jsonl").read_text().splitlines()
        if '"client_trained"' in line
    ]
    assert len(trained) == 3 * 2


# --- bad input through `ferry simulate` -----------------------------------------------------


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fail loudly if a command gets as far as starting the simulation engine."""

    def run_simulation(*args, **kwargs):
        raise AssertionError("the simulation engine was started; the input should be refused")

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    monkeypatch.chdir(tmp_path)


def _refused(capsys: pytest.CaptureFixture, out: Path, argv: list[str]) -> str:
    """Run ``ferry simulate ARGV --out OUT``: exit 2, one stderr line, OUT never created."""
    code = main(["simulate", *argv, "--examples", "200", "--clients", "2", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert "Traceback" not in err + stdout
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("ferry: error: ")
    assert not out.exists(), f"{out} was written: {sorted(p.name for p in out.rglob('*'))}"
    return lines[0]


def _rehashed(manifest: dict, tensors: dict[str, np.ndarray], out: Path) -> Path:
    """An artifact whose hash is intact but whose content was changed (a consistent forgery,
    or a mislabelled export): the hash check passes, the shape check must not."""
    manifest = {k: v for k, v in manifest.items() if k != "sha256"}
    manifest["sha256"] = backbone_digest(manifest, tensors)
    return save_artifact(BackboneArtifact(manifest, tensors), out)


@pytest.mark.slow
def test_lora_target_naming_no_layer_is_one_line_naming_the_pattern(
    capsys, tmp_path, no_simulation, vit_artifact_dir
):
    line = _refused(
        capsys,
        tmp_path / "out",
        [
            "--trainable",
            "lora",
            "--lora-targets",
            "nosuch.layer",
            "--backbone",
            "vit_b_16",
            "--weights",
            str(vit_artifact_dir),
        ],
    )
    assert "'nosuch.layer'" in line and "vit_b_16" in line
    assert "--lora-targets" in line  # the fix


def test_lora_rank_zero_is_one_line_error(capsys, tmp_path, no_simulation):
    line = _refused(
        capsys, tmp_path / "out", ["--trainable", "lora", "--lora-rank", "0", "--weights", "random"]
    )
    assert "--lora-rank 0" in line and ">= 1" in line


def test_weights_with_a_tensor_of_the_wrong_shape_are_one_line_error(
    capsys, tmp_path, no_simulation
):
    cnn = random_artifact("ferry-cnn", seed=0)
    tensors = dict(cnn.tensors)
    tensors["0.weight"] = np.zeros((8, 1, 3, 3), np.float32)  # the first conv has 16 filters
    weights = _rehashed(cnn.manifest, tensors, tmp_path / "weights")

    line = _refused(capsys, tmp_path / "out", ["--weights", str(weights)])

    assert "do not match architecture 'ferry-cnn'" in line
    assert "0.weight" in line, "the message should name the tensor that does not fit"


def test_weights_labelled_as_another_architecture_are_one_line_error(
    capsys, tmp_path, no_simulation
):
    cnn = random_artifact("ferry-cnn", seed=0)
    manifest = {**cnn.manifest, "architecture": "resnet18", "input_shape": [3, 32, 32]}
    weights = _rehashed(manifest, dict(cnn.tensors), tmp_path / "weights")

    line = _refused(capsys, tmp_path / "out", ["--backbone", "resnet18", "--weights", str(weights)])

    assert "do not match architecture 'resnet18'" in line
    assert "--arch resnet18" in line  # the fix


@pytest.mark.slow
def test_vit_weights_for_another_input_size_are_one_line_error(
    capsys, tmp_path, no_simulation, vit_artifact_dir
):
    vit = load_artifact(vit_artifact_dir)  # built for 32 px: 5 position embeddings
    manifest = json.loads(json.dumps(vit.manifest))
    manifest["input_shape"] = [3, 64, 64]  # would need 17
    manifest["preprocessing"]["size"] = 64
    weights = _rehashed(manifest, vit.tensors, tmp_path / "weights")

    line = _refused(capsys, tmp_path / "out", ["--backbone", "vit_b_16", "--weights", str(weights)])

    assert "do not match architecture 'vit_b_16'" in line
    assert "pos_embedding" in line, "the message should name the tensor that does not fit"
