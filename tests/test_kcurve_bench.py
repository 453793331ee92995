"""The K-curve benchmark at its --quick size: every row it promises is there, every figure is
a real measurement on the shared held-out records, the best of the grid is what the search
confirmed, and the feature cache never serves features of other data. Figures themselves are
not asserted (they live in BENCHMARKS.md); only facts that hold at any size are."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ferry.simulations.bench import kcurve_bench, kcurve_plan, kcurve_tables
from ferry.simulations.bench.report import replace_section

QUICK = kcurve_bench.QUICK


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("kcurve")
    return kcurve_bench.run(QUICK, work, log=lambda *_: None, jobs=2)  # one process each


def _rows(results, name):
    return results["datasets"][name]["rows"]


def test_an_institution_alone_trains_on_its_own_records_and_is_scored_on_everyones():
    # Scored on its own held-out records (a label-skewed slice that looks like its training
    # data), an institution alone would look better than it is against the federation.
    splits = [
        (np.array([0, 1, 2]), np.array([3])),
        (np.array([4, 5]), np.array([6, 7])),
        (np.array([8]), np.array([9])),
    ]
    for i, (train, _) in enumerate(splits):
        [(own, scored)] = kcurve_bench.alone(splits, i)
        assert own.tolist() == train.tolist()
        assert scored.tolist() == [3, 6, 7, 9]


def test_default_settings_are_the_rules_schedule_for_the_datas_run_and_privacy():
    import torch

    from ferry.common.config import RunConfig
    from ferry.common.training_defaults import rule_schedule
    from ferry.simulations.linear_federation import FeatureSet

    data = RunConfig(scenario="hospital-imaging", task="classification")
    features = FeatureSet(torch.zeros(4, 3), torch.zeros(4).long(), "classification", 2, data, (3,))
    for eps in (1.0, 8.0, None):
        run = RunConfig(
            scenario="hospital-imaging",
            task="classification",
            epsilon=eps or 3.0,
            non_private=eps is None,
        )
        rule, got = rule_schedule(run), kcurve_bench.default_settings(features, eps)
        assert (got.local_epochs, got.rounds, got.lr) == (rule.local_epochs, rule.rounds, rule.lr)


@pytest.mark.parametrize(
    "argv",
    [
        ["--datasets", "mnist"],
        ["--datasets", ","],
        ["--repeats", "0"],
        ["--epsilons", "0"],
        ["--jobs", "0"],
    ],
)
def test_bad_options_are_refused_before_any_work(argv, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        kcurve_bench.main([*argv, "--quick", "--work", str(tmp_path)])
    assert exit_.value.code == 2
    assert not any(tmp_path.iterdir())  # nothing was written, built or trained


@pytest.mark.slow
def test_every_dataset_has_central_federated_alone_and_non_private_rows(quick):
    assert set(quick["datasets"]) == set(QUICK.datasets)
    for name in QUICK.datasets:
        got = [(r["row"], r["institutions"], r["epsilon"]) for r in _rows(quick, name)]
        want = []
        for eps in QUICK.epsilons:
            want += [("central", 1, eps)]
            want += [("federated", k, eps) for k in sorted({*QUICK.federated, *QUICK.tuned} - {1})]
            want += [("alone", QUICK.alone, eps)]
        want += [("non-private", k, None) for k in sorted({1, *QUICK.tuned})]
        assert got == want
        for row in _rows(quick, name):
            searched = row["epsilon"] is not None and row["institutions"] in QUICK.tuned
            assert ("grid" in row) == (searched and row["row"] != "alone")
            assert len(row["train_examples"]) == (
                1 if row["row"] == "central" else row["institutions"]
            )


@pytest.mark.slow
def test_every_figure_is_a_fraction_and_binary_tasks_report_balanced_accuracy_and_auc(quick):
    for name, d in quick["datasets"].items():
        for row in d["rows"]:
            figures = [row["defaults"], *row.get("each", [])]
            if "grid" in row:
                figures += [row["grid"]["metrics"], *(m for _, m in row["grid"]["screened"])]
            for m in figures:
                keys = {"accuracy", "balanced_accuracy"} | (
                    {"roc_auc"} if d["classes"] == 2 else set()
                )
                assert set(m) == keys, (name, row["row"])
                assert all(0 <= v <= 1 for v in m.values()), (name, row["row"], m)
    assert quick["datasets"]["breast-cancer"]["classes"] == 2


@pytest.mark.slow
def test_one_institution_holding_all_hospital_imaging_beats_chance_by_ten_points(quick):
    central = next(r for r in _rows(quick, "hospital-imaging") if r["row"] == "central")
    chance = 1 / quick["datasets"]["hospital-imaging"]["classes"]
    assert central["defaults"]["accuracy"] > chance + 0.10
    assert central["grid"]["metrics"]["accuracy"] > chance + 0.10


@pytest.mark.slow
def test_best_of_grid_is_the_best_confirmed_mean_among_the_top_screened_points(quick):
    for d in quick["datasets"].values():
        for row in (r for r in d["rows"] if "grid" in r):
            g = row["grid"]
            confirmed = dict((label, m["accuracy"]) for label, m in g["confirmed"])
            assert g["best"] in confirmed and len(confirmed) == min(QUICK.top, len(g["screened"]))
            assert all(g["metrics"]["accuracy"] >= acc for acc in confirmed.values())
            ranked = sorted(g["screened"], key=lambda lm: -lm[1]["accuracy"])
            cutoff = ranked[len(confirmed) - 1][1]["accuracy"]
            for label, m in g["screened"]:  # nothing screened better was left unconfirmed
                assert label in confirmed or m["accuracy"] <= cutoff
            gap = 100 * (row["defaults"]["accuracy"] - g["metrics"]["accuracy"])
            assert math.isclose(row["gap_points"], gap)
            assert row["within"] == (gap >= -kcurve_bench.WITHIN_POINTS)


@pytest.mark.slow
def test_alone_row_is_the_five_federated_institutions_each_scored_on_the_pooled_held_out(quick):
    for name in QUICK.datasets:
        rows = _rows(quick, name)
        for eps in QUICK.epsilons:
            lone = next(r for r in rows if r["row"] == "alone" and r["epsilon"] == eps)
            fed = next(
                r
                for r in rows
                if r["row"] == "federated"
                and r["institutions"] == QUICK.alone
                and r["epsilon"] == eps
            )
            assert lone["train_examples"] == fed["train_examples"]
            assert len(lone["each"]) == QUICK.alone
            mean = {k: np.mean([m[k] for m in lone["each"]]) for k in lone["defaults"]}
            assert mean == pytest.approx(lone["defaults"])
            # Every accuracy is a count out of the same pooled held-out records.
            held = quick["datasets"][name]["held_out"]
            for m in lone["each"]:
                count = m["accuracy"] * held * QUICK.repeats
                assert math.isclose(count, round(count), abs_tol=1e-6)


@pytest.mark.slow
def test_feature_cache_is_reused_for_the_same_data_and_never_for_other_data(quick, monkeypatch):
    from pathlib import Path

    def no_extraction(*_a, **_k):
        raise AssertionError("features extracted again")

    monkeypatch.setattr(kcurve_plan, "extract_features", no_extraction)
    work = Path(quick["work"])
    features, _ = kcurve_bench.load_features("hospital-imaging", QUICK, work, lambda *_: None)
    assert len(features.y) == quick["datasets"]["hospital-imaging"]["records"]
    fed = next(
        r
        for r in _rows(quick, "hospital-imaging")
        if r["row"] == "federated" and r["institutions"] == 5
    )
    assert [len(t) for t, _ in features.splits(5)] == fed["train_examples"]
    other = dataclasses.replace(QUICK, synthetic_examples=QUICK.synthetic_examples + 100)
    with pytest.raises(AssertionError, match="extracted again"):
        kcurve_bench.load_features("hospital-imaging", other, work, lambda *_: None)


@pytest.mark.slow
def test_report_states_the_grid_the_command_and_one_reading_per_dataset(quick, tmp_path):
    table = kcurve_bench.render(quick, "python -m simulations.bench.kcurve_bench --quick")
    assert "`python -m simulations.bench.kcurve_bench --quick`" in table
    assert "expected batch {512}" in table and "learning rate {0.5, 2}" in table
    for name, d in quick["datasets"].items():
        assert f"### {name}" in table
        reading = kcurve_tables.interpret(name, d)
        assert reading in table
        central = next(r for r in d["rows"] if r["row"] == "central")
        assert f"{100 * central['defaults']['accuracy']:.1f}%" in reading
        assert table.count("\n| ") >= len(d["rows"])
    searched = sum("grid" in r for d in quick["datasets"].values() for r in d["rows"])
    assert f"of {searched} cells" in table
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Ferry benchmarks\n\n## Other\n\nkept\n")
    replace_section(markdown, kcurve_bench.HEADING, table)
    replace_section(markdown, kcurve_bench.HEADING, table)  # a rerun replaces, not appends
    text = markdown.read_text()
    assert "kept" in text and text.count(kcurve_bench.HEADING) == 1
    assert text.count("### hospital-imaging") == 1
