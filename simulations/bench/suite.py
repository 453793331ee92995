"""``ferry bench``: every benchmark of issue 7 in one run, written to BENCHMARKS.md and JSON."""

from __future__ import annotations

import time
from pathlib import Path

from ferry.simulations.bench import sim_bench, training_bench
from ferry.simulations.bench.report import machine, replace_section, write_json

TRAINING = "## Training: cached features, DP overhead, bytes"
SIMULATION = "## Simulation: Ferry vs a no-op Flower client"


def run_bench(quick: bool, markdown: Path, json_path: Path, log=print) -> dict:
    command = "ferry bench" + (" --quick" if quick else "")
    started = time.perf_counter()
    log("training benchmarks (a, b, d)...")
    training = training_bench.run(quick)
    log(training_bench.render(training, command))
    log("simulation benchmarks (c, e): fresh Ray per run, Ferry vs no-op client...")
    simulation = sim_bench.run(quick)
    log(sim_bench.render(simulation, command))
    where = f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}."
    replace_section(markdown, TRAINING, where + "\n\n" + training_bench.render(training, command))
    replace_section(markdown, SIMULATION, where + "\n\n" + sim_bench.render(simulation, command))
    results = {
        "machine": machine(),
        "quick": quick,
        "training": training,
        "simulation": simulation,
        "seconds": time.perf_counter() - started,
    }
    write_json(json_path, "bench_quick" if quick else "bench", results)
    log(f"benchmarks written to {markdown} and {json_path} ({results['seconds']:.0f}s)")
    return results
