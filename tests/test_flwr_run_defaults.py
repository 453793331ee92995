"""``flwr run .`` takes its defaults where ``ferry simulate`` takes them.

``[tool.flwr.app.config]`` holds only what the user chose (here nothing: every key unset),
so a ``flwr run .`` of a non-default scenario runs with that scenario's preset (its backbone:
before, the table pinned ``ferry-cnn`` and ``bank-credit``, a table, was refused) and the
DP-aware rule's training settings (before: the table's ``lr = 1.0``, one local epoch, batch
32, recorded as given).

Real processes on 127.0.0.1: a ``flower-superlink --simulation`` of this test's own (free
ports, its own ``FLWR_HOME``; stopped by its process group) and ``flwr run . --stream``
against it, two virtual institutions, one round on a few examples.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ferry.common.config import RunConfig
from ferry.common.deploy.child_processes import ChildProcess, flower_bin, flower_env
from ferry.common.scenarios import get_scenario
from ferry.common.training_defaults import RULE, rule_schedule
from ferry.server.ledger import read_ledger

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCENARIO = "bank-credit"  # a table: the old pinned ferry-cnn backbone could not take it
EXAMPLES = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, superlink: ChildProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert superlink.poll() is None, superlink.log_tail()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the SuperLink did not listen on {port}: {superlink.log_tail()}")


def _flwr_run(tmp_path: Path, run_config: str) -> subprocess.CompletedProcess:
    """``flwr run .`` of this repository against a SuperLink of the test's own."""
    http, control = _free_port(), _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "ferry-test"\n\n[superlink.ferry-test]\n'
        f'address = "127.0.0.1:{http}"\ninsecure = true\noptions.num-supernodes = 2\n'
    )
    env = flower_env() | {
        "FLWR_HOME": str(home),
        "FERRY_HOME": str(tmp_path / "ferry-home"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [
        flower_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(http),
        "--control-api-address",
        f"127.0.0.1:{control}",
        "--fleet-api-address",
        f"127.0.0.1:{_free_port()}",
    ]
    superlink = ChildProcess("superlink", argv, tmp_path / "superlink.log", env).start()
    try:
        _wait_listening(http, superlink)
        return subprocess.run(
            [flower_bin("flwr"), "run", ".", "ferry-test", "--stream", "--run-config", run_config],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        superlink.stop()


def test_flwr_run_of_a_scenario_takes_its_preset_and_the_rules_settings(tmp_path):
    out = tmp_path / "run"
    res = _flwr_run(
        tmp_path,
        f"scenario='{SCENARIO}' examples={EXAMPLES} rounds=1 weights='random' out='{out}'",
    )

    assert (out / "ledger.jsonl").exists(), res.stdout[-3000:] + res.stderr[-3000:]
    records = read_ledger(out / "ledger.jsonl").records
    started = next(r for r in records if r["event"] == "run_started")
    assert started["config"]["scenario"] == SCENARIO
    assert started["config"]["backbone"] == get_scenario(SCENARIO).backbone
    rule = rule_schedule(RunConfig(scenario=SCENARIO, examples=EXAMPLES))
    training = started["training"]
    assert training["source"] == {
        "batch_size": RULE,
        "local_epochs": RULE,
        "rounds": "given",
        "lr": RULE,
    }
    assert (training["lr"], training["local_epochs"], training["rounds"]) == (
        rule.lr,
        rule.local_epochs,
        1,
    )
    assert str(training["batch_size"]).startswith("per institution")
    assert any(r["event"] == "round_aggregated" for r in records)
    assert os.path.exists(out / "summary.json")
