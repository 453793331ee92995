"""Imbalanced tasks: class weights from public base rates, applied to each example's gradient
after clipping, make a DP linear head predict the rare class (balanced accuracy above 0.5 at
the same ε), while the mechanism, and so the accounting, stays the unweighted one.

The weighted sums of every clipping path (the vectorised linear head, Opacus' flat clipping,
Opacus' ghost clipping) are checked against each other, and with weights of 1 against Opacus'
own ``clip_and_accumulate``, so the copy of it that scales the clip factors cannot drift
from the library unnoticed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from ferry.client import runtime
from ferry.client.dp_trainer import DPTrainConfig, train_tail
from ferry.client.linear_dp import exact_clipped_sum
from ferry.client.nonfinite_guards import finite_clipping_coef
from ferry.client.weighted_clipping import (
    BatchWeights,
    weight_after_clipping,
    weight_ghost_clipping,
)
from ferry.common.config import RunConfig, class_weights
from ferry.common.scenarios import get_scenario, with_base_rates
from ferry.common.training_defaults import round_plan
from tests.test_attack_operator_config import _head, _request, _settings

IMBALANCED = {"bank-credit": "credit", "hospital-tabular": "patients", "drug-activity": "molecules"}


# --- the public rates of the presets ---------------------------------------------------------


@pytest.mark.parametrize("scenario, kind", IMBALANCED.items())
def test_preset_base_rates_are_its_generators_rates_in_class_id_order(scenario, kind):
    from ferry.common.data.synthetic_records import synthetic_dataset

    preset = get_scenario(scenario)
    assert len(preset.base_rates) == len(preset.classes)
    assert sum(preset.base_rates) == pytest.approx(1.0)
    pooled = np.zeros(len(preset.classes))
    for seed in (0, 1):  # the built-in data of two seeds, pooled
        data = synthetic_dataset(kind, 3000, seed)
        for name, count in zip(
            data.classes, np.bincount(data.y, minlength=len(data.classes)), strict=True
        ):
            pooled[list(preset.classes).index(str(name))] += count
    np.testing.assert_allclose(pooled / pooled.sum(), preset.base_rates, atol=0.03)


def test_a_simulation_on_the_built_in_data_takes_the_presets_rates_and_nothing_else_does():
    def resolved(**changes) -> str:
        cfg = RunConfig(scenario="bank-credit", classes="0,1", task="classification")
        return with_base_rates(dataclasses.replace(cfg, **changes), 2).base_rates

    assert class_weights(resolved(), 2) == pytest.approx((0.08 / 0.92, 1.0))
    assert resolved(base_rates="off") == "off"  # off stays off: no weighting
    assert resolved(base_rates="1,3") == "1,3"  # the operator's own rates win
    assert resolved(data="loans.csv") == ""  # a researcher's data: the preset's rates are not its
    assert resolved(classes="1,0") == ""  # another class order: the preset's rates do not fit
    hospital = RunConfig(scenario="hospital-imaging", classes="a,b,c,d", task="classification")
    assert with_base_rates(hospital, 4).base_rates == ""  # a balanced preset has none


def test_class_weights_give_the_rarest_class_one_and_the_others_their_ratio():
    assert class_weights("0.92,0.08", 2) == pytest.approx((0.08 / 0.92, 1.0))
    assert class_weights("920,80", 2) == class_weights("0.92,0.08", 2)  # only ratios matter
    assert class_weights("", 2) is None and class_weights("off", 2) is None


# --- every clipping path computes the same weighted clipped sum --------------------------------


def _batch():
    torch.manual_seed(0)
    layer = nn.Linear(12, 3)
    x = torch.randn(40, 12) * 3
    y = torch.randint(0, 3, (40,))
    return layer, x, y


def _copy(layer: nn.Linear) -> nn.Linear:
    twin = nn.Linear(layer.in_features, layer.out_features)
    twin.load_state_dict(layer.state_dict())
    return twin


def opacus_flat_sum(layer, x, y, clip: float, weights: torch.Tensor | None):
    """Opacus' DPOptimizer clipping of the mean cross-entropy's per-example gradients; with
    ``weights``, through :func:`client.weighted_clipping.weight_after_clipping`."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    layer = _copy(layer)
    model = GradSampleModule(layer, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(y),
    )
    if weights is not None:
        batch = BatchWeights()
        batch.rows = weights[y]
        weight_after_clipping(optimizer, batch)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.clip_and_accumulate()
    sums = layer.weight.summed_grad.detach(), layer.bias.summed_grad.detach()
    model._close()
    return sums


