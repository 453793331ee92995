"""The message codecs (common.messages, common.train_reply): what a sender builds parses back
unchanged, and each way a message can be wrong is one MessageRejected naming it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ferry.client import runtime
from ferry.client.budget_guard import BudgetExceeded
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.evaluation_statistics import classification_statistics, regression_statistics
from ferry.common.messages import (
    MAX_EXAMPLES,
    MAX_REASON,
    EvaluationReply,
    MessageRejected,
    Refusal,
    RoundRequest,
    TrainRequest,
)
from ferry.common.privacy.report import REPLY_BODY, REPLY_SIGNATURE
from ferry.common.train_reply import (
    ModelUpdate,
    PrivacyReply,
    TrainExpectation,
    TrainReply,
    _check_report,
)
from ferry.common.training_defaults import round_plan

REQUEST = RoundRequest(RunConfig(noise_multiplier=1.5), 3, "ab" * 32, 4, "run-a")
HEAD = {"weight": np.ones((4, 8), np.float32), "bias": np.zeros(4, np.float32)}


def test_message_rejected_is_a_value_error_and_an_institutions_refusal():
    assert issubclass(MessageRejected, ValueError) and issubclass(MessageRejected, FerryError)


def test_train_request_round_trips():
    request = dataclasses.replace(REQUEST, state_root="/s", cache_root="/c")
    back = TrainRequest.from_content(TrainRequest(request, HEAD).to_content())
    assert back.request == request
    assert {k: v.tolist() for k, v in back.arrays.items()} == {
        k: v.tolist() for k, v in HEAD.items()
    }


@pytest.mark.parametrize(
    "change",
    [
        {"round": -1},
        {"round": 2.5},
        {"num-classes": "four"},
        {"num-classes": True},
        {"run-id": "x" * 10_000},
        {"max-grad-norm": float("nan")},
        {"backbone-sha256": 7},
        {f"key-{i}": i for i in range(300)},
    ],
)
def test_hostile_request_values_are_rejected_before_anything_runs(change):
    record = {**REQUEST.to_record(), **change}
    with pytest.raises(MessageRejected, match="malformed|invalid|keys"):
        RoundRequest.from_record(record)


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"w": np.array([1, 2], np.int64)}, "not a float array"),
        ({"w": np.array([1.0, np.inf], np.float32)}, "non-finite"),
        ({"w": np.zeros((1,) * 9, np.float32)}, "not a float array"),
    ],
)
def test_request_arrays_must_be_finite_floats(arrays, problem):
    with pytest.raises(MessageRejected, match=problem):
        TrainRequest.from_content(TrainRequest(REQUEST, arrays).to_content())


def test_refusal_round_trips_and_clips_what_it_sends():
    assert Refusal.from_content(Refusal("budget spent", "budget").to_content()).kind == "budget"
    sent = Refusal.of(BudgetExceeded("x" * 10_000_000))
    assert sent.kind == "budget" and len(sent.reason) <= MAX_REASON
    assert Refusal.from_content(sent.to_content()) == sent


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"kind": "error"}, "reason"),
        ({"reason": "x" * 10_000_000}, "10,000,000 characters"),
        ({"reason": "stop", "kind": "shutdown"}, "kind"),
        ({"reason": 5}, "not a string"),
        ({"reason": "r", "extra": "x"}, "unknown keys"),
    ],
)
def test_unreadable_refusals_are_rejected(values, problem):
    with pytest.raises(MessageRejected, match=problem):
        Refusal.from_content(RecordDict({"refusal": ConfigRecord(values)}))


def test_evaluation_reply_round_trips_both_tasks():
    rng = np.random.default_rng(0)
    stats = classification_statistics(rng.integers(0, 4, 50), rng.normal(size=(50, 4)), 4)
    back = EvaluationReply.from_content(EvaluationReply(stats).to_content(), "classification", 4)
    assert back.statistics.to_record() == stats.to_record()
    reg = regression_statistics(rng.normal(size=20), rng.normal(size=20), directional=True)
    back = EvaluationReply.from_content(EvaluationReply(reg).to_content(), "regression", 0)
    assert back.statistics == reg


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"num-examples": [1, 2], "confusion": [1, 0, 0, 1]}, "not an integer count"),
        ({"num-examples": 2}, "confusion"),
        ({"num-examples": 0, "confusion": [-1, 1, 0, 0]}, "outside"),
        ({"num-examples": MAX_EXAMPLES + 1, "confusion": [MAX_EXAMPLES + 1, 0, 0, 0]}, "outside"),
        ({"num-examples": 2, "confusion": [1, 0, 0, 1], "accuracy": 1.0}, "unknown keys"),
        ({"num-examples": 3, "confusion": [1, 0, 0, 1]}, "add up"),
    ],
)
def test_hostile_evaluation_replies_are_rejected(values, problem):
    with pytest.raises(MessageRejected, match=problem):
        EvaluationReply.from_content(
            RecordDict({"metrics": MetricRecord(values)}), "classification", 2
        )


# ------------------------------------------------------------------------- train reply


@pytest.fixture
def trained(client):
    """An honest institution's round 1: (the reply it builds, what the server expects)."""
    head = client.initial_head()
    req = client.request(1)
    arrays, metrics, report = runtime.train_round(client.settings, req, head)
    signed = {k: report[k] for k in (REPLY_BODY, REPLY_SIGNATURE)}
    reply = TrainReply(ModelUpdate(arrays, metrics["num-examples"]), PrivacyReply.of(signed))
    return reply, TrainExpectation(req, head, "hospital-000")


