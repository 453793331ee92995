"""The round loop's aggregation seam: a rule, a post-aggregation step (central DP noise, say)
or a secure-aggregation decoder plugs in through the plan's ``RoundAggregation``, from
outside the package, and a federation uses it with the loop unchanged.

Runs on the in-process grid (:mod:`inprocess_grid`): Ferry's real ClientApp handlers, three
virtual institutions training with DP-SGD, no process started.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ferry.common.config import RunConfig
from ferry.server import aggregation
from ferry.server.aggregation import (
    AggregationPolicy,
    AggregationResult,
    BoundedAggregator,
    RoundAggregation,
    register_rule,
)
from ferry.server.checkpoint import load_checkpoint
from ferry.server.federation import FederationPlan, run_federation
from ferry.server.ledger import read_ledger

from inprocess_grid import FakeGrid, act_as_server_app, grid_plan


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    act_as_server_app(monkeypatch)


@pytest.fixture
def own_registry(monkeypatch):
    """Rules registered by a test leave the package's registry as it was."""
    monkeypatch.setattr(aggregation, "_RULES", dict(aggregation._RULES))


def _plan(tmp_path: Path, artifact, **changes) -> FederationPlan:
    run = RunConfig(
        examples=600, clients=3, rounds=2, min_clients=2, noise_multiplier=1.5, epsilon=30.0
    )
    return grid_plan(
        dataclasses.replace(run, out=str(tmp_path / "run")), artifact, tmp_path / "cache", **changes
    )


def _aggregated(out: Path) -> list[dict]:
    records = read_ledger(out / "ledger.jsonl").records
    return [r for r in records if r["event"] == "round_aggregated"]


def test_rule_registered_outside_the_package_runs_in_the_round_loop(
    tmp_path, artifact, own_registry
):
    seen = []

    @register_rule("first-institution")  # takes the alphabetically first change, whole
    def first_institution(changes, names, counts, policy):
        seen.append(sorted(names))
        chosen = sorted(names)[0]
        return changes[names.index(chosen)], {n: float(n == chosen) for n in names}

    rule = BoundedAggregator(AggregationPolicy(rule="first-institution", max_update_norm=np.inf))
    plan = _plan(tmp_path, artifact, aggregation=RoundAggregation(rule))

    summary = run_federation(FakeGrid(), plan)

    assert summary["rounds_completed"] == 2
    assert len(seen) == 2
    records = _aggregated(plan.out)
    assert [r["rule"] for r in records] == ["first-institution"] * 2
    for names, record in zip(seen, records, strict=True):
        assert record["weights"] == {n: float(n == names[0]) for n in names}
        assert "post" not in record  # no step ran: the record is as before the seam


def test_post_aggregation_step_changes_what_is_applied_and_is_ledgered(tmp_path, artifact):
    produced = []

    def shift(result: AggregationResult, rnd: int) -> AggregationResult:
        """Stands in for central DP noise: a server-side change of the aggregate."""
        arrays = {k: v + np.asarray(0.25 * rnd, v.dtype) for k, v in result.arrays.items()}
        produced.append(arrays)
        return result.after_step(arrays, {"step": "shift", "by": 0.25 * rnd})

    fedavg = BoundedAggregator(AggregationPolicy())
    plan = _plan(tmp_path, artifact, aggregation=RoundAggregation(fedavg, after=(shift,)))

    run_federation(FakeGrid(), plan)

    records = _aggregated(plan.out)
    assert [r["post"] for r in records] == [
        [{"step": "shift", "by": 0.25}],
        [{"step": "shift", "by": 0.5}],
    ]
    assert [r["rule"] for r in records] == ["fedavg", "fedavg"]
    final = load_checkpoint(plan.out).arrays
    assert set(final) == set(produced[-1])
    for key, value in produced[-1].items():
        np.testing.assert_array_equal(final[key], value)


def test_decoder_sees_every_usable_update_before_the_rule(tmp_path, artifact):
    decoded, combined = [], []

    def unmask(updates):
        """Where a secure-aggregation transport would remove the pairwise masks."""
        decoded.append(sorted(name for name, _, _ in updates))
        return updates

    def combine(current, updates):
        combined.append(sorted(name for name, _, _ in updates))
        return aggregation.aggregate_updates(current, updates, AggregationPolicy())

    plan = _plan(tmp_path, artifact, aggregation=RoundAggregation(combine, decode=unmask))

    run_federation(FakeGrid(), plan)

    assert len(decoded) == 2 and decoded == combined
    assert [sorted(r["participants"]) for r in _aggregated(plan.out)] == decoded
