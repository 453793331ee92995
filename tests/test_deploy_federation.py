"""The round loop's fault tolerance, on an in-process grid that can lose clients and crash.

:class:`inprocess_grid.FakeGrid` hands every message to Ferry's real ClientApp handlers (three
virtual institutions training with DP-SGD on synthetic data) and returns their replies, except
where a test makes a node stay silent (a straggler), answers with a SuperLink transport error,
or makes the server "crash" in the middle of an exchange. Nothing here starts a process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from ferry.client.privacy_state import PrivacyState
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ferry.server.federation import FederationPlan, run_federation
from ferry.server.ledger import read_ledger

from inprocess_grid import NODES, Crash, FakeGrid, act_as_server_app, grid_plan
from reference_fedavg import fedavg


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    act_as_server_app(monkeypatch)


@pytest.fixture
def make_plan(tmp_path, artifact):
    def make(name: str = "run", **changes) -> FederationPlan:
        run = RunConfig(
            examples=600,
            clients=3,
            rounds=3,
            min_clients=2,
            noise_multiplier=1.5,
            epsilon=30.0,
            seed=3,
        )
        run = dataclasses.replace(run, out=str(tmp_path / name), **changes)
        return grid_plan(run, artifact, tmp_path / "cache", run_id=name, round_timeout=0.3)

    return make


def _events(out: Path, kind: str) -> list[dict]:
    return [r for r in read_ledger(out / "ledger.jsonl").records if r["event"] == kind]


def _round_of(msg: Message) -> int:
    return int(msg.metadata.group_id)


def test_straggler_is_dropped_logged_and_sits_out_next_round_while_others_aggregate(make_plan):
    straggler = NODES[2]
    plan = make_plan()

    def fate(node, msg):
        late = node == straggler and _round_of(msg) == 2 and msg.metadata.message_type == "train"
        return "silent" if late else "answer"

    summary = run_federation(FakeGrid(fate), plan)

    rounds = [json.loads(line) for line in (plan.out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds_completed"] == 3
    assert [r["participants"] for r in rounds] == [3, 2, 2]
    assert [r["sampled"] for r in rounds] == [3, 3, 2]  # sits round 3 out
    dropped = _events(plan.out, "client_dropped")
    assert [(d["round"], d["node_id"], d["stage"]) for d in dropped] == [
        (2, str(straggler), "train")
    ]
    assert "round timeout" in dropped[0]["reason"]
    aggregated = _events(plan.out, "round_aggregated")
    assert [len(a["participants"]) for a in aggregated] == [3, 2, 2]


class HostileCountGrid(FakeGrid):
    """One institution's train replies claim ``count`` examples (a hostile institution)."""

    def __init__(self, hostile: int, count: float):
        super().__init__()
        self.hostile, self.count = hostile, count

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for msg in messages:
            reply = self.replies.get(msg.metadata.message_id)
            hostile_train = msg.metadata.dst_node_id == self.hostile and (
                msg.metadata.message_type == "train"
            )
            if hostile_train and reply is not None and "metrics" in reply.content:
                reply.content["metrics"]["num-examples"] = self.count
        return ids


@pytest.mark.parametrize("count", [float("inf"), float("nan"), -5.0])
def test_hostile_example_count_is_rejected_and_never_stops_the_round(make_plan, count):
    hostile = NODES[1]
    plan = make_plan(rounds=2)

    summary = run_federation(HostileCountGrid(hostile, count), plan)

    assert summary["rounds_completed"] == 2  # before: OverflowError/ValueError stopped the run
    rejected = _events(plan.out, "update_rejected")
    assert [(r["round"], r["node_id"]) for r in rejected] == [(1, str(hostile)), (2, str(hostile))]
    assert all("num-examples" in r["reason"] for r in rejected)
    aggregated = _events(plan.out, "round_aggregated")
    assert [len(a["participants"]) for a in aggregated] == [2, 2]


def test_error_from_superlink_is_attributed_to_the_node_it_concerns(make_plan):
    gone = NODES[1]
    plan = make_plan(rounds=1)

    def fate(node, msg):
        return "unavailable" if node == gone and msg.metadata.message_type == "train" else "answer"

    run_federation(FakeGrid(fate), plan)

    dropped = _events(plan.out, "client_dropped")
    assert [(d["node_id"], d["stage"]) for d in dropped] == [(str(gone), "train")]
    assert "node offline" in dropped[0]["reason"]
    assert not _events(plan.out, "update_rejected")  # not blamed on "node 1"


def test_round_with_fewer_usable_updates_than_min_clients_aggregates_nothing_and_fails(make_plan):
    plan = make_plan(min_clients=3)

    def fate(node, msg):
        late = node == NODES[0] and _round_of(msg) == 2 and msg.metadata.message_type == "train"
        return "silent" if late else "answer"

    with pytest.raises(FerryError, match="round 2: 2 usable update.*--min-clients 3"):
        run_federation(FakeGrid(fate), plan)

    assert [a["round"] for a in _events(plan.out, "round_aggregated")] == [1]
    assert [f["round"] for f in _events(plan.out, "round_failed")] == [2]
    assert load_checkpoint(plan.out).round == 1  # resumable from the last good round


