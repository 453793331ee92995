"""DP-aware training settings (common.training_defaults): what a run uses when its operator
leaves batch size, local epochs, rounds and learning rate out, and the refusals of settings
that cannot meet the budget.

Attacks, as the parties the guarantee is for:

- a hostile institution that reports a batch size other than the public rule's for its own
  n (so its q and steps would not be what the round asked for) has its update rejected;
- the operator who sets a batch larger than an institution, or an ε no noise multiplier in
  the accountant's range can meet, gets a one-line refusal before any work: `ferry simulate`
  exits 2 and writes nothing (a deployed institution refuses such an ε before it reserves
  any spend: tests/test_attack_operator_config.py).

The old code had fixed defaults (batch 32, 1 local epoch, 5 rounds, the scenario's lr), no
rule and no feasibility check: every test here fails there (the names are imported inside the
tests, so this file runs against it and shows each assertion fail).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from ferry.common.config import RunConfig
from ferry.common.errors import FerryError


def test_rule_batch_grows_with_the_trained_part_stays_within_bounds_and_never_exceeds_n():
    from ferry.common.training_defaults import MAX_BATCH, MIN_BATCH, rule_batch_size

    for params in (1, 130, 260, 12_810, 10**7):
        sizes = [1, 5, 31, 32, 64, 100, 250, 1_000, 3_200, 40_000, 10**7]
        batches = [rule_batch_size(n, params) for n in sizes]
        assert batches == sorted(batches)  # monotone in n
        for n, b in zip(sizes, batches, strict=True):
            assert 1 <= b <= min(n, MAX_BATCH)
            assert b >= min(n, MIN_BATCH)
    by_size = [rule_batch_size(10**6, p) for p in (260, 12_810, 10**5)]
    assert by_size == sorted(by_size) and by_size[0] < by_size[-1]  # more values, more batch
    # the digits head on EfficientNet-Lite0 (1280 features, 10 classes): ~570 per step
    assert 512 < rule_batch_size(1_454, 12_810) < 600
    assert rule_batch_size(221, 12_810) == 221  # a small institution: its whole data (q = 1)
    with pytest.raises(ValueError):
        rule_batch_size(0, 10)


def test_given_settings_win_over_tuned_and_tuned_over_the_rule():
    from ferry.common.training_defaults import resolve_schedule, rule_schedule

    cfg = RunConfig(epsilon=3.0, rounds=9)
    tuned = {"batch_size": 200, "local_epochs": 2, "rounds": 4, "lr": 0.7}
    resolved, source = resolve_schedule(cfg, tuned)
    assert (resolved.rounds, resolved.batch_size, resolved.local_epochs, resolved.lr) == (
        9,
        200,
        2,
        0.7,
    )
    assert source == {
        "rounds": "given",
        "batch_size": "tuned",
        "local_epochs": "tuned",
        "lr": "tuned",
    }
    resolved, source = resolve_schedule(cfg)
    rule = rule_schedule(cfg)
    assert resolved.batch_size is None and source["batch_size"] == "rule"
    assert (resolved.local_epochs, resolved.lr) == (rule.local_epochs, rule.lr)


def test_the_rule_uses_no_private_data_only_epsilon_and_the_task():
    """The schedule is a function of the run config alone: two runs that differ only in their
    data get the same epochs, rounds and learning rate."""
    from ferry.common.training_defaults import rule_schedule

    a = rule_schedule(RunConfig(epsilon=3.0, data="/hospital-a.csv"))
    b = rule_schedule(RunConfig(epsilon=3.0, data="/hospital-b.csv", examples=17))
    assert a == b


@pytest.mark.slow
def test_a_report_with_another_batch_size_than_the_rule_gives_for_its_n_is_rejected(
    client,
):
    """A hostile institution samples with the batch size (so the q and steps) of its own
    choice, not the public rule's for its n, and signs an honest report of it."""
    from ferry.client import runtime
    from ferry.common.messages import MessageRejected
    from ferry.common.privacy.report import REPLY_BODY, REPLY_SIGNATURE
    from ferry.common.train_reply import ModelUpdate, PrivacyReply, TrainExpectation, TrainReply
    from ferry.common.training_defaults import batch_size_for, trainable_size

    client.run = dataclasses.replace(client.run, batch_size=None)
    head, asked = client.initial_head(), client.request(1)

    def reply_to(req):
        arrays, metrics, report = runtime.train_round(client.settings, req, head)
        signed = {k: report[k] for k in (REPLY_BODY, REPLY_SIGNATURE)}
        return TrainReply(ModelUpdate(arrays, metrics["num-examples"]), PrivacyReply.of(signed))

    honest = TrainReply.from_content(reply_to(asked).to_content(), TrainExpectation(asked, head))
    n, p = honest.privacy.report.examples, trainable_size(head)
    rule = batch_size_for(client.run, n, p)
    assert honest.privacy.report.batch_size == rule
    own_choice = dataclasses.replace(client.run, batch_size=rule - 7)
    hostile = reply_to(dataclasses.replace(asked, run=own_choice, round=2))
    with pytest.raises(MessageRejected, match="batch-size"):
        TrainReply.from_content(
            hostile.to_content(), TrainExpectation(dataclasses.replace(asked, round=2), head)
        )


