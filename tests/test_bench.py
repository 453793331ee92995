"""`ferry bench --quick` runs end to end and writes its figures (figures are not asserted:
speed targets live in BENCHMARKS.md, never in tests).

The simulation pair (Ferry and the no-op client, each in a fresh process with its own Ray) runs
at 20 virtual clients and 2 rounds here instead of the quick run's 100 and 3: the test is about
every benchmark being measured and written, and the pair's cost grows with the clients."""

from __future__ import annotations

import json
import math
import re

import pytest

from ferry.cli import main
from ferry.simulations.bench import sim_bench, task_start_bench

CLIENTS = 20


@pytest.mark.slow
def test_ferry_bench_quick_writes_every_benchmark(tmp_path, monkeypatch):
    monkeypatch.setattr(sim_bench, "QUICK_SIZES", [(CLIENTS, 2, 0.5)])
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Training: cached features, DP overhead, bytes" in text
    assert "## Simulation: Ferry vs a no-op Flower client" in text
    assert f"| {CLIENTS} | {CLIENTS // 2} |" in text
    results = json.loads((tmp_path / "BENCHMARKS.json").read_text())["bench_quick"]
    a = results["training"]["a_cached_vs_backbone"]
    b = results["training"]["b_dp_vs_nonprivate"]
    d = results["training"]["d_bytes"]
    for value in (a["speedup_head_only"], a["speedup_with_extraction"], b["ratio"]):
        assert math.isfinite(value) and value > 0
    # Bytes are exact: a ResNet-18 trunk with a 10-class linear head.
    assert d["head_bytes"] == (512 * 10 + 10) * 4
    assert d["ratio"] < 0.01
    runs = {(r["kind"], r["clients"], r["rounds"]) for r in results["simulation"]["runs"]}
    assert runs == {("ferry", CLIENTS, 2), ("noop", CLIENTS, 2)}
    assert all(r["peak_rss_bytes"] > 0 for r in results["simulation"]["runs"])
    for r in results["simulation"]["runs"]:
        assert math.isfinite(r["steady_round_s"]) and r["steady_round_s"] > 0


@pytest.mark.slow
def test_task_start_bench_compares_a_forked_task_with_a_fresh_process(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    task_start_bench.main(["--tasks", "1", "--markdown", str(out)])
    text = out.read_text()
    assert task_start_bench.HEADING in text
    ratios = re.findall(r"\*\*(\d+)×\*\*", text)
    assert len(ratios) == 2 and all(int(r) > 0 for r in ratios)
