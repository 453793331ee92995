"""End to end: a Flower simulation of 5 hospitals on Flower's Ray backend, then a second run.

Both runs share one ``$FERRY_HOME`` (where the virtual clients keep their backbone caches),
so the second run finds every client already holding the backbone. The second run's point is
those caches on disk, not Ray: it runs the same plan and round loop with the institutions in
this process (:func:`inprocess_grid.simulate_in_process`), their in-memory caches empty, as in
fresh workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.common.config import RunConfig
from ferry.common.serialization import load_artifact
from ferry.server.pretrain import PretrainConfig, pretrain
from ferry.simulations.runner import simulate

from inprocess_grid import empty_process_caches, simulate_in_process

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS, EPSILON = 5, 2, 3.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    weights = root / "pretrained"
    pretrain(PretrainConfig(examples=1500, epochs=1, out=str(weights)), log=lambda _: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(root / "ferry-home"))
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
        summaries = {}
        for name in ("first", "second"):
            cfg = RunConfig(
                clients=CLIENTS,
                rounds=ROUNDS,
                examples=1000,
                epsilon=EPSILON,
                weights=str(weights),
                out=str(root / name),
            )
            if name == "first":
                summaries[name] = simulate(cfg, log=lambda _: None)
            else:
                empty_process_caches(mp)
                summaries[name] = simulate_in_process(cfg)
    return {
        "summaries": summaries,
        "out": {name: root / name for name in summaries},
        "artifact": load_artifact(weights),
    }


def test_simulation_writes_summary_and_one_metrics_line_per_round(runs):
    out: Path = runs["out"]["first"]
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "metrics.jsonl").read_text().splitlines()

    assert summary == runs["summaries"]["first"]
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert all(json.loads(line)["participants"] == CLIENTS for line in lines)
    assert summary["final"]["round"] == ROUNDS


def test_every_client_reports_positive_epsilon_within_target(runs):
    summary = runs["summaries"]["first"]
    clients = summary["clients"]

    assert len(clients) == CLIENTS
    for name, client in clients.items():
        assert 0 < client["epsilon"] <= EPSILON, name
        assert client["rounds"] == ROUNDS, name
        assert client["noise_multiplier"] > 0, name
    assert 0 < summary["privacy"]["max_epsilon"] <= EPSILON


def test_federated_accuracy_beats_chance_for_four_classes(runs):
    final = runs["summaries"]["first"]["final"]
    assert final["accuracy"] > 0.25, final


def test_backbone_ships_in_round_one_only_then_only_head_sized_arrays_travel(runs):
    per_round = runs["summaries"]["first"]["bytes"]["per_round"]
    backbone_bytes = runs["artifact"].nbytes

    assert per_round[0]["backbones_shipped"] == CLIENTS
    assert per_round[0]["backbone_sent"] >= CLIENTS * backbone_bytes
    assert per_round[1]["backbone_sent"] == 0
    assert per_round[1]["backbones_shipped"] == 0
    # Everything round 2 sent to all clients together is smaller than one backbone copy.
    assert per_round[1]["sent"] < backbone_bytes


def test_second_run_ships_no_backbone_because_client_caches_hold_it(runs):
    summary = runs["summaries"]["second"]

    assert summary["backbone"]["sha256"] == runs["summaries"]["first"]["backbone"]["sha256"]
    for traffic in summary["bytes"]["per_round"]:
        assert traffic["backbone_sent"] == 0, traffic
        assert traffic["backbones_shipped"] == 0, traffic
    assert len(summary["clients"]) == CLIENTS
    assert all(0 < c["epsilon"] <= EPSILON for c in summary["clients"].values())