def _crash_in_round_3(stage: str):
    def fate(node, msg):
        if _round_of(msg) == 3 and msg.metadata.message_type == stage:
            return "crash"
        return "answer"

    return fate


def _client_state(plan: FederationPlan, name: str) -> PrivacyState:
    return PrivacyState.open(plan.client_state_root / name, name)


def _arrays(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@pytest.mark.parametrize("stage", ["evaluate", "train"])
def test_resume_after_crash_in_round_3_reruns_it_from_the_round_2_checkpoint(make_plan, stage):
    plan = make_plan("crashed")
    with pytest.raises(Crash):
        run_federation(FakeGrid(_crash_in_round_3(stage)), plan)
    after_round_2 = load_checkpoint(plan.out)
    assert after_round_2.round == 2
    grid = FakeGrid()
    resumed = run_federation(grid, dataclasses.replace(make_plan("crashed"), resume=True))

    # Round 3 re-ran from the round-2 checkpoint (DP noise is fresh each round, so the rerun's
    # arrays differ from the crashed attempt's; what holds exactly is where it started and
    # that the result is the aggregate of the rerun's replies).
    trained = [(m, r) for m, r in grid.exchanged if m.metadata.message_type == "train"]
    assert {_round_of(m) for m, _ in trained} == {3}
    assert len(trained) == 3
    for msg, _ in trained:
        for key, value in after_round_2.arrays.items():
            np.testing.assert_array_equal(_arrays(msg.content["trainable"])[key], value)
    updates = [
        (_arrays(r.content["trainable"]), float(r.content["metrics"]["num-examples"]))
        for _, r in trained
    ]
    final = load_checkpoint(plan.out)
    assert final.round == 3
    for key, value in fedavg(updates).items():
        np.testing.assert_array_equal(final.arrays[key], value)
    lines = (plan.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert resumed["rounds_completed"] == 3
    ledger = read_ledger(plan.out / "ledger.jsonl")  # the chain verifies across the restart
    events = [r["event"] for r in ledger.records]
    assert events.count("run_started") == 1 and events.count("run_resumed") == 1
    resumed_at = events.index("run_resumed")
    aggregated = [
        (i, r["round"]) for i, r in enumerate(ledger.records) if r["event"] == "round_aggregated"
    ]
    assert [rnd for i, rnd in aggregated if i > resumed_at] == [3]
    assert sorted({rnd for _, rnd in aggregated}) == [1, 2, 3]
    # Every institution's ε in the ledger is its own accounting: the crashed attempt's spend
    # is counted once (it happened), never twice, and never reset.
    for name, client in resumed["clients"].items():
        state = _client_state(plan, name)
        records = [r for r in _events(plan.out, "client_trained") if r["institution"] == name]
        assert records[-1]["epsilon_spent"] == pytest.approx(state.epsilon(1e-5))
        assert records[-1]["client_rounds"] == state.rounds() == 4  # 3 rounds + the crashed one
        if stage == "evaluate":  # the crashed round's replies reached the ledger
            replay = [
                MechanismSegment(r["noise_multiplier"], r["sample_rate"], r["steps"])
                for r in records
            ]
            assert [r["client_rounds"] for r in records] == [1, 2, 3, 4]
            assert epsilon_for_history(replay, 1e-5) == pytest.approx(state.epsilon(1e-5))
        else:  # lost with the server: the gap in client_rounds shows it to an auditor
            assert [r["client_rounds"] for r in records] == [1, 2, 4]
        assert client["epsilon"] == pytest.approx(state.epsilon(1e-5))


def test_resume_refuses_a_ledger_that_lost_checkpointed_records(make_plan):
    plan = make_plan(rounds=2)
    with pytest.raises(Crash):
        run_federation(FakeGrid(lambda n, m: "crash" if _round_of(m) == 2 else "answer"), plan)
    ledger = plan.out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    checkpointed = load_checkpoint(plan.out).ledger_seq
    ledger.write_bytes(b"".join(lines[: checkpointed - 1]))
    (plan.out / "ledger.head").unlink()

    with pytest.raises(FerryError, match="no longer starts with"):
        run_federation(FakeGrid(), dataclasses.replace(make_plan(rounds=2), resume=True))


def test_resume_refuses_other_settings_or_no_checkpoint(make_plan):
    plan = make_plan(rounds=2)
    with pytest.raises(FerryError, match="holds no checkpoint.json"):
        run_federation(FakeGrid(), dataclasses.replace(plan, resume=True))
    with pytest.raises(Crash):
        run_federation(FakeGrid(lambda n, m: "crash" if _round_of(m) == 2 else "answer"), plan)
    assert (plan.out / CHECKPOINT_FILE).exists()

    with pytest.raises(FerryError, match=r"settings differ .*\(lr\)"):
        run_federation(FakeGrid(), dataclasses.replace(make_plan(rounds=2, lr=0.5), resume=True))
