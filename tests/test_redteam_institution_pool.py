"""Attack: one institution takes the federation's pooled AUC and loss away.

The pool has a score histogram (hence ROC AUC) and a log loss only if every institution's
statistics have them, on the same bins. A hostile institution that released its confusion
matrix alone, or its histogram on other bins (its own, re-binned), was accepted, and every
round's federated ``roc_auc`` and ``loss`` were gone for everyone. Every Ferry institution
releases both on ``AUC_BINS`` bins, so such a reply is now rejected and the metrics stay.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import MetricRecord

from ferry.server.federation import run_federation
from tests import test_attack_hostile_replies as hostile
from tests import test_deploy_federation as deployed

make_plan, server_identity = deployed.make_plan, deployed.server_identity


def _without(*keys: str) -> hostile.Mutation:
    def mutate(msg, reply):
        kept = {k: v for k, v in reply.content["metrics"].items() if k not in keys}
        reply.content["metrics"] = MetricRecord(kept)
        return reply

    return mutate


def _rebinned(msg, reply):
    """Its own histogram, honestly coarsened to half the bins."""
    metrics = dict(reply.content["metrics"])
    bins = metrics["score-bins"]
    hist = np.asarray(metrics["score-histogram"]).reshape(-1, 2, bins // 2, 2).sum(axis=3)
    metrics.update({"score-bins": bins // 2, "score-histogram": hist.ravel().tolist()})
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


ATTACKS = {
    "confusion only": _without("score-bins", "score-histogram", "log-loss-sum"),
    "no log loss": _without("log-loss-sum"),
    "other bins": _rebinned,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_one_institution_cannot_take_the_pooled_auc_and_loss_away(make_plan, name):
    plan = make_plan(rounds=2)

    run_federation(hostile.HostileGrid("evaluate", ATTACKS[name]), plan)

    rounds = [json.loads(line) for line in (plan.out / "metrics.jsonl").read_text().splitlines()]
    for record in rounds:
        assert {"roc_auc", "loss", "accuracy"} <= set(record), sorted(record)
    rejected = hostile._events(plan, "evaluation_rejected")
    assert [r["node_id"] for r in rejected] == [str(hostile.HOSTILE)] * 2