def _simulate_refused(out, *options: str) -> int:
    """``ferry simulate`` on random weights with ``options``; its exit code."""
    from ferry.cli import main

    return main(
        ["simulate", "--weights", "random", "--examples", "400", *options, "--out", str(out)]
    )


def test_simulate_refuses_a_batch_larger_than_an_institution_before_any_work(tmp_path):
    out = tmp_path / "run"
    code = _simulate_refused(out, "--clients", "4", "--batch-size", "5000")
    assert code == 2
    assert not out.exists()


@pytest.mark.slow
def test_simulate_refuses_an_epsilon_beyond_the_accountants_range(tmp_path, capsys):
    out = tmp_path / "run"
    code = _simulate_refused(out, "--clients", "2", "--epsilon", "1e-7")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epsilon" in err[0] and "larger --epsilon" in err[0]
    assert not out.exists()


def test_feasibility_check_names_the_fix_for_each_problem():
    from ferry.common.training_defaults import check_feasible, resolve_schedule

    cfg, _ = resolve_schedule(RunConfig(epsilon=3.0, batch_size=300))
    with pytest.raises(FerryError, match=r"--batch-size 300 is larger .*\(120 training examples\)"):
        check_feasible(cfg, [120, 900], 130)
    check_feasible(dataclasses.replace(cfg, batch_size=None), [120, 900], 130)  # the rule fits
    tiny, _ = resolve_schedule(RunConfig(epsilon=1e-7))
    with pytest.raises(FerryError, match="larger --epsilon"):
        check_feasible(tiny, [120, 900], 130)


@pytest.mark.slow
def test_simulate_prints_and_records_the_settings_and_reports_carry_the_rule_batch(
    tmp_path, capsys, without_ray
):
    """End to end: the settings line is printed, the ledger's run_started record says each
    value and its source, and every signed report's batch size is the rule's for its n (the
    federation runs in this process: the point is the settings, not Ray)."""
    from ferry.cli import main
    from ferry.common.training_defaults import rule_batch_size, rule_schedule

    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--scenario",
            "hospital-tabular",
            "--weights",
            "random",
            "--clients",
            "2",
            "--examples",
            "600",
            "--rounds",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "training: batch per institution" in printed and "2 rounds (given)" in printed
    records = [json.loads(line) for line in (out / "ledger.jsonl").open()]
    started = next(r for r in records if r["event"] == "run_started")
    rule = rule_schedule(RunConfig(epsilon=3.0, task="classification"))
    assert started["training"]["source"] == {
        "batch_size": "rule",
        "local_epochs": "rule",
        "rounds": "given",
        "lr": "rule",
    }
    assert started["training"]["local_epochs"] == rule.local_epochs
    assert started["training"]["lr"] == rule.lr
    summary = json.loads(Path(out, "summary.json").read_text())
    p = summary["bytes"]["head_bytes"] // 4  # float32 head: p values
    trained = [r for r in records if r["event"] == "client_trained"]
    assert len(trained) == 4
    for r in trained:
        body = json.loads(r["signed_report"]["body"])
        assert body["batch_size"] == rule_batch_size(body["examples"], p)
        assert body["local_epochs"] == rule.local_epochs
        assert math.isclose(
            body["sample_rate"], 1 / math.ceil(body["examples"] / body["batch_size"])
        )