def test_honest_train_reply_parses_to_what_was_sent(trained):
    reply, expected = trained
    back = TrainReply.from_content(reply.to_content(), expected)
    assert back.privacy == reply.privacy
    assert back.update.num_examples == reply.update.num_examples == back.privacy.report.examples
    for key, value in reply.update.arrays.items():
        np.testing.assert_array_equal(back.update.arrays[key], value)


def test_a_non_private_round_which_counts_no_round_parses(client):
    """A non-private round spends nothing, so the institution's state counts no round: its
    report says 0 rounds, and the codec must take it (the breast-cancer experiment's
    non-private arm was rejected for it)."""
    client.run = dataclasses.replace(client.run, non_private=True, noise_multiplier=0.0)
    head, req = client.initial_head(), client.request(1)
    arrays, metrics, report = runtime.train_round(client.settings, req, head)
    signed = {k: report[k] for k in (REPLY_BODY, REPLY_SIGNATURE)}
    reply = TrainReply(ModelUpdate(arrays, metrics["num-examples"]), PrivacyReply.of(signed))

    back = TrainReply.from_content(reply.to_content(), TrainExpectation(req, head))
    assert back.privacy.report.non_private and back.privacy.report.client_rounds == 0


def test_report_naming_another_institution_than_the_node_is_rejected(trained):
    reply, expected = trained
    elsewhere = dataclasses.replace(expected, institution="hospital-b")
    with pytest.raises(MessageRejected, match="'hospital-000'.*registered as 'hospital-b'"):
        TrainReply.from_content(reply.to_content(), elsewhere)


def _lying(reply: TrainReply, **fields) -> RecordDict:
    content = reply.to_content()
    body = json.loads(content["privacy"][REPLY_BODY])
    body.update(fields)
    content["privacy"][REPLY_BODY] = json.dumps(body, sort_keys=True)
    return content


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"round": 2}, "round"),
        ({"run_id": "run-b"}, "run-id"),
        ({"noise_multiplier": 0.1}, "dp_event"),  # sigma is derived here: the event disagrees
        ({"sample_rate": 1.0}, "sample-rate"),
        ({"steps": 10**9}, "steps"),
        ({"delta": 0.5}, "delta"),
        ({"max_grad_norm": 100.0}, "max-grad-norm"),
        ({"batch_size": 1}, "batch-size"),
        ({"epsilon": None}, "epsilon"),
        ({"epsilon": "lots"}, "epsilon"),
        ({"accountant": "none"}, "accountant"),
        ({"examples": 10**12}, "examples"),
        ({"extra": {"budget-left-for-another-round": "no"}}, "flags"),
        ({"dp_event": {"class_name": "NonPrivateDpEvent"}}, "dp_event"),
        ({"non_private": True}, "non-private"),
    ],
)
def test_lies_in_the_privacy_report_are_rejected(trained, fields, problem):
    reply, expected = trained
    with pytest.raises(MessageRejected, match=problem):
        TrainReply.from_content(_lying(reply, **fields), expected)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda c: c["metrics"].__setitem__("num-examples", 7), "not the report's"),
        (lambda c: c["metrics"].__setitem__("num-examples", 1e12), "integer count"),
        (lambda c: c["metrics"].__setitem__("train-loss", [0.1]), "unknown keys"),
        (lambda c: c["privacy"].__setitem__("epsilon", 0.0), "unknown keys"),
        (lambda c: c.__setitem__("trainable", ArrayRecord({})), "array keys"),
        (
            lambda c: c["trainable"].__setitem__("weight", Array(np.zeros((4, 9), np.float32))),
            "expected",
        ),
        (
            lambda c: c["trainable"].__setitem__("bias", Array(np.full(4, np.nan, np.float32))),
            "non-finite",
        ),
    ],
)
def test_unusable_updates_are_rejected_after_the_report_parses(trained, change, problem):
    reply, expected = trained
    content = reply.to_content()
    change(content)
    with pytest.raises(MessageRejected, match=problem):
        TrainReply.from_content(content, expected)


def test_the_reply_codec_derives_q_and_steps_as_the_trainer_does():
    for n, batch, epochs in [(1, 32, 1), (31, 32, 2), (32, 32, 1), (33, 32, 3), (10**6, 7, 2)]:
        q, steps = round_plan(n, batch, epochs)
        run = RunConfig(noise_multiplier=1.0, batch_size=batch, local_epochs=epochs)
        report = _honest_report(run, n, q, steps)
        _check_report(report, TrainExpectation(RoundRequest(run, 1, "x", 4, "r"), {}))
        with pytest.raises(MessageRejected):
            _check_report(
                dataclasses.replace(report, steps=steps + 1),
                TrainExpectation(RoundRequest(run, 1, "x", 4, "r"), {}),
            )


def _honest_report(run: RunConfig, n: int, q: float, steps: int):
    from ferry.common.privacy import UNIT_OF_PRIVACY
    from ferry.common.privacy.accounting import MechanismSegment
    from ferry.common.privacy.dp_events import event_to_json, segment_event
    from ferry.common.privacy.report import PrivacyReport

    return PrivacyReport(
        run_id="r",
        round=1,
        institution="a",
        unit=UNIT_OF_PRIVACY,
        non_private=False,
        dp_event=event_to_json(segment_event(MechanismSegment(1.0, q, steps))),
        sampling="poisson",
        noise_multiplier=1.0,
        sample_rate=q,
        steps=steps,
        max_grad_norm=run.max_grad_norm,
        batch_size=run.batch_size,
        local_epochs=run.local_epochs,
        examples=n,
        delta=run.delta,
        epsilon=1.0,
        accountant="prv",
        accountant_library="opacus",
        client_rounds=1,
        budget_epsilon=None,
        budget_delta=None,
        prev_report="0" * 64,
        signer="f" * 64,
    )
