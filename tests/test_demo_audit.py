"""The default demo run (10 hospitals, 5 rounds, ε = 3) audits clean: the ledger's chain
verifies and every hospital's reported ε (Opacus PRV) matches the independent replay
(dp-accounting PLD) within 1%. The run is the demo's plan and round loop with the hospitals in
this process (:func:`inprocess_grid.simulate_in_process`): the mechanism, not Ray, is the
point here."""

from __future__ import annotations

import pytest

from ferry.common.config import RunConfig
from ferry.common.training_defaults import resolve_schedule
from ferry.server.audit import audit_ledger

from inprocess_grid import simulate_in_process


@pytest.mark.slow
def test_default_demo_run_replays_within_one_percent(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_HOME", str(tmp_path / "home"))
    # The demo's settings; random weights give the same mechanism (DP does not depend on them).
    cfg = RunConfig(weights="random", out=str(tmp_path / "run"))
    assert (cfg.clients, cfg.epsilon, cfg.delta) == (10, 3.0, 1e-5)
    rounds = resolve_schedule(cfg)[0].rounds  # the DP-aware default
    summary = simulate_in_process(cfg)
    report = audit_ledger(tmp_path / "run")
    assert report.exit_code == 0, report.verdict
    assert len(report.institutions) == 10
    for inst in report.institutions:
        assert inst.rounds == rounds
        assert inst.epsilon_reported == pytest.approx(inst.epsilon_replayed, rel=0.01)
        assert inst.epsilon_reported == pytest.approx(
            summary["clients"][inst.institution]["epsilon"]
        )
        assert inst.epsilon_reported <= 3.0
