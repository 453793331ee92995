"""The poisoning benchmark at its quick size: every arm runs real virtual institutions, the
hostile one's lies reach the rule, and the figures say what each rule did with them."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.simulations.bench import poison_bench


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("poison")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(work / "ferry-home"))
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        return poison_bench.run(poison_bench.QUICK, work, log=lambda _: None)


@pytest.mark.slow
def test_poison_bench_runs_every_arm_and_only_the_unbounded_one_is_taken_over(results):
    runs = {(r["label"], r["hostile"]): r for r in results["arms"]}
    labels = ["fedavg-unbounded", "fedavg", "trimmed-mean", "median", "krum"]
    assert list(runs) == [(label, hostile) for label in labels for hostile in (False, True)]
    arms = {label: runs[label, True] for label in labels}
    honest_step = max(h["step_norm"] for h in runs["fedavg", False]["history"])
    # Unbounded FedAvg: the 1e12 claim makes the hostile change (x-1e3) the model's.
    unbounded = arms["fedavg-unbounded"]
    assert unbounded["history"][0]["hostile_weight"] > 0.999
    assert min(h["step_norm"] for h in unbounded["history"]) > 100 * honest_step
    assert unbounded["reported_accuracy"] > 0.999  # its 1e9 perfect examples decide
    hostile = f"hospital-{poison_bench.QUICK.institutions - 1:03d}"
    for rule in ("fedavg", "trimmed-mean", "median", "krum"):
        for h in arms[rule]["history"]:
            # Every bounded round: the hostile change clipped, the step within the bound.
            assert hostile in h["clipped"], (rule, h)
            assert h["step_norm"] <= h["norm_bound"] * (1 + 1e-6), (rule, h)
        assert arms[rule]["reported_accuracy"] < 0.9, rule
    assert all(h["hostile_weight"] == 0.0 for h in arms["krum"]["history"])
    # Bounded FedAvg: the hostile institution weighs 2 x the median institution, no more.
    for h in arms["fedavg"]["history"]:
        assert h["hostile_weight"] == pytest.approx(2 * np.median(list(h["weights"].values())))
    assert set(results["large_aggregation_ms"]) == {*poison_bench.RULES, "fedavg-unbounded"}


@pytest.mark.slow
def test_poison_bench_table_has_a_row_per_rule_and_the_ratio_to_bounded_fedavg(results):
    table = poison_bench.render(results, "python -m simulations.bench.poison_bench --quick")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 5
    fedavg = next(r for r in rows if r.startswith("| fedavg (default"))
    assert "(1.00x)" in fedavg
