"""The operator cannot regenerate an institution's DP noise or batches, and so cannot subtract
them: every draw DP-SGD's guarantee rests on comes from the institution's own OS entropy
(:mod:`client.dp_randomness`), never from what the server sends (run config, ``--seed``,
round, partition) or knows.

The attack is written as the operator: it runs a real client round, then, with everything it
saw and sent, replays the randomness exactly as Ferry once derived it (the run's seed, the
round and the partition id) and subtracts the noise to estimate the institution's
clipped-gradient sum. Against the old derivation the estimate was exact (error ~1e-6): here
it must be off by the noise itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import opacus.optimizers.optimizer_fast_gradient_clipping as opacus_ghost
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ferry.client import dp_randomness, institution_settings, runtime
from ferry.client.dp_trainer import DPTrainConfig, train_tail
from ferry.common.config import RunConfig
from ferry.common.training_defaults import round_plan

SIGMA, CLIP, LR = 1.0, 0.5, 0.1


@pytest.fixture(params=["linear", "mlp"])
def small_run(request) -> RunConfig:
    """The hostile but budget-accepted config the operator chooses: one client, a batch
    larger than the data (q = 1: every example in the single step's batch, so the batch is
    public), a given σ, a seed the operator knows; a linear head (Ferry's vectorised DP-SGD)
    or an MLP head (Opacus)."""
    return RunConfig(
        examples=200,
        clients=1,
        rounds=1,
        batch_size=10_000,
        local_epochs=1,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        lr=LR,
        seed=11,
        head=request.param,
    )


def _old_noise(run: RunConfig, rnd: int, partition_id: int, n: int, sent: dict) -> dict:
    """The operator's replay of the noise as Ferry once drew it, from the seed
    ``run.seed * 100_003 + round * 1_009 + partition_id``: on the vectorised path a generator
    seeded with it drew the Poisson masks, then N(0, 1) per coordinate (weight, then bias);
    on the Opacus path ``torch.manual_seed`` seeded torch's global generator, from which Opacus
    drew N(0, (σC)^2) per parameter tensor, in order. Noise of the clipped sum, by array."""
    seed = run.seed * 100_003 + rnd * 1_009 + partition_id
    std = run.noise_multiplier * run.max_grad_norm
    q, steps = round_plan(n, run.batch_size, run.local_epochs)
    assert (q, steps) == (1.0, 1)  # one step, every example: the noise is all that is unknown
    if run.head == "linear":
        generator = torch.Generator().manual_seed(seed)
        assert bool((torch.rand((steps, n), generator=generator) < q).all())
        z = torch.randn((steps, sent["weight"].size + sent["bias"].size), generator=generator)
        w = sent["weight"].size
        return {"weight": std * z[0, :w].reshape(sent["weight"].shape), "bias": std * z[0, w:]}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    noise = {k: torch.normal(0.0, std, size=v.shape) for k, v in sent.items()}
    torch.random.set_rng_state(state)
    return noise


def _true_clipped_sum(tail: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What only the institution can compute: the sum over its examples of their loss
    gradients at the sent arrays, each clipped to C as Opacus clips (one norm over all
    trainable arrays)."""
    params = {k: p.detach() for k, p in tail.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        out = functional_call(tail, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.reshape(len(y), -1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in grads.items()}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # Opacus' PRV at q = 1
def test_operator_replaying_seed_round_and_partition_cannot_subtract_the_noise(client):
    run, req = client.run, client.request(1)
    sent = client.initial_head()
    released, metrics, report = runtime.train_round(client.settings, req, sent)
    assert report["noise-multiplier"] == SIGMA and report["sample-rate"] == 1.0

    # The operator: what it sent, what came back, the run config, seed and round it chose.
    # The update is -(lr / B) (clipped sum + noise), B the expected batch: it solves for the
    # clipped sum and subtracts the noise it regenerates.
    n = int(metrics["num-examples"])
    scale = max(1, int(n * report["sample-rate"])) / LR
    noise = _old_noise(run, req.round, client.settings.partition_id, n, sent)
    estimate = {k: torch.from_numpy((sent[k] - released[k]) * scale) - noise[k] for k in sent}

    data = runtime._local_data(client.settings, req)
    tail = runtime._tail(data, sent)
    x = torch.from_numpy(np.asarray(data.feats["train"], dtype=np.float32))
    y = torch.from_numpy(np.asarray(data.part.train_y, dtype=np.int64))
    truth = _true_clipped_sum(tail, x, y)
    residual = torch.cat([(estimate[k] - truth[k]).flatten() for k in sent])

    # The replayed noise is independent of the real one: the estimate is off by the real noise
    # minus the replayed noise, std √2·σ·C per coordinate (old derivation: ~1e-6).
    spread = float(residual.std())
    print(f"{run.head}: operator's error on the clipped sum: std {spread:.3g}, σC {SIGMA * CLIP}")
    assert spread > 0.5 * SIGMA * CLIP, f"the operator recovered the clipped sum ({spread:.2g})"
    assert spread == pytest.approx(np.sqrt(2) * SIGMA * CLIP, rel=0.2)


# --- two identical DP rounds release different arrays --------------------------------------


def _settings_twin(
    settings: institution_settings.ClientSettings, name: str
) -> institution_settings.ClientSettings:
    """The same institution's data and cache, a fresh privacy state: the same round twice."""
    return dataclasses.replace(settings, state_dir=settings.state_dir.parent / name)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_two_identical_rounds_through_the_client_release_different_arrays(client):
    sent = client.initial_head()
    first, _, _ = runtime.train_round(_settings_twin(client.settings, "a"), client.request(1), sent)
    again, _, _ = runtime.train_round(_settings_twin(client.settings, "b"), client.request(1), sent)
    for key in sent:
        assert not np.array_equal(first[key], again[key]), key


def _features(n: int = 48, dim: int = 12, classes: int = 3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n)


def _mlp(dim: int = 12, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)  # the initialisation is public: the same head both times
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, classes))


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("linear", {}),  # client.linear_dp
        ("mlp", {}),  # Opacus, per-example gradients
        ("mlp", {"clipping": "ghost"}),  # Opacus ghost clipping
        ("mlp", {"max_physical_batch": 4}),  # Opacus BatchMemoryManager
    ],
)
def test_two_identical_dp_rounds_release_different_arrays(model, extra):
    x, y = _features()
    cfg = DPTrainConfig(noise_multiplier=SIGMA, batch_size=16, lr=0.5, **extra)
    outcomes = []
    for _ in range(2):
        if model == "linear":
            torch.manual_seed(0)
            tail = nn.Linear(12, 3)
        else:
            tail = _mlp()
        outcomes.append(train_tail(tail, x, y, cfg))
    first, again = outcomes
    assert first.segment == again.segment is not None
    for key, value in first.trainable_state.items():
        assert not np.array_equal(value, again.trainable_state[key]), key


