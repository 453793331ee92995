"""Attack: the operator chooses ``--base-rates`` to break the DP guarantee.

Class weights multiply each example's clipped gradient, so a weight above 1 would let one
example move the clipped sum by more than C, which σ (derived for sensitivity C) does not
cover. Played here: rates that underflow or overflow the weights (1e-300, 1e300, the
smallest subnormal), rates that do not sum to 1, a thousand classes. For every one, adding or
removing one example of any class changes the clipped sum by at most C, on each clipping
path (the vectorised linear head, Opacus' flat and ghost clipping). Rates that are not
positive finite numbers, or do not fit the task's classes, are one-line refusals: in the run
config, from ``ferry simulate`` (exit 2, before the simulation engine starts), and at an
institution before anything is spent (no privacy state written).
"""

from __future__ import annotations

import dataclasses
import math

import flwr.simulation
import numpy as np
import pytest
import torch
from torch import nn

from ferry.cli import main
from ferry.client import runtime
from ferry.client.linear_dp import exact_clipped_sum
from ferry.client.privacy_state import STATE_FILE
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from tests.test_attack_operator_config import _head, _one_line, _request, _settings

C = 0.5


def class_weights(rates: str, num_classes: int):
    """The new API, imported here so that on the old code each test fails on its own."""
    from ferry.common.config import class_weights

    return class_weights(rates, num_classes)


def opacus_sum(path: str, *args):
    from tests import test_class_balance

    return getattr(test_class_balance, f"opacus_{path}_sum")(*args)


rng = np.random.default_rng(0)
MANY = ",".join(f"{10.0**e:g}" for e in rng.uniform(-300, 300, 1000))
HOSTILE_RATES = [
    "1e-300,1",  # the other class weighs 1e-300 / 1 ... or would weigh 1e300 if inverted
    "1,1e-300",
    "1e300,1e-300",  # a ratio of 1e600: the weight underflows to 0
    "5e-324,1.7976931348623157e308",  # the smallest subnormal and the largest double
    "3,7",  # does not sum to 1
    "1,1,1,1e-10",
    MANY,  # a thousand classes, rates from 1e-300 to 1e300
]


def _sensitivity_case(rates: str):
    k = len(rates.split(","))
    torch.manual_seed(0)
    layer = nn.Linear(6, k).requires_grad_(False)
    layer.weight.mul_(50.0)  # large logits: large per-example gradients, all clipped
    y = torch.arange(max(k, 24)) % k  # every class, several times
    x = torch.randn(len(y), 6) * 20
    return layer, x, y


def _moves(sums_with, sums_without) -> float:
    return math.sqrt(
        sum(
            float(((a - b).double() ** 2).sum())
            for a, b in zip(sums_with, sums_without, strict=True)
        )
    )


@pytest.mark.parametrize("rates", HOSTILE_RATES, ids=lambda r: r[:30])
def test_no_rates_make_a_weight_above_one(rates):
    w = class_weights(rates, len(rates.split(",")))
    assert all(0.0 <= v <= 1.0 for v in w)
    assert max(w) == 1.0  # the rarest class keeps its full clipped gradient
    # as the trainers hold them: float32, still <= 1
    assert float(torch.tensor(w, dtype=torch.float32).max()) <= 1.0


@pytest.mark.parametrize("rates", HOSTILE_RATES, ids=lambda r: r[:30])
def test_one_example_of_any_class_moves_the_weighted_clipped_sum_by_at_most_c(rates):
    layer, x, y = _sensitivity_case(rates)
    w = torch.tensor(class_weights(rates, layer.out_features), dtype=torch.float32)
    full = exact_clipped_sum(layer, x, y, C, "classification", None, w)[:2]
    shown = []
    rarest = int(torch.argmax(w))
    picked = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:24].tolist()
    for i in {rarest, *picked}:  # remove example i (of class i % k); the rarest class's too
        keep = torch.arange(len(y)) != i
        without = exact_clipped_sum(layer, x[keep], y[keep], C, "classification", None, w)[:2]
        shown.append(_moves(full, without))
    assert max(shown) <= C * (1 + 1e-5), (rates[:30], max(shown))
    assert max(shown) > 0.9 * C  # the rarest class does move it by about C: a real test


