"""Attack: one institution of three sends hostile replies; the run must go on unharmed.

Played as the hostile institution would: its ClientApp runs honestly (in
:class:`~tests.test_deploy_federation.FakeGrid`, Ferry's real handlers), then it rewrites its
reply before the server reads it: counts that are missing, negative, NaN, infinite or 1e12;
metrics the server never asked for; arrays of the wrong shape, dtype, count or values; an
unreadable or oversized refusal; a privacy report that lies (sigma, q, steps, delta, epsilon,
accountant). A hostile institution may sign whatever it likes with its own key, and the
server does not verify signatures (``ferry audit`` does), so the test edits the signed body
directly; an older server read an unsigned copy beside it, edited the same way.

For each: every round completes, the ledger holds the rejection with its reason, and the
global model is the aggregate of the two honest updates alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict

from ferry.server.checkpoint import load_checkpoint
from ferry.server.federation import run_federation
from ferry.server.ledger import read_ledger
from tests import test_deploy_federation as deployed
from tests.test_deploy_federation import NODES, FakeGrid

# The in-process federation's fixtures: a plan over three virtual institutions, and the
# identity a ServerApp process has when it builds messages.
make_plan, server_identity = deployed.make_plan, deployed.server_identity

HOSTILE = NODES[2]
Mutation = Callable[[Message, Message], Message]


class HostileGrid(FakeGrid):
    """Every ``kind`` reply of :data:`HOSTILE` is rewritten by ``mutate(message, reply)``."""

    def __init__(self, kind: str, mutate: Mutation):
        super().__init__()
        self.kind, self.mutate = kind, mutate

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for msg in messages:
            key = msg.metadata.message_id
            if msg.metadata.dst_node_id != HOSTILE or msg.metadata.message_type != self.kind:
                continue
            reply = self.mutate(msg, self.replies[key])
            self.replies[key] = reply
            self.exchanged = [(m, reply if m is msg else r) for m, r in self.exchanged]
        return ids


def _events(plan, kind: str) -> list[dict]:
    return [r for r in read_ledger(plan.out / "ledger.jsonl").records if r["event"] == kind]


# ------------------------------------------------------------------------ train replies


def _metrics(values: dict) -> Mutation:
    def mutate(msg, reply):
        reply.content["metrics"] = MetricRecord(values)
        return reply

    return mutate


def _count(value) -> Mutation:
    def mutate(msg, reply):
        reply.content["metrics"]["num-examples"] = value
        return reply

    return mutate


def _array(change: Callable[[dict], dict]) -> Mutation:
    def mutate(msg, reply):
        arrays = {k: v.numpy() for k, v in reply.content["trainable"].items()}
        for key in list(reply.content["trainable"].keys()):
            del reply.content["trainable"][key]
        for key, value in change(arrays).items():
            reply.content["trainable"][key] = Array(np.ascontiguousarray(value))
        return reply

    return mutate


def _refusal(values: dict) -> Mutation:
    def mutate(msg, reply):
        return Message(RecordDict({"refusal": ConfigRecord(values)}), reply_to=msg)

    return mutate


def _lie(field: str, value, wire: str) -> Mutation:
    """The signed report's ``field`` (and the unsigned copy's ``wire`` key) set to ``value``."""

    def mutate(msg, reply):
        privacy = reply.content["privacy"]
        body = json.loads(privacy["signed-report"])
        body[field] = value
        privacy["signed-report"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if wire in privacy:
            privacy[wire] = value
        return reply

    return mutate


def _first(arrays: dict) -> str:
    return sorted(arrays)[0]


TRAIN_ATTACKS = {
    "list-valued train-loss": (
        _metrics({"num-examples": 150, "train-loss": [0.1, 0.2]}),
        "metrics",
    ),
    "no num-examples": (_metrics({}), "num-examples"),
    "negative num-examples": (_count(-5), "num-examples"),
    "nan num-examples": (_count(float("nan")), "num-examples"),
    "inf num-examples": (_count(float("inf")), "num-examples"),
    "1e12 num-examples": (_count(10**12), "num-examples"),
    "float num-examples": (_count(1e12), "num-examples"),
    "nan array": (_array(lambda a: {k: v * np.nan for k, v in a.items()}), "non-finite"),
    "wrong shape": (_array(lambda a: {k: v[:1] for k, v in a.items()}), "expected"),
    "wrong dtype": (_array(lambda a: {k: v.astype(np.float64) for k, v in a.items()}), "expected"),
    "missing array": (_array(lambda a: {k: a[k] for k in sorted(a)[1:]}), "array keys"),
    "extra-large array": (
        _array(lambda a: {**a, "extra": np.zeros((4096, 4096), np.float32)}),
        "array keys",
    ),
    "oversized array": (
        _array(lambda a: {**a, _first(a): np.zeros((4096, 4096), np.float32)}),
        "expected",
    ),
    "refusal without reason": (_refusal({"kind": "error"}), "reason"),
    "refusal with a 10 MB reason": (_refusal({"reason": "x" * 10_000_000}), "10,000,000"),
    "refusal of an unknown kind": (_refusal({"reason": "stop", "kind": "shutdown"}), "kind"),
    "sigma not the round's": (_lie("noise_multiplier", 100.0, "noise-multiplier"), "noise"),
    "sigma not a number": (_lie("noise_multiplier", "lots", "noise-multiplier"), "noise"),
    "q not 1/ceil(n/B)": (_lie("sample_rate", 0.5, "sample-rate"), "sample-rate"),
    "steps not epochs x batches": (_lie("steps", 1, "steps"), "steps"),
    "delta not the round's": (_lie("delta", 0.1, "delta"), "delta"),
    "epsilon not a number": (_lie("epsilon", "lots", "epsilon"), "epsilon"),
    "negative epsilon": (_lie("epsilon", -1.0, "epsilon"), "epsilon"),
    "nan epsilon": (_lie("epsilon", math.nan, "epsilon"), "epsilon"),
    "accountant not a string": (_lie("accountant", 7, "accountant"), "accountant"),
    "unknown accountant": (_lie("accountant", "none", "accountant"), "accountant"),
}


def _honest_fedavg(grid: FakeGrid, rnd: int) -> dict[str, np.ndarray]:
    """FedAvg of the honest institutions' replies in round ``rnd``, from the arrays the
    server sent. With two honest updates of similar size, bounded aggregation caps and clips
    nothing (the round_aggregated record says so), so this is exactly what it must give."""
    replies = [
        r
        for m, r in grid.exchanged
        if m.metadata.message_type == "train"
        and int(m.metadata.group_id) == rnd
        and m.metadata.dst_node_id != HOSTILE
    ]
    updates = [
        (
            {k: v.numpy() for k, v in r.content["trainable"].items()},
            r.content["metrics"]["num-examples"],
        )
        for r in replies
    ]
    total = sum(n for _, n in updates)
    return {k: sum(a[k].astype(np.float64) * n for a, n in updates) / total for k in updates[0][0]}


# One attack of each kind (a count, an array, a privacy-report lie) stays in the fast subset;
# every attack runs in `make test`.
FAST_TRAIN_ATTACKS = ("nan num-examples", "wrong shape", "sigma not the round's")


@pytest.mark.parametrize(
    "name",
    [
        name if name in FAST_TRAIN_ATTACKS else pytest.param(name, marks=pytest.mark.slow)
        for name in TRAIN_ATTACKS
    ],
)
def test_hostile_train_reply_is_rejected_and_the_model_is_the_honest_aggregate(make_plan, name):
    mutate, reason = TRAIN_ATTACKS[name]
    plan = make_plan(rounds=2)
    grid = HostileGrid("train", mutate)

    summary = run_federation(grid, plan)

    assert summary["rounds_completed"] == 2
    rejected = _events(plan, "update_rejected")
    assert [(r["round"], r["node_id"]) for r in rejected] == [(1, str(HOSTILE)), (2, str(HOSTILE))]
    assert all(reason in r["reason"] for r in rejected), rejected[0]["reason"]
    assert all(len(r["reason"]) <= 2_000 for r in rejected)
    aggregated = _events(plan, "round_aggregated")
    assert [sorted(a["participants"]) for a in aggregated] == [["hospital-000", "hospital-001"]] * 2
    assert all(not a.get("clipped") for a in aggregated)
    final = load_checkpoint(plan.out).arrays
    for key, value in _honest_fedavg(grid, 2).items():
        np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-6)


def test_budget_refusal_from_one_institution_stops_only_that_one(make_plan):
    plan = make_plan(rounds=3)
    grid = HostileGrid("train", _refusal({"reason": "budget spent", "kind": "budget"}))

    summary = run_federation(grid, plan)

    assert summary["rounds_completed"] == 3
    refused = _events(plan, "client_refused")
    assert [(r["round"], r["node_id"], r["kind"]) for r in refused] == [
        (1, str(HOSTILE), "budget")
    ]  # not asked again; the others go on
    assert [len(a["participants"]) for a in _events(plan, "round_aggregated")] == [2, 2, 2]


# ------------------------------------------------------------------- evaluation replies


def _confusion(diagonal: int, k: int = 4) -> list[int]:
    return [diagonal if i == j else 0 for i in range(k) for j in range(k)]


EVALUATION_ATTACKS = {
    "list-valued num-examples": _metrics({"num-examples": [1, 2], "confusion": _confusion(1)}),
    "no counts": _metrics({"num-examples": 40}),
    "negative counts": _metrics({"num-examples": 0, "confusion": [-1, 1] + [0] * 14}),
    "counts beyond int64": _metrics({"num-examples": 8, "confusion": [2**62, 2**62] + [0] * 14}),
    "unknown metric": _metrics({"num-examples": 4, "confusion": _confusion(1), "auc": 1.0}),
    "refusal without reason": _refusal({}),
}


@pytest.mark.parametrize("name", list(EVALUATION_ATTACKS))
def test_hostile_evaluation_reply_is_rejected_and_left_out(make_plan, name):
    plan = make_plan(rounds=2)

    summary = run_federation(HostileGrid("evaluate", EVALUATION_ATTACKS[name]), plan)

    assert summary["rounds_completed"] == 2
    rejected = [
        r
        for kind in ("evaluation_rejected", "update_rejected")
        for r in _events(plan, kind)
        if r.get("stage", "evaluate") == "evaluate"
    ]
    assert [(r["round"], r["node_id"]) for r in rejected] == [(1, str(HOSTILE)), (2, str(HOSTILE))]
    rounds = [json.loads(line) for line in (plan.out / "metrics.jsonl").read_text().splitlines()]
    for record in rounds:
        assert "hospital-002" not in record["per_institution"]
        honest = [v["eval_examples"] for v in record["per_institution"].values()]
        assert record["eval_examples"] == sum(honest) > 0


def test_one_institution_claiming_1e9_perfect_evaluations_does_not_decide_the_metrics(make_plan):
    plan = make_plan(rounds=1)
    quarter, bins = 250_000_000, 100
    histogram = [  # each class: its quarter in the top bin, the others in the bottom one
        count for _ in range(4) for count in ([3 * quarter] + [0] * 99 + [0] * 99 + [quarter])
    ]
    perfect = _metrics(
        {
            "num-examples": 10**9,
            "confusion": _confusion(quarter),
            "score-bins": bins,
            "score-histogram": histogram,
            "log-loss-sum": 0.0,
        }
    )

    summary = run_federation(HostileGrid("evaluate", perfect), plan)

    record = json.loads((plan.out / "metrics.jsonl").read_text().splitlines()[-1])
    honest = [v for k, v in record["per_institution"].items() if k != "hospital-002"]
    assert summary["final"]["accuracy"] < 0.99  # the unbounded pool said 1.000
    assert not _events(plan, "evaluation_rejected")  # a valid release, bounded by the cap
    honest_examples = sum(v["eval_examples"] for v in honest)
    assert record["eval_examples"] < 3 * honest_examples  # counted as a few, not 1e9
