"""`ferry bench --quick` runs end to end and writes its figures (figures are not asserted:
speed targets live in BENCHMARKS.md, never in tests)."""

from __future__ import annotations

import json
import math

import pytest

from ferry.cli import main


@pytest.mark.slow
def test_ferry_bench_quick_writes_every_benchmark(tmp_path):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Training: cached features, DP overhead, bytes" in text
    assert "## Simulation: Ferry vs a no-op Flower client" in text
    results = json.loads((tmp_path / "BENCHMARKS.json").read_text())["bench_quick"]
    a = results["training"]["a_cached_vs_backbone"]
    b = results["training"]["b_dp_vs_nonprivate"]
    d = results["training"]["d_bytes"]
    for value in (a["speedup_head_only"], a["speedup_with_extraction"], b["ratio"]):
        assert math.isfinite(value) and value > 0
    # Bytes are exact: a ResNet-18 trunk with a 10-class linear head.
    assert d["head_bytes"] == (512 * 10 + 10) * 4
    assert d["ratio"] < 0.01
    runs = {(r["kind"], r["clients"]) for r in results["simulation"]["runs"]}
    assert runs == {("ferry", 100), ("noop", 100)}
    assert all(r["peak_rss_bytes"] > 0 for r in results["simulation"]["runs"])
