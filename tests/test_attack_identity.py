"""Attack: an institution's identity is the node it authenticated as, never what it says.

In deployment the server knows each registered node's institution (``plan.node_names``,
from ``ferry server``'s key registration). Played here as the hostile institution would,
on :class:`~tests.test_deploy_federation.FakeGrid` (Ferry's real client handlers):

* the node registered as ``hospital-002`` signs reports naming ``hospital-000`` (with its own
  key, as it can): its replies are rejected, and hospital-000's ledger records, summary entry
  and audit stay its own (before, the summary counted both as hospital-000 and the audit
  flagged the honest hospital-000);
* a node whose key is still registered in the SuperLink's database but not in the run's
  institutions is never sampled, and refused and logged every round.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ferry.client.receipts import signing_key
from ferry.common.privacy.report import PrivacyReport, sign
from ferry.server.audit import audit_ledger
from ferry.server.checkpoint import load_checkpoint
from ferry.server.federation import run_federation
from ferry.server.ledger import read_ledger
from tests import test_deploy_federation as deployed
from tests.test_attack_hostile_replies import HOSTILE, HostileGrid, _honest_fedavg
from tests.test_deploy_federation import NODES, FakeGrid

# The in-process federation's fixtures: a plan over three virtual institutions, and the
# identity a ServerApp process has when it builds messages.
make_plan, server_identity = deployed.make_plan, deployed.server_identity

REGISTERED = {node: f"hospital-{i:03d}" for i, node in enumerate(NODES)}


def _events(plan, kind: str) -> list[dict]:
    return [r for r in read_ledger(plan.out / "ledger.jsonl").records if r["event"] == kind]


def _claiming(plan, name: str):
    """The hostile node's train replies: its report re-signed with its own key, naming
    ``name`` (and, for an older server, the unsigned copy beside it too)."""

    def mutate(msg, reply):
        privacy = reply.content["privacy"]
        report = PrivacyReport.from_body(privacy["signed-report"])
        own = report.institution
        key = signing_key(plan.client_state_root / own, own)
        signed = sign(dataclasses.replace(report, institution=name), key)
        privacy["signed-report"], privacy["signature"] = signed.body, signed.signature
        if "institution" in privacy:
            privacy["institution"] = name
        return reply

    return mutate


def test_node_claiming_another_registered_institution_is_rejected_and_changes_nothing(make_plan):
    plan = dataclasses.replace(make_plan(rounds=2), node_names=dict(REGISTERED))
    grid = HostileGrid("train", _claiming(plan, "hospital-000"))

    summary = run_federation(grid, plan)

    assert summary["rounds_completed"] == 2
    rejected = _events(plan, "update_rejected")
    assert [(r["round"], r["node_id"], r["institution"]) for r in rejected] == [
        (1, str(HOSTILE), "hospital-002"),
        (2, str(HOSTILE), "hospital-002"),
    ]
    assert all("hospital-000" in r["reason"] and "hospital-002" in r["reason"] for r in rejected)
    trained = _events(plan, "client_trained")
    assert {(r["institution"], r["node_id"]) for r in trained} == {
        ("hospital-000", str(NODES[0])),
        ("hospital-001", str(NODES[1])),
    }  # the hostile's numbers never enter the ledger, under any name
    own = [r for r in trained if r["institution"] == "hospital-000"]
    entry = summary["clients"]["hospital-000"]
    assert entry["node_id"] == NODES[0] and entry["rounds"] == 2
    assert entry["epsilon"] == pytest.approx(own[-1]["epsilon_spent"])
    assert "hospital-002" not in summary["clients"]
    final = load_checkpoint(plan.out).arrays
    for key, value in _honest_fedavg(grid, 2).items():
        np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-6)
    audit = {i.institution: i.flags for i in audit_ledger(plan.out).institutions}
    assert audit["hospital-000"] == [] and audit["hospital-001"] == []


def test_unregistered_node_is_never_sampled_and_is_refused_every_round(make_plan):
    lines: list[str] = []
    registered = {n: name for n, name in REGISTERED.items() if n != HOSTILE}
    plan = dataclasses.replace(make_plan(rounds=3), node_names=registered, log=lines.append)
    grid = FakeGrid()  # the grid lists all three nodes; only two are this run's institutions

    summary = run_federation(grid, plan)

    assert summary["rounds_completed"] == 3
    assert not [m for m, _ in grid.exchanged if m.metadata.dst_node_id == HOSTILE]
    refused = _events(plan, "node_refused")
    assert [(r["round"], r["node_id"]) for r in refused] == [
        (rnd, str(HOSTILE)) for rnd in (1, 2, 3)
    ]
    assert all("not a registered institution" in r["reason"] for r in refused)
    assert len([line for line in lines if f"node {HOSTILE} refused" in line]) == 3
    assert sorted(summary["clients"]) == ["hospital-000", "hospital-001"]
    participants = [sorted(a["participants"]) for a in _events(plan, "round_aggregated")]
    assert participants == [["hospital-000", "hospital-001"]] * 3
    assert json.loads((plan.out / "metrics.jsonl").read_text().splitlines()[-1])["sampled"] == 2