def test_dp_rounds_ignore_torch_global_seed():
    """What a seeded caller (or an operator-chosen ``--seed`` reaching ``torch.manual_seed``
    elsewhere) sets does not fix the DP draws."""
    x, y = _features()
    cfg = DPTrainConfig(noise_multiplier=SIGMA, batch_size=16, lr=0.5)
    states = []
    for _ in range(2):
        torch.manual_seed(1234)
        states.append(train_tail(_mlp(), x, y, cfg).trainable_state)
    assert not all(np.array_equal(v, states[1][k]) for k, v in states[0].items())


@pytest.mark.parametrize("clipping", ["flat", "ghost"])
def test_opacus_draws_noise_in_secure_mode_from_a_generator_on_the_parameters_device(
    monkeypatch, clipping
):
    calls = []
    real = opacus_optimizer._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        calls.append((generator, secure_mode, reference.device))
        return real(std, reference, generator=generator, secure_mode=secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    monkeypatch.setattr(opacus_ghost, "_generate_noise", spy)
    x, y = _features()
    cfg = DPTrainConfig(noise_multiplier=SIGMA, batch_size=16, clipping=clipping)

    train_tail(_mlp(), x, y, cfg)

    assert len(calls) == 3 * 4  # 3 steps, 4 parameter tensors
    for generator, secure_mode, device in calls:
        assert secure_mode, "Opacus drew plain (attackable) Gaussian noise"
        assert isinstance(generator, torch.Generator), "noise from torch's global generator"
        assert generator.device == device
    assert len({id(g) for g, _, _ in calls}) == 1  # one generator for the round's noise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_on_cuda_the_dp_draws_come_from_fresh_generators_on_the_gpu(monkeypatch, model):
    devices = []
    real = dp_randomness.round_generator

    def spy(device="cpu"):
        generator = real(device)
        devices.append(generator.device.type)
        return generator

    monkeypatch.setattr(dp_randomness, "round_generator", spy)
    x, y = _features()
    cfg = DPTrainConfig(noise_multiplier=SIGMA, batch_size=16, lr=0.5, device="cuda")
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        tail = nn.Linear(12, 3) if model == "linear" else _mlp()
        states.append(train_tail(tail, x, y, cfg).trainable_state)
    assert not any(np.array_equal(v, states[1][k]) for k, v in states[0].items())
    # vectorised: one generator on the GPU; Opacus: sampling on the CPU, noise on the GPU
    assert devices == (["cuda"] if model == "linear" else ["cpu", "cuda"]) * 2
    noise = dp_randomness.gaussian_noise((1_000_000,), 0.7, real("cuda"))
    assert noise.device.type == "cuda"
    assert float(noise.std()) == pytest.approx(0.7, rel=0.01)


# --- the sampler --------------------------------------------------------------------------


def test_secure_gaussian_has_the_requested_std_and_is_opacus_secure_sum():
    std = 0.7
    noise = dp_randomness.gaussian_noise((1_000_000,), std, dp_randomness.round_generator())
    assert float(noise.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(noise.mean())) < 0.005

    # Draw for draw what Opacus' secure mode draws: one thrown away, (z1 + z2 + z3 + z4) / 2.
    ours = dp_randomness.gaussian_noise((5, 7), std, torch.Generator().manual_seed(5))
    reference = torch.zeros(5, 7)
    theirs = opacus_optimizer._generate_noise(
        std, reference, generator=torch.Generator().manual_seed(5), secure_mode=True
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    plain = torch.normal(0.0, std, size=(5, 7), generator=torch.Generator().manual_seed(5))
    assert not torch.equal(ours, plain)


def test_round_generators_are_fresh_each_call_and_ignore_torch_global_seed():
    torch.manual_seed(0)
    first = torch.rand(8, generator=dp_randomness.round_generator())
    torch.manual_seed(0)
    second = torch.rand(8, generator=dp_randomness.round_generator())
    assert not torch.equal(first, second)
    seeds = {dp_randomness.round_generator().initial_seed() for _ in range(4)}
    assert len(seeds) == 4
