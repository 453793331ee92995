"""The institution's budget guard: refuses before training, never under-counts."""

from __future__ import annotations

import dataclasses

import pytest

from ferry.client import institution_settings, runtime
from ferry.client.backbone_cache import BackboneCache
from ferry.client.budget_guard import Budget, BudgetExceeded, check_round
from ferry.client.privacy_state import PrivacyState
from ferry.common.config import RunConfig
from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.server.pretrain import random_artifact


@pytest.fixture(scope="module")
def artifact():
    return random_artifact("ferry-cnn", seed=3)


def _client(tmp_path, artifact, budget: Budget | None):
    settings = institution_settings.ClientSettings(
        "hospital-000", tmp_path / "state", tmp_path / "cache", 0, 2, budget
    )
    BackboneCache(settings.cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)
    return settings


def _head_arrays():
    from ferry.common.heads import build_head

    head = build_head("linear", 64, 4)
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def test_check_round_refuses_round_that_would_exceed_eps():
    seg = MechanismSegment(1.0, 0.1, 10)
    one = epsilon_for_history([seg], 1e-5)
    two = epsilon_for_history([seg, seg], 1e-5)
    assert check_round([seg], seg, 1e-5, Budget(two * 1.001, 1e-5)) == pytest.approx(two)
    with pytest.raises(BudgetExceeded, match="budget exhausted"):
        check_round([seg], seg, 1e-5, Budget((one + two) / 2, 1e-5))


def test_check_round_refuses_run_delta_above_budget_delta():
    seg = MechanismSegment(1.0, 0.1, 10)
    with pytest.raises(BudgetExceeded, match="delta"):
        check_round([], seg, 1e-4, Budget(100.0, 1e-5))


@pytest.mark.slow
def test_client_refuses_round_that_would_cross_budget_and_records_nothing(tmp_path, artifact):
    run = RunConfig(examples=400, clients=2, rounds=4, epsilon=3.0)
    settings = _client(tmp_path, artifact, Budget(2.0, 1e-5))
    req = runtime.RoundRequest(run, 1, artifact.sha256, 4, "run-a")
    spent = []
    with pytest.raises(BudgetExceeded):
        for rnd in range(1, 5):
            _, _, report = runtime.train_round(
                settings, dataclasses.replace(req, round=rnd), _head_arrays()
            )
            spent.append(report["epsilon"])
            assert report["epsilon"] <= 2.0
    assert spent, "at least one round fits a budget of 2 when the run targets 3 over 4 rounds"
    state = PrivacyState.open(settings.state_dir, settings.institution)
    # The refused round left no trace; every released round is on disk.
    assert state.rounds() == len(spent)
    assert state.epsilon(1e-5) == pytest.approx(spent[-1])


@pytest.mark.slow
def test_client_tells_server_when_no_further_round_fits(tmp_path, artifact):
    run = RunConfig(examples=400, clients=2, rounds=4, epsilon=3.0)
    settings = _client(tmp_path, artifact, Budget(2.0, 1e-5))
    left = []
    for rnd in range(1, 5):
        req = runtime.RoundRequest(run, rnd, artifact.sha256, 4, "run-a")
        try:
            _, _, report = runtime.train_round(settings, req, _head_arrays())
        except BudgetExceeded:
            break
        left.append(report["budget-left-for-another-round"])
    assert left[-1] is False and all(left[:-1])


@pytest.mark.slow
def test_restarted_client_keeps_cumulative_epsilon(tmp_path, artifact):
    run = RunConfig(examples=400, clients=2, rounds=3, epsilon=3.0)
    settings = _client(tmp_path, artifact, Budget(3.0, 1e-5))
    _, _, first = runtime.train_round(
        settings, runtime.RoundRequest(run, 1, artifact.sha256, 4), _head_arrays()
    )
    # A "restart": new settings object, state re-read from disk.
    settings2 = dataclasses.replace(settings)
    _, _, second = runtime.train_round(
        settings2, runtime.RoundRequest(run, 2, artifact.sha256, 4), _head_arrays()
    )
    assert second["rounds"] == 2
    assert second["epsilon"] > first["epsilon"]
    history = PrivacyState.open(settings.state_dir, settings.institution).history
    assert second["epsilon"] == pytest.approx(epsilon_for_history(history, 1e-5))
