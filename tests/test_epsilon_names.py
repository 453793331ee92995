"""One name per concept on the wire and in the ledger, and ledgers from before still audit.

The run's target ε is ``target-epsilon`` in the run record (messages and ``run_started``), an
institution's spent ε is ``epsilon_spent`` and its budget ε ``budget_epsilon`` in its
``client_trained`` records; the trainable arrays travel as ``trainable`` both ways. A ledger
written before the rename (``epsilon`` for the target, ``epsilon_reported`` for the spend)
still passes ``ferry audit``, and the audit still checks the old spend field against the
signed report.

Federations run on the in-process grid (:mod:`inprocess_grid`): the real ClientApp handlers,
three virtual institutions training with DP-SGD, no process started.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord

from ferry.common.config import RunConfig
from ferry.common.messages import TRAINABLE, RoundRequest, TrainRequest
from ferry.server.audit import audit_ledger
from ferry.server.audit_signatures import CONTRADICTS
from ferry.server.federation import FederationPlan, run_federation
from ferry.server.ledger import Ledger, read_ledger

from inprocess_grid import FakeGrid, act_as_server_app, grid_plan

TARGET, BUDGET = 30.0, 40.0
CHAIN_FIELDS = ("seq", "prev", "time", "event")


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    act_as_server_app(monkeypatch)


@pytest.fixture
def federation(tmp_path, artifact) -> tuple[FederationPlan, FakeGrid]:
    """One round of three institutions, target ε 30 and budget ε 40 each, already run."""
    out = tmp_path / "run"
    cfg = RunConfig(
        examples=600,
        clients=3,
        rounds=1,
        min_clients=2,
        noise_multiplier=1.5,
        epsilon=TARGET,
        budget_epsilon=BUDGET,
        out=str(out),
    )
    plan = grid_plan(cfg, artifact, tmp_path / "cache")
    grid = FakeGrid()
    run_federation(grid, plan)
    return plan, grid


def _records(out: Path) -> list[dict]:
    return read_ledger(out / "ledger.jsonl").records


def test_new_records_and_messages_carry_three_distinct_epsilon_names(federation):
    plan, grid = federation
    records = _records(plan.out)

    config = next(r for r in records if r["event"] == "run_started")["config"]
    assert config["target-epsilon"] == TARGET and "epsilon" not in config
    trained = [r for r in records if r["event"] == "client_trained"]
    assert len(trained) == 3
    for r in trained:
        assert 0 < r["epsilon_spent"] < TARGET
        assert r["budget_epsilon"] == BUDGET
        assert "epsilon_reported" not in r and "epsilon" not in r
    assert audit_ledger(plan.out).ok

    sent = [(m, reply) for m, reply in grid.exchanged if m.metadata.message_type == "train"]
    assert len(sent) == 3
    for message, reply in sent:
        run = message.content["run"]
        assert run["target-epsilon"] == TARGET and "epsilon" not in run
        for content in (message.content, reply.content):
            assert isinstance(content[TRAINABLE], ArrayRecord) and "head" not in content


def test_round_request_reads_a_run_record_from_before_the_rename():
    request = RoundRequest(RunConfig(epsilon=TARGET), 1, "ab" * 32, 4, "run")
    new = request.to_record()
    old = {("epsilon" if k == "target-epsilon" else k): v for k, v in new.items()}

    assert RoundRequest.from_record(new).run.epsilon == TARGET
    assert RoundRequest.from_record(old).run.epsilon == TARGET
    with pytest.raises(ValueError, match="twice"):
        RoundRequest.from_record({**new, "epsilon": 1.0})
    assert TRAINABLE in TrainRequest(request, {}).to_content()


def _rewritten(plan: FederationPlan, folder: Path, rename: dict[str, str], **scale) -> Path:
    """The run's ledger (and the institutions' public keys) in ``folder``, every record
    appended anew with its fields renamed (``rename``: new -> old name; the run record's
    ``target-epsilon`` too) and the first record's ``scale`` fields multiplied."""
    folder.mkdir()
    shutil.copytree(plan.out / "clients", folder / "clients")
    ledger = Ledger(folder)
    for record in _records(plan.out):
        fields = {rename.get(k, k): v for k, v in record.items() if k not in CHAIN_FIELDS}
        if record["event"] == "run_started" and "target-epsilon" in rename:
            fields["config"] = {rename.get(k, k): v for k, v in fields["config"].items()}
        scaled = {k: fields[k] * factor for k, factor in scale.items() if k in fields}
        if scaled:
            fields.update(scaled)
            scale = {}  # the first record that has them only
        ledger.append(record["event"], **fields)
    return folder


OLD_NAMES = {"epsilon_spent": "epsilon_reported", "target-epsilon": "epsilon"}


def test_ledger_written_before_the_rename_still_audits(federation, tmp_path):
    plan, _ = federation
    old = _rewritten(plan, tmp_path / "old", OLD_NAMES)
    records = _records(old)
    assert "epsilon" in records[0]["config"]
    spent = {r["institution"]: r["epsilon_reported"] for r in records[1:] if "examples" in r}

    report = audit_ledger(old)

    assert report.ok, report.verdict()
    assert {i.institution: i.epsilon_reported for i in report.institutions} == pytest.approx(spent)


@pytest.mark.parametrize("names", [OLD_NAMES, {}], ids=["old-names", "new-names"])
def test_audit_flags_a_spend_that_contradicts_the_signed_report(federation, tmp_path, names):
    plan, _ = federation
    spend = names.get("epsilon_spent", "epsilon_spent")
    lied = _rewritten(plan, tmp_path / "lied", names, **{spend: 0.5})

    report = audit_ledger(lied)

    assert not report.ok
    assert report.violations[CONTRADICTS] == 1
