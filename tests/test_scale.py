"""Scale and resources: physical batches, GPU requests, a 200-client simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch import nn

from ferry.cli import main
from ferry.client.dp_trainer import DPTrainConfig, train_head
from ferry.common.config import RunConfig
from ferry.common.training_defaults import round_plan

from inprocess_grid import simulate_in_process


def test_physical_batches_keep_the_logical_mechanism():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    cfg = DPTrainConfig(noise_multiplier=1.0, batch_size=64, local_epochs=2, max_physical_batch=8)
    out = train_head(nn.Linear(16, 3), x, y, cfg)
    q, steps = round_plan(300, 64, 2)
    assert out.segment.sample_rate == pytest.approx(q)
    assert out.segment.steps == steps  # logical steps, not physical ones


def test_gpus_requested_without_a_gpu_is_a_one_line_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(
        [
            "simulate",
            "--weights",
            "random",
            "--gpus-per-client",
            "0.5",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no visible CUDA GPU" in err[0]


@pytest.mark.slow
def test_two_hundred_client_simulation_completes(tmp_path, monkeypatch):
    """200 institutions, a quarter sampled per round: the plan and the round loop at that
    scale, the institutions in this process (Flower's Ray backend carries 100 virtual clients
    in ``test_bench``)."""
    monkeypatch.setenv("FERRY_HOME", str(tmp_path / "home"))
    cfg = RunConfig(
        clients=200,
        rounds=2,
        fraction_train=0.25,
        examples=200 * 40,
        alpha=100.0,
        weights="random",
        out=str(tmp_path / "run"),
    )
    summary = simulate_in_process(cfg)
    assert summary["rounds_completed"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in lines] == [50, 50]
    assert 50 <= len(summary["clients"]) <= 100
    assert all(0 < c["epsilon"] <= 3.0 for c in summary["clients"].values())