def opacus_ghost_sum(layer, x, y, clip: float, weights: torch.Tensor):
    """Opacus' ghost clipping of the same sum, through
    :func:`client.weighted_clipping.weight_ghost_clipping`."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    layer = _copy(layer)
    model = GradSampleModuleFastGradientClipping(
        layer, max_grad_norm=clip, use_ghost_clipping=True, loss_reduction="mean"
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(layer.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(y),
    )
    batch = BatchWeights()
    batch.rows = weights[y]
    finite_clipping_coef(model)
    weight_ghost_clipping(model, batch)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    DPTensorFastGradientClipping(model, optimizer, losses, "mean").backward()
    return layer.weight.grad.detach(), layer.bias.grad.detach()


@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_opacus_flat_and_ghost_weighted_sums_equal_the_linear_paths(clip):
    layer, x, y = _batch()
    w = torch.tensor(class_weights("0.5,0.05,0.45", 3), dtype=torch.float32)
    linear_w, linear_b, _ = exact_clipped_sum(layer, x, y, clip, "classification", None, w)
    for path in (opacus_flat_sum, opacus_ghost_sum):
        got_w, got_b = path(layer, x, y, clip, w)
        torch.testing.assert_close(got_w, linear_w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_b, linear_b, rtol=1e-4, atol=1e-6)
    unweighted, _, _ = exact_clipped_sum(layer, x, y, clip, "classification")
    assert not torch.allclose(linear_w, unweighted)  # the weights did something


def test_weights_of_one_give_exactly_opacus_own_clipped_sum():
    layer, x, y = _batch()
    ours = opacus_flat_sum(layer, x, y, 0.5, torch.ones(3))
    theirs = opacus_flat_sum(layer, x, y, 0.5, None)  # Opacus' clip_and_accumulate itself
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "changes",
    [{}, {"clipping": "ghost"}, {"max_physical_batch": 16}, {"non_private": True}],
    ids=["linear-fast-path", "ghost", "opacus-flat", "non-private"],
)
def test_every_training_path_runs_the_planned_mechanism_with_class_weights(changes):
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.1).astype(np.int64)
    features = (rng.normal(0, 1, (400, 8)) + labels[:, None]).astype(np.float32)
    sigma = 0.0 if changes.get("non_private") else 1.0
    cfg = DPTrainConfig(
        noise_multiplier=sigma, batch_size=40, lr=0.5, class_weights=(0.1, 1.0), **changes
    )
    outcome = train_tail(nn.Linear(8, 2), features, labels, cfg)
    q, steps = round_plan(400, 40, 1)
    if cfg.private:
        assert (outcome.segment.sample_rate, outcome.segment.steps) == (q, steps)
        assert outcome.segment.noise_multiplier == sigma
    assert all(np.isfinite(a).all() for a in outcome.trainable_state.values())


def test_weighted_round_reports_the_same_mechanism_and_epsilon_as_an_unweighted_one(
    tmp_path, artifact
):
    reports = {}
    for rates in ("off", "0.1,0.2,0.3,0.4"):
        settings = _settings(tmp_path / rates, artifact)
        run = RunConfig(
            examples=400,
            clients=2,
            rounds=3,
            batch_size=32,
            local_epochs=1,
            noise_multiplier=1.0,
            base_rates=rates,
        )
        _, _, reports[rates] = runtime.train_round(
            settings, _request(artifact, run), _head(artifact)
        )
    keys = ("noise-multiplier", "sample-rate", "steps", "epsilon", "max-grad-norm", "dp-event")
    assert {k: reports["off"][k] for k in keys} == {k: reports["0.1,0.2,0.3,0.4"][k] for k in keys}


# --- the remedy: balanced accuracy above 0.5 at the same ε -------------------------------------


@pytest.fixture(scope="module")
def bank_credit(tmp_path_factory):
    """The bank-credit preset's built-in data through its pretrained encoder (features of
    every record, and ``ferry simulate``'s split among 10 banks)."""
    from ferry.common.serialization import load_artifact
    from ferry.server.pretrain import PretrainConfig, pretrain
    from ferry.simulations.linear_federation import extract_features

    out = tmp_path_factory.mktemp("bank-credit-encoder")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(out / "home"))
        pretrain(PretrainConfig(scenario="bank-credit", out=str(out / "enc")), log=lambda _: None)
        features = extract_features(
            RunConfig(scenario="bank-credit"), load_artifact(out / "enc"), log=None
        )
    return features, out / "enc"


@pytest.mark.slow
def test_class_weights_lift_balanced_accuracy_above_half_at_the_same_epsilon(bank_credit):
    from ferry.simulations.linear_federation import Privacy, TrainingSettings, repeated

    features, _ = bank_credit
    splits = features.splits(10)
    settings = TrainingSettings(batch_size=256, local_epochs=5, rounds=6, lr=0.5)
    weights = class_weights(",".join(map(str, get_scenario("bank-credit").base_rates)), 2)
    privacy = Privacy(epsilon=3.0)  # the same ε, δ, C and so σ, q, steps for both
    plain = repeated(features, splits, settings, privacy, 3)
    weighted = repeated(features, splits, settings, privacy, 3, class_weights=weights)
    print(f"\nbank-credit ε=3, 3 seeds: without {plain}\n  with {weighted}")
    assert plain["balanced_accuracy"] == pytest.approx(0.5, abs=0.02)  # the majority class
    assert weighted["balanced_accuracy"] > 0.55
    assert weighted["roc_auc"] > plain["roc_auc"]


@pytest.mark.slow
def test_bank_credit_simulation_with_its_defaults_predicts_the_rare_class(bank_credit, tmp_path):
    # The plan and round loop of `ferry simulate`, the institutions in this process: the point
    # is the preset's defaults, not Ray (tests/inprocess_grid.py).
    from inprocess_grid import simulate_in_process

    _, encoder = bank_credit
    cfg = RunConfig(
        scenario="bank-credit",
        clients=3,
        examples=1500,
        weights=str(encoder),  # batch, epochs, rounds, lr: the DP-aware defaults
        out=str(tmp_path / "run"),
    )
    summary = simulate_in_process(cfg)
    assert summary["final"]["balanced_accuracy"] > 0.5
    assert 0 < summary["privacy"]["max_epsilon"] <= 3.0 + 1e-6