@pytest.mark.parametrize("rates", HOSTILE_RATES[:6], ids=lambda r: r[:30])
@pytest.mark.parametrize("path", ["flat", "ghost"])
def test_opacus_paths_also_move_by_at_most_c_for_one_example(rates, path):
    layer, x, y = _sensitivity_case(rates)
    w = torch.tensor(class_weights(rates, layer.out_features), dtype=torch.float32)
    full = opacus_sum(path, layer, x, y, C, w)
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        # Opacus' mean loss over the batch is rescaled to per-example gradients: the removed
        # example's batch is one smaller, which it accounts for
        assert _moves(full, opacus_sum(path, layer, x[keep], y[keep], C, w)) <= C * (1 + 1e-5)


# --- rates that are refused, in one line, before any work -------------------------------------

BAD_RATES = ["nan,1", "1,inf", "-0.5,1.5", "0,1", "1", "a,b", "1e400,1", "1,,1", "0.5;0.5"]


@pytest.mark.parametrize("rates", BAD_RATES)
def test_rates_that_are_not_positive_finite_numbers_are_refused_by_the_run_config(rates):
    with pytest.raises(FerryError) as err:
        RunConfig(base_rates=rates).validate()
    assert "--base-rates" in _one_line(err.value)


def test_rates_for_a_regression_task_or_the_wrong_class_count_are_refused():
    with pytest.raises(FerryError):
        RunConfig(task="regression", base_rates="0.5,0.5").validate()
    for rates, k in (("0.5,0.3,0.2", 2), ("0.5,0.5", 3), (MANY, 999)):
        with pytest.raises(FerryError) as err:
            class_weights(rates, k)
        assert "--base-rates" in _one_line(err.value)
    assert RunConfig(task="regression", base_rates="off").validate()  # off is no weighting


@pytest.fixture
def no_simulation(monkeypatch, tmp_path):
    def run_simulation(*args, **kwargs):
        raise AssertionError("the simulation engine was started; the input should be refused")

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--base-rates", "nan,1"],
        ["--base-rates", "-1,2"],
        ["--base-rates", "0,1"],
        ["--scenario", "bank-credit", "--base-rates", "0.5,0.3,0.2"],  # 3 rates, 2 classes
        ["--scenario", "bank-stocks", "--base-rates", "0.5,0.5"],  # a regression task
    ],
    ids=["nan", "negative", "zero", "wrong-count", "regression"],
)
def test_ferry_simulate_refuses_hostile_rates_with_exit_2_and_one_line(
    argv, capsys, tmp_path, no_simulation
):
    small = ["--examples", "200", "--clients", "2", "--weights", "random"]
    try:
        code = main(["simulate", *small, *argv, "--out", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse refusing an unknown option
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: error: "), lines
    assert "--base-rates" in lines[0] and "unrecognized" not in lines[0]  # refused, not unknown
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "rates, num_classes",
    [("0.2,0.3,0.5", 4), ("0.25,0.25,0.25,0.25,1e-300", 4), ("nan,1,1,1", 4), ("0,1,1,1", 4)],
)
def test_institution_refuses_rates_that_do_not_fit_before_spending_anything(
    tmp_path, artifact, rates, num_classes
):
    settings = _settings(tmp_path, artifact)
    run = RunConfig(examples=400, clients=2, rounds=3, noise_multiplier=1.0, base_rates=rates)
    req = dataclasses.replace(_request(artifact, run), num_classes=num_classes)
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, req, _head(artifact))
    assert "--base-rates" in _one_line(err.value)
    assert not (settings.state_dir / STATE_FILE).exists()  # nothing recorded, nothing spent
    receipts = settings.state_dir / "receipts.jsonl"
    assert not receipts.exists() or not receipts.read_bytes().strip()
