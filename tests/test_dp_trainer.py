"""DP training and accounting: what ran is what is accounted, and epsilon only ever grows."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ferry.client import runtime
from ferry.client.dp_trainer import DPTrainConfig, train_head
from ferry.client.privacy_state import PrivacyState
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import (
    MechanismSegment,
    compact_history,
    epsilon_for_history,
    noise_multiplier_for_target,
)
from ferry.common.training_defaults import round_plan

DELTA = 1e-5


def _toy_data(n: int, dim: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n)


# --- accounting -------------------------------------------------------------------------


def test_epsilon_grows_with_steps():
    eps = [
        epsilon_for_history([MechanismSegment(1.0, 0.1, steps)], DELTA) for steps in (10, 20, 40)
    ]
    assert 0 < eps[0] < eps[1] < eps[2]


def test_epsilon_of_three_rounds_equals_one_segment_with_three_times_the_steps():
    one_round = MechanismSegment(1.2, 0.2, 15)
    three_rounds = [one_round] * 3

    eps_three = epsilon_for_history(three_rounds, DELTA)

    assert eps_three == pytest.approx(
        epsilon_for_history([MechanismSegment(1.2, 0.2, 45)], DELTA), rel=1e-9
    )
    assert eps_three > epsilon_for_history([one_round], DELTA)


def test_epsilon_composes_rounds_with_different_mechanisms():
    a, b = MechanismSegment(1.0, 0.1, 20), MechanismSegment(2.0, 0.3, 10)
    both = epsilon_for_history([a, b], DELTA)
    assert both > max(epsilon_for_history([a], DELTA), epsilon_for_history([b], DELTA))
    assert epsilon_for_history([b, a], DELTA) == pytest.approx(both, rel=1e-9)


def test_compact_history_merges_equal_mechanisms_and_drops_empty_segments():
    a, b = MechanismSegment(1.0, 0.1, 20), MechanismSegment(2.0, 0.3, 10)
    assert compact_history([a, b, a, MechanismSegment(3.0, 0.5, 0)]) == (
        MechanismSegment(1.0, 0.1, 40),
        b,
    )


def test_epsilon_is_zero_without_steps_and_infinite_without_noise():
    assert epsilon_for_history([], DELTA) == 0.0
    assert epsilon_for_history([MechanismSegment(1.0, 0.1, 0)], DELTA) == 0.0
    noiseless = [MechanismSegment(1.0, 0.1, 5), MechanismSegment(0.0, 0.1, 1)]
    assert epsilon_for_history(noiseless, DELTA) == math.inf


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n", "batch_size", "epochs", "rounds", "target"),
    [(86, 32, 1, 3, 3.0), (400, 16, 2, 5, 1.0)],
)
def test_derived_noise_keeps_planned_run_at_or_just_below_target_epsilon(
    n, batch_size, epochs, rounds, target
):
    q, steps = round_plan(n, batch_size, epochs)

    sigma = noise_multiplier_for_target(target, DELTA, q, steps * rounds)
    eps = epsilon_for_history([MechanismSegment(sigma, q, steps)] * rounds, DELTA)

    assert eps <= target
    assert eps >= 0.95 * target, "noise is far larger than the target requires"


@pytest.mark.slow
def test_client_derives_noise_for_all_planned_rounds_not_one():
    run = RunConfig(epsilon=3.0, delta=DELTA, rounds=4, batch_size=32, local_epochs=1)
    req = runtime.RoundRequest(run, 1, "0" * 64, 4)
    q, steps = round_plan(100, 32, 1)

    sigma = runtime.noise_for(req, 100)

    four_rounds = epsilon_for_history([MechanismSegment(sigma, q, steps)] * 4, DELTA)
    assert 0.95 * 3.0 <= four_rounds <= 3.0


def test_given_noise_multiplier_is_used_as_is_and_non_private_derives_zero():
    given = runtime.RoundRequest(RunConfig(noise_multiplier=0.7), 1, "0" * 64, 4)
    non_private = runtime.RoundRequest(RunConfig(non_private=True), 1, "0" * 64, 4)
    assert runtime.noise_for(given, 100) == 0.7
    assert runtime.noise_for(non_private, 100) == 0.0


# --- the trainer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs"),
    [
        (100, 32, 2),  # last batch partial: ceil, not floor
        (7, 3, 1),
        (20, 1, 3),  # q = 1/20: many Poisson batches are empty, still one step each
    ],
)
def test_train_head_reports_the_poisson_mechanism_opacus_ran(n, batch_size, epochs):
    x, y = _toy_data(n)
    cfg = DPTrainConfig(noise_multiplier=1.3, batch_size=batch_size, local_epochs=epochs)
    batches = math.ceil(n / batch_size)

    outcome = train_head(torch.nn.Linear(8, 3), x, y, cfg)

    assert outcome.segment is not None
    assert outcome.segment.noise_multiplier == pytest.approx(1.3)
    assert outcome.segment.sample_rate == pytest.approx(1 / batches)
    assert outcome.segment.steps == epochs * batches
    assert round_plan(n, batch_size, epochs) == (
        pytest.approx(outcome.segment.sample_rate),
        outcome.segment.steps,
    )
    assert outcome.num_examples == n


def test_train_head_changes_the_head_and_returns_its_arrays():
    x, y = _toy_data(64)
    head = torch.nn.Linear(8, 3)
    before = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}

    outcome = train_head(head, x, y, DPTrainConfig(noise_multiplier=1.0, batch_size=16))

    assert set(outcome.head_state) == {"weight", "bias"}
    assert outcome.head_state["weight"].shape == (3, 8)
    assert not np.allclose(outcome.head_state["weight"], before["weight"])


@pytest.mark.parametrize("non_private", [False, True])
def test_negative_or_nan_noise_multiplier_is_refused(non_private):
    for sigma in (-1.0, -1e-9, float("nan"), float("inf")):
        with pytest.raises(FerryError, match="noise multiplier"):
            DPTrainConfig(noise_multiplier=sigma, non_private=non_private).validate()
    x, y = _toy_data(10)
    with pytest.raises(FerryError, match="noise multiplier"):
        train_head(torch.nn.Linear(8, 3), x, y, DPTrainConfig(-1.0, non_private=non_private))
    with pytest.raises(FerryError, match="--noise-multiplier"):
        RunConfig(noise_multiplier=-1.0, non_private=non_private).validate()


def test_zero_noise_is_refused_for_a_private_run():
    with pytest.raises(FerryError, match="--non-private"):
        DPTrainConfig(noise_multiplier=0.0).validate()
    x, y = _toy_data(10)
    with pytest.raises(FerryError, match="--non-private"):
        train_head(torch.nn.Linear(8, 3), x, y, DPTrainConfig(noise_multiplier=0.0))
    with pytest.raises(FerryError, match="--non-private"):
        RunConfig(noise_multiplier=0.0).validate()


def test_zero_noise_runs_only_when_marked_non_private_and_reports_no_segment():
    DPTrainConfig(noise_multiplier=0.0, non_private=True).validate()
    RunConfig(noise_multiplier=0.0, non_private=True).validate()
    x, y = _toy_data(40)

    outcome = train_head(
        torch.nn.Linear(8, 3), x, y, DPTrainConfig(noise_multiplier=0.0, non_private=True)
    )

    assert outcome.segment is None
    assert outcome.num_examples == 40


# --- the client's privacy state across rounds and restarts ------------------------------


@pytest.mark.slow
def test_client_cumulative_epsilon_strictly_increases_and_survives_restart(client, restart_process):
    settings, run = client.settings, client.run
    head = client.initial_head()
    reported, stored = [], []
    for rnd in (1, 2, 3):
        head, _, report = runtime.train_round(settings, client.request(rnd), head)
        reported.append(report["epsilon"])
        state = PrivacyState.open(settings.state_dir, settings.institution)
        stored.append(state.epsilon(run.delta))
        assert report["rounds"] == state.rounds() == rnd

    assert reported == pytest.approx(stored, rel=1e-9)
    assert 0 < reported[0] < reported[1] < reported[2]
    assert reported[2] <= run.epsilon  # the planned 3 rounds stay within the target

    restart_process()
    with pytest.raises(FerryError, match="belongs to institution"):
        PrivacyState.open(settings.state_dir, "someone-else")  # never another's spend
    reopened = PrivacyState.open(settings.state_dir, settings.institution)
    assert reopened.rounds() == 3
    assert reopened.epsilon(run.delta) == pytest.approx(reported[2], rel=1e-9)

    # A later run at the same institution adds to the spend; it never starts from zero.
    _, _, report = runtime.train_round(settings, client.request(1, run_id="run-b"), head)
    assert report["rounds"] == 4
    assert report["epsilon"] > reported[2]
    assert PrivacyState.open(settings.state_dir, settings.institution).epsilon(
        run.delta
    ) == pytest.approx(report["epsilon"], rel=1e-9)


def test_train_round_records_the_segment_it_reports(client):
    head, metrics, report = runtime.train_round(
        client.settings, client.request(1), client.initial_head()
    )
    state = PrivacyState.open(client.settings.state_dir, client.settings.institution)
    (entry,) = state.entries
    q, steps = round_plan(metrics["num-examples"], client.run.batch_size, client.run.local_epochs)

    assert entry["round"] == 1 and entry["run"] == "run-a"
    assert entry["noise_multiplier"] == report["noise-multiplier"] > 0
    assert entry["sample_rate"] == pytest.approx(q) == report["sample-rate"]
    assert entry["steps"] == steps == report["steps"]


def test_train_round_refuses_delta_not_below_one_over_n(client):
    client.run = dataclasses.replace(client.run, delta=0.5)
    with pytest.raises(FerryError, match="delta"):
        runtime.train_round(client.settings, client.request(1), client.initial_head())
    assert not (client.settings.state_dir / "privacy_state.json").exists()


def test_derived_noise_is_remembered_in_the_state_dir(tmp_path, monkeypatch):
    """A deployed client runs each round in a fresh process: the PRV bisection is done once."""
    from ferry.client import runtime
    from ferry.common.config import RunConfig

    req = runtime.RoundRequest(RunConfig(rounds=3), 1, "0" * 64, 4)
    first = runtime.noise_for(req, 300, tmp_path)
    assert (tmp_path / "noise_cache.json").is_file()

    def no_bisection(*args, **kwargs):
        raise AssertionError("derived again")

    monkeypatch.setattr(runtime, "noise_multiplier_for_target", no_bisection)
    assert runtime.noise_for(req, 300, tmp_path) == first
