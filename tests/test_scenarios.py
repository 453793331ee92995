"""Every scenario preset runs end to end (`ferry simulate --scenario NAME`) on its built-in
synthetic data, with a backbone pretrained on the preset's synthetic source task; and a
preset runs on a user's file with a natural split by a column.

Each run: 3 virtual institutions, 2 rounds, DP at ε = 3 (PRV, δ 1e-5, unit: one record).
The presets run the simulation's plan and round loop with the institutions in this process
(:func:`inprocess_grid.simulate_in_process`: what differs between presets is data, backbone
and task, not Ray); the user's-file run goes through Flower's Ray backend, as ``ferry
simulate`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.common.config import RunConfig
from ferry.common.scenarios import known_scenarios
from ferry.server.audit import audit_ledger
from ferry.server.pretrain import PretrainConfig, pretrain
from ferry.simulations.runner import simulate

from inprocess_grid import simulate_in_process

pytestmark = pytest.mark.slow

CLASSIFICATION = ("accuracy", "balanced_accuracy", "roc_auc", "loss")
REGRESSION = ("rmse", "mae", "directional_accuracy", "loss")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def ray_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        yield


def _config(tmp_path: Path, scenario: str, weights: str, **extra) -> RunConfig:
    return RunConfig(
        scenario=scenario,
        clients=3,
        rounds=2,
        examples=900,
        epsilon=3.0,
        weights=weights,
        out=str(tmp_path / "run"),
        **extra,
    )


@pytest.mark.parametrize("scenario", known_scenarios())
def test_preset_runs_end_to_end_on_its_synthetic_data(scenario, tmp_path):
    weights = tmp_path / "pretrained"
    pretrain(
        PretrainConfig(scenario=scenario, examples=1200, epochs=1, out=str(weights)),
        log=_quiet,
    )
    summary = simulate_in_process(_config(tmp_path, scenario, str(weights)))

    final = summary["final"]
    assert summary["rounds_completed"] == 2
    expected = REGRESSION if final["task"] == "regression" else CLASSIFICATION
    missing = [k for k in expected if not isinstance(final.get(k), float)]
    assert not missing, (scenario, final)
    assert 0 < summary["privacy"]["max_epsilon"] <= 3.0 + 1e-6
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    report = audit_ledger(tmp_path / "run")
    assert report.ok, report


def test_bank_credit_on_a_user_csv_split_naturally_by_branch(tmp_path, ray_env):
    from ferry.common.data.synthetic_records import make_credit

    frame = make_credit(900, seed=3, split="target")
    branches = sorted(frame["branch"].unique())[:3]
    frame = frame[frame["branch"].isin(branches)]
    path = tmp_path / "loans.csv"
    frame.to_csv(path, index=False)

    cfg = _config(
        tmp_path,
        "bank-credit",
        "random",
        data=str(path),
        label_column="default",
        partition="natural",
        partition_column="branch",
    )
    summary = simulate(cfg, log=_quiet)

    sizes = sorted(c["examples"] for c in summary["clients"].values())
    counts = frame["branch"].value_counts().to_numpy()
    # Each bank holds exactly one branch's loans, about 20% of them held out for evaluation
    # (drawn per record, so one loan's presence moves no other loan in or out of training).
    for size, n in zip(sizes, sorted(counts), strict=True):
        assert abs(size - 0.8 * n) <= 3 * (0.16 * n) ** 0.5 + 1, (sizes, sorted(counts))
    assert isinstance(summary["final"]["roc_auc"], float)
