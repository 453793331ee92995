"""The vectorised DP-SGD path for linear heads runs Opacus' mechanism exactly: the same
clipped per-example gradient sums as Opacus' own per-example gradients, noise of std σ·C
on the sum, division by the expected batch size, the planned (σ, q, steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from ferry.client.dp_trainer import DPTrainConfig, train_tail
from ferry.client.linear_dp import exact_clipped_sum, train_linear
from ferry.common.training_defaults import round_plan


def _opacus_clipped_sum(layer: nn.Linear, x, y, max_grad_norm: float, task: str):
    """Opacus' per-example gradients of the mean loss, clipped as DPOptimizer clips them."""
    model = GradSampleModule(layer, loss_reduction="mean")
    out = model(x)
    loss = (
        nn.functional.cross_entropy(out, y)
        if task == "classification"
        else nn.functional.mse_loss(out[:, 0], y)
    )
    loss.backward()
    grads = [layer.weight.grad_sample, layer.bias.grad_sample]  # per-example loss gradients
    norms = torch.stack([g.reshape(len(y), -1).norm(dim=1) for g in grads]).norm(dim=0)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = [torch.einsum("i,i...->...", factor, g) for g in grads]
    model._close()
    return sums


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 100.0])
def test_clipped_sums_equal_opacus_per_example_clipping(task, max_grad_norm):
    torch.manual_seed(0)
    outputs = 5 if task == "classification" else 1
    layer = nn.Linear(12, outputs)
    x = torch.randn(17, 12) * 3
    y = torch.randint(0, 5, (17,)) if task == "classification" else torch.randn(17) * 2

    ours_w, ours_b, _ = exact_clipped_sum(layer, x, y, max_grad_norm, task)
    ref_w, ref_b = _opacus_clipped_sum(layer, x, y, max_grad_norm, task)

    torch.testing.assert_close(ours_w, ref_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_b, ref_b, rtol=1e-4, atol=1e-6)


def test_noise_on_each_step_has_std_sigma_times_c_over_the_expected_batch():
    torch.manual_seed(0)
    layer = nn.Linear(40, 50)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    n, steps = 200, 16
    x, y = torch.randn(n, 40), torch.randint(0, 50, (n,))
    # C so small that the clipped gradients vanish: what moves the weights is the noise.
    train_linear(
        layer,
        x,
        y,
        noise_multiplier=1e6,
        max_grad_norm=1e-6,
        sample_rate=0.1,
        steps=steps,
        lr=1.0,
        task="classification",
        generator=torch.Generator().manual_seed(3),  # a fixed draw: the std is then exact
    )
    expected_std = np.sqrt(steps) * 1.0 / int(n * 0.1)  # sum of `steps` N(0, (σC/B)^2)
    assert float(layer.weight.detach().std()) == pytest.approx(expected_std, rel=0.05)


def test_linear_head_round_runs_the_planned_mechanism_and_learns():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(4, 16))
    labels = rng.integers(0, 4, size=800)
    features = (centers[labels] + rng.normal(0, 1, size=(800, 16))).astype(np.float32)
    cfg = DPTrainConfig(noise_multiplier=0.8, batch_size=40, local_epochs=2, lr=0.5)

    outcome = train_tail(nn.Linear(16, 4), features, labels, cfg)

    q, steps = round_plan(800, 40, 2)
    assert (outcome.segment.noise_multiplier, outcome.segment.sample_rate) == (0.8, q)
    assert outcome.segment.steps == steps
    assert outcome.accuracy > 0.9


def test_ghost_clipping_or_physical_batches_still_run_opacus(monkeypatch):
    import ferry.client.linear_dp as linear_dp

    def refuse(*args, **kwargs):
        raise AssertionError("the vectorised path ran where Opacus should")

    monkeypatch.setattr(linear_dp, "train_linear", refuse)
    features = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    labels = np.arange(64) % 2
    for extra in ({"clipping": "ghost"}, {"max_physical_batch": 8}):
        cfg = DPTrainConfig(noise_multiplier=1.0, batch_size=16, **extra)
        assert train_tail(nn.Linear(8, 2), features, labels, cfg).segment is not None
