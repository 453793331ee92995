"""``ferry simulate --baseline local``: each institution's accuracy alone at the same ε,
beside the federated model's, on the same held-out records."""

from __future__ import annotations

import json

import pytest

from ferry.cli import main

RUN = ["simulate", "--weights", "random", "--clients", "3", "--rounds", "2"]
RUN += ["--examples", "600", "--alpha", "0.3", "--epsilon", "4"]


@pytest.mark.slow
def test_each_institution_alone_beside_the_federated_model_on_its_held_out_split(
    tmp_path, without_ray, capsys
):
    out = tmp_path / "run"
    assert main([*RUN, "--baseline", "local", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    baseline = summary["baseline"]["institutions"]
    assert sorted(baseline) == sorted(summary["clients"]) and len(baseline) == 3
    for name, row in baseline.items():
        held = rounds[-1]["per_institution"][name]
        assert row["held_out_examples"] == held["eval_examples"]  # the same records
        assert row["federated"]["accuracy"] == held["accuracy"]
        assert 0.0 <= row["local"]["accuracy"] <= 1.0
        assert f"{row['local']['accuracy']:7.3f}" in printed
        assert row["federated"]["balanced_accuracy"] == held["balanced_accuracy"]
    assert "alone, same ε (accuracy / balanced)" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--baseline", "global"], "--baseline 'global' is unknown: use --baseline local"),
        (["--baseline", "local", "--trainable", "lora"], "trains each institution's linear head"),
    ],
)
def test_a_baseline_that_does_not_apply_is_one_line_exit_2_before_the_run(
    tmp_path, capsys, extra, words
):
    out = tmp_path / "run"
    assert main([*RUN, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
