"""``ferry simulate --log-to tensorboard:DIR``: every round's metrics and ε as TensorBoard
scalars, the same values as ``metrics.jsonl``; a bad ``--log-to`` is one line, before the run."""

from __future__ import annotations

import json

import pytest

from ferry.cli import main

RUN = ["simulate", "--weights", "random", "--clients", "2", "--rounds", "2"]
RUN += ["--examples", "300"]


@pytest.mark.slow
def test_tensorboard_gets_every_rounds_metrics_and_epsilon(tmp_path, without_ray):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, board = tmp_path / "run", tmp_path / "board"
    assert main([*RUN, "--log-to", f"tensorboard:{board}", "--out", str(out)]) == 0
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(board))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag, key in (("federated/accuracy", "accuracy"), ("privacy/max_epsilon", "max_epsilon")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in rounds], tag
    name = sorted(rounds[-1]["per_institution"])[0]
    assert f"institution/{name}/accuracy" in tags


@pytest.mark.parametrize(
    ("spec", "words"),
    [("mlflow:runs", "--log-to 'mlflow:runs' is unknown"), ("tensorboard:", "is unknown")],
)
def test_a_bad_log_to_is_one_line_exit_2_before_the_run(tmp_path, capsys, spec, words):
    out = tmp_path / "run"
    assert main([*RUN, "--log-to", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
