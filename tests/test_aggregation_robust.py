"""Bounded influence and robust rules (server.aggregation), played as a hostile institution.

Nine honest institutions move the head the same way (plus a little noise); one hostile
institution claims 1e12 examples, scales its update by 1e30, or flips it and scales it by
1e3 while claiming 1e12. Under every rule the aggregate stays within a fraction of one
honest step of the honest institutions' own FedAvg; on main before bounded influence the
server's plain FedAvg (what rounds.py called; ``reference_fedavg.fedavg`` here) let the hostile
institution set the head.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ferry.common import config as run_config
from ferry.common import evaluation_statistics
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.evaluation_statistics import (
    classification_statistics,
    pool_statistics,
    regression_statistics,
    statistics_from_record,
)
from ferry.common.metrics import metrics_from_statistics
from ferry.server import aggregation

from reference_fedavg import fedavg

HONEST = 9
SHAPES = {"head.weight": (5, 10), "head.bias": (5,)}
RULES = ["default", "fedavg", "trimmed-mean", "median", "krum"]


def _current() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _step() -> dict[str, np.ndarray]:
    """The honest direction, norm 1 over all arrays."""
    rng = np.random.default_rng(1)
    step = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    norm = math.sqrt(sum(float(np.sum(v**2)) for v in step.values()))
    return {k: v / norm for k, v in step.items()}


def _honest() -> list[tuple[str, dict[str, np.ndarray], float]]:
    current, step, rng = _current(), _step(), np.random.default_rng(2)
    return [
        (
            f"hospital-{i}",
            {
                k: (current[k] + step[k] + 0.01 * rng.normal(size=step[k].shape)).astype(np.float32)
                for k in SHAPES
            },
            float(rng.integers(80, 121)),
        )
        for i in range(HONEST)
    ]


def _hostile(scale: float, count: float) -> tuple[str, dict[str, np.ndarray], float]:
    current, step = _current(), _step()
    return (
        "mallory",
        {k: (current[k] + scale * step[k]).astype(np.float32) for k in SHAPES},
        count,
    )


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(
        sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in a)
    )


def _server_aggregate(current, updates, rule: str) -> dict[str, np.ndarray]:
    """What the server makes of a round: the bounded aggregation with the run's policy (the
    default, or ``rule`` with the default bounds). Before it existed, rounds.py called the
    plain FedAvg of the claimed counts; this runs the attack against that server too."""
    if not hasattr(aggregation, "aggregate_updates"):
        if rule not in ("default", "fedavg"):
            pytest.fail(f"the server has no {rule} rule")
        return fedavg([(arrays, count) for _, arrays, count in updates])
    policy = (
        aggregation.AggregationPolicy()
        if rule == "default"
        else aggregation.AggregationPolicy(rule=rule)
    )
    return aggregation.aggregate_updates(current, updates, policy).arrays


ATTACKS = {
    "claims 1e12 examples": (-1.0, 1e12),  # an honest-sized step the wrong way, inflated count
    "update scaled by 1e30": (1e30, 100.0),
    "sign-flipped x1e3, claims 1e12": (-1e3, 1e12),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("rule", RULES)
def test_one_hostile_institution_cannot_move_the_aggregate_beyond_a_bounded_step(rule, attack):
    current, honest = _current(), _honest()
    reference = fedavg([(arrays, count) for _, arrays, count in honest])
    scale, count = ATTACKS[attack]

    result = _server_aggregate(current, [*honest, _hostile(scale, count)], rule)

    assert all(np.isfinite(v).all() for v in result.values())
    # One honest step has norm 1; the hostile institution may move the aggregate by a
    # bounded fraction of it, never take it over (on the old server: 2, 1e29, 1e3). Bounded
    # FedAvg's worst case here: a 2/11 share x (its bound 2 + the honest step 1) = 0.55.
    assert _distance(result, reference) < 0.6, f"{rule} under '{attack}'"
    # ...and the model still moves the honest way.
    step = _step()
    progress = sum(float(np.sum((result[k] - current[k]) * step[k])) for k in SHAPES)
    assert progress > 0.4


def test_bounded_fedavg_limits_the_hostile_share_to_the_cap_and_its_change_to_the_bound():
    current, honest = _current(), _honest()
    hostile = _hostile(-1e3, 1e12)
    result = aggregation.aggregate_updates(
        current, [*honest, hostile], aggregation.AggregationPolicy()
    )
    counts = [c for _, _, c in honest]
    cap = 2.0 * sorted([*counts, 1e12])[4]  # the lower median of 10 claims: an honest one
    assert result.weights["mallory"] == pytest.approx(cap / (sum(counts) + cap))
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert list(result.clipped) == ["mallory"]
    assert result.clipped["mallory"] == pytest.approx(1e3, rel=1e-5)
    # The bound is twice the median change norm of the round (an honest one, about 1).
    assert 1.9 < result.norm_bound < 2.1
    # Worst case of the bound: the hostile share times (bound + the honest step).
    reference = fedavg([(a, c) for _, a, c in honest])
    worst = result.weights["mallory"] * (result.norm_bound + 1.1)
    assert _distance(result.arrays, reference) <= worst


def test_fedavg_without_capped_or_clipped_updates_is_exactly_fedavg():
    current, honest = _current(), _honest()
    result = aggregation.aggregate_updates(current, honest, aggregation.AggregationPolicy())
    assert result.clipped == {}
    total = sum(c for _, _, c in honest)
    assert result.weights == {name: pytest.approx(c / total) for name, _, c in honest}
    for k in SHAPES:
        want = sum(a[k].astype(np.float64) * c for _, a, c in honest) / total
        np.testing.assert_allclose(result.arrays[k], want, rtol=1e-6, atol=1e-6)
        assert result.arrays[k].dtype == current[k].dtype


def test_a_fixed_bound_clips_every_change_beyond_it_and_records_each_norm():
    current, honest = _current(), _honest()
    policy = aggregation.AggregationPolicy(max_update_norm=0.5)
    result = aggregation.aggregate_updates(current, honest, policy)
    assert result.norm_bound == 0.5
    assert set(result.clipped) == {name for name, _, _ in honest}
    assert all(0.95 < n < 1.05 for n in result.clipped.values())
    assert _distance(result.arrays, current) <= 0.5 + 1e-5


def test_median_trimmed_mean_and_krum_are_the_papers_rules_on_the_clipped_changes():
    current, honest = _current(), _honest()
    updates = [*honest, _hostile(-1.5, 1e12)]  # within the bound: nothing clipped
    changes = np.stack(
        [
            np.concatenate([(a[k].astype(np.float64) - current[k]).ravel() for k in SHAPES])
            for _, a, _ in updates
        ]
    )
    flat = {}
    for rule in ("median", "trimmed-mean", "krum"):
        r = aggregation.aggregate_updates(
            current, updates, aggregation.AggregationPolicy(rule=rule)
        )
        assert r.clipped == {}
        flat[rule] = np.concatenate(
            [(r.arrays[k].astype(np.float64) - current[k]).ravel() for k in SHAPES]
        )
        if rule == "krum":
            assert r.weights["mallory"] == 0.0 and sum(r.weights.values()) == 1.0
            chosen = next(i for i, (n, _, _) in enumerate(updates) if r.weights[n] == 1.0)
            np.testing.assert_allclose(flat[rule], changes[chosen], atol=1e-6)
    np.testing.assert_allclose(flat["median"], np.median(changes, axis=0), atol=1e-6)
    trimmed = np.sort(changes, axis=0)[1:-1].mean(axis=0)  # one cut at each end
    np.testing.assert_allclose(flat["trimmed-mean"], trimmed, atol=1e-6)


@pytest.mark.parametrize("rule, needed", [("median", 3), ("trimmed-mean", 3), ("krum", 5)])
def test_a_round_with_too_few_updates_for_the_rule_aggregates_nothing(rule, needed):
    current, honest = _current(), _honest()
    policy = aggregation.AggregationPolicy(rule=rule)
    assert policy.updates_needed == needed
    with pytest.raises(aggregation.TooFewUpdates, match=f"at least {needed} updates"):
        aggregation.aggregate_updates(current, honest[: needed - 1], policy)
    assert aggregation.aggregate_updates(current, honest[:needed], policy).arrays


def test_ledger_fields_name_the_rule_bound_weights_and_every_clipped_update():
    current, honest = _current(), _honest()
    result = aggregation.aggregate_updates(
        current, [*honest, _hostile(1e30, 100.0)], aggregation.AggregationPolicy()
    )
    fields = json.loads(json.dumps(result.ledger_fields(), allow_nan=False))
    assert fields["rule"] == "fedavg"
    assert fields["weight_cap"] == 2.0
    assert fields["norm_bound"] == pytest.approx(result.norm_bound)
    assert set(fields["weights"]) == {n for n, _, _ in honest} | {"mallory"}
    assert list(fields["clipped"]) == ["mallory"]
    assert fields["clipped"]["mallory"]["norm"] == pytest.approx(1e30, rel=1e-5)
    unbounded = aggregation.AggregationPolicy(weight_cap=math.inf, max_update_norm=math.inf)
    plain = aggregation.aggregate_updates(current, honest, unbounded).ledger_fields()
    assert plain["norm_bound"] is None and plain["weight_cap"] is None


def test_capped_weights_cap_at_the_multiple_of_the_median_claim():
    assert aggregation.capped_weights({"a": 100, "b": 120, "c": 1e12}, 2.0) == {
        "a": 100.0,
        "b": 120.0,
        "c": 240.0,
    }
    assert aggregation.capped_weights({}, 2.0) == {}
    # Of two institutions, one inflating: the lower median is the honest claim.
    assert aggregation.capped_weights({"a": 100, "c": 1e12}, 2.0) == {"a": 100.0, "c": 200.0}


def test_of_two_institutions_one_scaled_update_is_clipped_to_twice_the_honest_one():
    current, honest = _current(), _honest()
    result = aggregation.aggregate_updates(
        current, [honest[0], _hostile(1e30, 1e12)], aggregation.AggregationPolicy()
    )
    assert list(result.clipped) == ["mallory"]
    assert result.weights["mallory"] == pytest.approx(2 / 3, rel=0.05)
    assert _distance(result.arrays, current) < 2.0


def test_every_configurable_rule_is_registered():
    assert set(aggregation._RULES) == set(run_config.AGGREGATION_RULES) == set(RULES[1:])


# --- evaluation counts are bounded the same way --------------------------------------------


def _eval_stats(seed: int, n: int, correct: float):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    scores = rng.normal(size=(n, 3))
    right = rng.random(n) < correct
    scores[right, y[right]] += 10.0
    return classification_statistics(y, scores, 3)


def test_a_billion_perfect_evaluation_examples_do_not_set_the_federated_accuracy():
    honest = {f"h{i}": _eval_stats(i, 200, 0.5) for i in range(HONEST)}
    third = 10**9 // 3
    liar = statistics_from_record(
        {"num-examples": 10**9, "confusion": [third, 0, 0, 0, third, 0, 0, 0, 10**9 - 2 * third]},
        "classification",
        3,
    )
    honest_accuracy = metrics_from_statistics(pool_statistics(list(honest.values())))["accuracy"]

    capped = aggregation.capped_statistics({**honest, "mallory": liar}, 2.0)

    pooled = metrics_from_statistics(pool_statistics(list(capped.values())))["accuracy"]
    # Weights in the proportion of the capped counts (200 each, mallory 400); counts are
    # scaled up to reach it, never down, so nobody's statistics are rounded away.
    assert all(capped[k].num_examples == capped["h0"].num_examples for k in honest)
    assert capped["mallory"].num_examples == 2 * capped["h0"].num_examples
    assert metrics_from_statistics(capped["mallory"])["accuracy"] == 1.0
    for k in honest:  # honest ones keep their metrics
        mine = metrics_from_statistics(honest[k])
        assert metrics_from_statistics(capped[k]) == pytest.approx(mine)
    # One institution at twice a typical weight: at most 2/11 of the pool (was 1.000).
    assert pooled <= honest_accuracy + 2 / 11 * (1 - honest_accuracy) + 1e-9
    assert pooled < 0.75


@pytest.mark.parametrize("factor", [0.0, 0.013, 0.5, 0.77, 1.0, 2.5])
def test_scaled_statistics_are_valid_releases_with_the_same_metrics(factor):
    stats = _eval_stats(7, 301, 0.6)
    scaled = evaluation_statistics.scale_statistics(stats, factor)
    assert scaled.num_examples == round(301 * factor)
    # Still a record the server accepts (integer counts that add up).
    again = statistics_from_record(scaled.to_record(), "classification", 3)
    assert again.num_examples == scaled.num_examples
    if scaled.num_examples:
        before, after = metrics_from_statistics(stats), metrics_from_statistics(scaled)
        assert after["loss"] == pytest.approx(before["loss"])
        assert abs(after["accuracy"] - before["accuracy"]) <= 9 / scaled.num_examples
    rng = np.random.default_rng(3)
    y = rng.normal(size=200)
    reg = regression_statistics(y, y + rng.normal(size=200), directional=True)
    scaled_reg = evaluation_statistics.scale_statistics(reg, factor)
    again = statistics_from_record(scaled_reg.to_record(), "regression", 0)
    if again.num_examples:
        before, after = metrics_from_statistics(reg), metrics_from_statistics(again)
        for name in ("rmse", "mae", "r2"):
            assert after[name] == pytest.approx(before[name])


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, names",
    [
        ({"aggregation": "mean"}, "--aggregation 'mean'"),
        ({"weight_cap": 0.5}, "--weight-cap 0.5"),
        ({"weight_cap": math.inf}, "--weight-cap inf"),
        ({"weight_cap": math.nan}, "--weight-cap nan"),
        ({"max_update_norm": -1.0}, "--max-update-norm -1.0"),
        ({"max_update_norm": math.inf}, "--max-update-norm inf"),
        ({"aggregation": "krum", "min_clients": 4}, "--min-clients 4"),
        ({"aggregation": "median", "min_clients": 1}, "--min-clients 1"),
    ],
)
def test_bad_aggregation_settings_are_refused_naming_the_field(settings, names):
    with pytest.raises(FerryError, match="^" + names.replace("(", ".").replace(")", ".")):
        RunConfig(**settings).validate()


def test_the_policy_comes_from_the_config_and_the_run_record_carries_it():
    cfg = RunConfig(
        aggregation="krum", min_clients=5, weight_cap=3.0, max_update_norm=0.25
    ).validate()
    policy = aggregation.AggregationPolicy.from_config(cfg)
    assert (policy.rule, policy.weight_cap, policy.max_update_norm) == ("krum", 3.0, 0.25)
    record = RunConfig.from_mapping(cfg.to_record()).to_record()
    assert record["aggregation"] == "krum" and record["weight-cap"] == 3.0
    assert record["max-update-norm"] == 0.25
    assert aggregation.AggregationPolicy.from_config(RunConfig()) == aggregation.AggregationPolicy()


def test_a_deployment_run_config_takes_the_aggregation_settings_and_refuses_bad_ones(tmp_path):
    from ferry.server.deployment import check_deployment

    run = {"mode": "deployment", "num-classes": 4, "out": str(tmp_path / "run"), "clients": 5}
    settings = check_deployment({**run, "aggregation": "krum", "min-clients": 5, "weight-cap": 3.0})
    assert aggregation.AggregationPolicy.from_config(settings.cfg) == aggregation.AggregationPolicy(
        rule="krum", weight_cap=3.0
    )
    with pytest.raises(FerryError, match="^--aggregation 'mean' is invalid"):
        check_deployment({**run, "aggregation": "mean"})
    with pytest.raises(FerryError, match="^--min-clients 1 is invalid: median needs"):
        check_deployment({**run, "aggregation": "median"})
