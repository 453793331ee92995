"""What federating buys: accuracy against the number of institutions at ε = 1, 3, 8, with
Ferry's default training settings and with the best of a grid.

Every figure is a DP linear head on a frozen backbone's features, trained with
:mod:`simulations.linear_federation` (the DP-SGD and FedAvg every Ferry client and server
run, in one process; σ from each institution's own q and steps at (ε, δ), RDP accountant,
C = 1). Per dataset and ε:

* **central**: one institution holds every training record (K = 1, central DP);
* **federated**: K = 2, 5, 10 institutions, split as ``ferry simulate`` splits the dataset
  (its scenario's partition: Dirichlet label skew α = 0.5 for the image sets, IID for the
  breast-cancer table);
* **alone**: each of the K = 5 institutions trains by itself with the same (ε, δ) and rule;
* **non-private**: K = 1 and K = 5 without DP (the rule's non-private schedule).

Defaults: each institution's expected batch from its own n and the head's size
(:func:`common.training_defaults.rule_batch_size`) and the schedule of
:func:`common.training_defaults.rule_schedule` for the run's ε, averaged over ``repeats`` seeds.
For K = 1 and K = 5 also the best of the grid
(:func:`simulations.linear_federation.grid_search`: every point once, the ``top`` ones again
over the same seeds as the defaults) and the gap in points.

Scoring: every row, the alone rows included, is scored on the same records: the pooled
held-out 20% of all institutions (held-out membership is a function of each record alone, so
it does not move with K). For two classes, balanced accuracy and ROC AUC too.

Run: ``python -m simulations.bench.kcurve_bench [--quick] [--work DIR]
[--datasets digits,hospital-imaging,breast-cancer] [--epsilons 1,3,8] [--repeats 3]
[--jobs 2]``; data, backbones and features are cached in ``--work``; ``--jobs`` datasets run
at once, each in its own process (the full run: about 17 min of one core's time, chiefly σ
searches and digits' 1,280-feature head; about 10 min on two idle cores with ``--jobs 2``). The full run writes its tables to ``BENCHMARKS.md``
(:data:`HEADING`), ``--quick`` (about a minute: two small datasets, ε = 3, a 4-point grid, one
seed) nothing unless ``--benchmarks`` names a file. Sizes and datasets:
:mod:`simulations.bench.kcurve_plan`; tables: :mod:`simulations.bench.kcurve_tables`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ferry.common.training_defaults import rule_batch_size, rule_schedule
from ferry.simulations.bench.kcurve_plan import (
    DATASETS,
    FULL,
    QUICK,
    WITHIN_POINTS,
    KCurveSizes,
    load_features,
)
from ferry.simulations.bench.kcurve_tables import headline, render
from ferry.simulations.bench.report import record_section
from ferry.simulations.linear_federation import (
    FeatureSet,
    Privacy,
    TrainingSettings,
    grid,
    grid_search,
    mean_metrics,
    repeated,
)

HEADING = (
    "## What federating buys: accuracy vs number of institutions at ε = 1, 3, 8 "
    "(defaults vs best of grid)"
)


# --- the runs ---


def default_settings(features: FeatureSet, epsilon: float | None) -> TrainingSettings:
    """The rule's schedule for a run on ``features``' data at ``epsilon`` (None: non-private);
    the batch comes per institution from :func:`rule_batch_size` (``batch_rule``), so
    ``batch_size`` is unused."""
    cfg = dataclasses.replace(
        features.cfg, epsilon=3.0 if epsilon is None else epsilon, non_private=epsilon is None
    )
    schedule = rule_schedule(cfg)
    return TrainingSettings(0, schedule.local_epochs, schedule.rounds, schedule.lr)


def alone(splits, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Institution ``i`` as a federation of one: its own training records, scored on the
    pooled held-out records of every institution (the set every other row is scored on)."""
    return [(splits[i][0], np.concatenate([held for _, held in splits]))]


def _row(name: str, kind: str, k: int, epsilon, splits, params: int, **extra) -> dict:
    ns = [len(train) for train, _ in splits]
    return {
        "dataset": name,
        "row": kind,
        "epsilon": epsilon,
        "institutions": k,
        "train_examples": ns,
        "batches": [rule_batch_size(n, params) for n in ns],
        **extra,
    }


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: a linear head's steps are tiny ops, and more threads only wait on
    each other (a 64-feature run measured 20x slower on two busy cores than on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_dataset(name: str, features: FeatureSet, sizes: KCurveSizes, log=print) -> list[dict]:
    """Every row of ``name``'s table (see the module docstring)."""
    with one_thread():
        return _run_dataset(name, features, sizes, log)


def _run_dataset(name: str, features: FeatureSet, sizes: KCurveSizes, log) -> list[dict]:
    points = grid(sizes.batches, sizes.schedules, sizes.lrs)
    seeds = dict(repeats=sizes.repeats, first_seed=1)  # the seeds grid_search confirms on
    p, rows = features.head_size, []

    def done(row: dict, started: float) -> None:
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:g}"
        line = f"  {name} ε={eps} {row['row']} K={row['institutions']}: defaults {row['defaults']['accuracy']:.3f}"
        if "grid" in row:
            line += (
                f", best of grid {row['grid']['metrics']['accuracy']:.3f} ({row['grid']['best']})"
            )
        log(line + f" ({row['seconds']:.0f}s)")

    for eps in sizes.epsilons:
        privacy, settings = Privacy(eps, sizes.delta), default_settings(features, eps)
        for k in sorted({1, *sizes.federated, *sizes.tuned}):
            started, splits = time.perf_counter(), features.splits(k)
            defaults = repeated(
                features, splits, settings, privacy, batch_rule=rule_batch_size, **seeds
            )
            row = _row(
                name, "central" if k == 1 else "federated", k, eps, splits, p, defaults=defaults
            )
            if k in sizes.tuned:
                search = grid_search(
                    features, splits, privacy, points, repeats=sizes.repeats, top=sizes.top
                )
                row["grid"] = {
                    "best": search.best.label(),
                    "metrics": search.best_metrics,
                    "screened": [(s.label(), m) for s, m in search.screened],
                    "confirmed": [(s.label(), m) for s, m in search.confirmed],
                }
                row["gap_points"] = 100 * (defaults["accuracy"] - search.best_metrics["accuracy"])
                row["within"] = bool(row["gap_points"] >= -WITHIN_POINTS)
            done(row, started)
        started, splits = time.perf_counter(), features.splits(sizes.alone)
        each = [
            repeated(
                features, alone(splits, i), settings, privacy, batch_rule=rule_batch_size, **seeds
            )
            for i in range(len(splits))
        ]
        done(
            _row(
                name, "alone", sizes.alone, eps, splits, p, defaults=mean_metrics(each), each=each
            ),
            started,
        )
    settings = default_settings(features, None)
    for k in sorted({1, *sizes.tuned}):
        started, splits = time.perf_counter(), features.splits(k)
        defaults = repeated(
            features, splits, settings, Privacy(None), batch_rule=rule_batch_size, **seeds
        )
        done(_row(name, "non-private", k, None, splits, p, defaults=defaults), started)
    return rows


def measure_dataset(name: str, sizes: KCurveSizes, work: Path, log=print) -> dict:
    """Build (or load from ``work``) ``name``'s features and run its rows."""
    from ferry.simulations.bench.transfer_bench import ferry_env

    started = time.perf_counter()
    with ferry_env(work / "ferry-home"):
        features, text = load_features(name, sizes, work, log)
        log(f"{name}: {len(features.y):,} records, {features.x.shape[1]:,} features")
        rows = run_dataset(name, features, sizes, log)
    return {
        "description": text,
        "records": len(features.y),
        "classes": features.num_classes,
        "partition": features.cfg.partition,
        "alpha": features.cfg.alpha,
        "held_out": int(sum(len(held) for _, held in features.splits(1))),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def _measure_in_worker(name: str, sizes: KCurveSizes, work: Path) -> dict:
    torch.set_num_threads(1)  # one core per worker: the workers share the machine
    return measure_dataset(name, sizes, work)


def run(sizes: KCurveSizes = FULL, work: Path | None = None, log=print, jobs: int = 1) -> dict:
    """Every dataset of ``sizes``, ``jobs`` datasets at a time (each in its own process when
    ``jobs`` > 1: the runs are single-threaded Python for the most part, chiefly σ searches);
    the results are also written to ``work``/kcurve.json."""
    started = time.perf_counter()
    work = Path(work or tempfile.mkdtemp(prefix="ferry-kcurve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(jobs, len(sizes.datasets)))
    if jobs == 1:
        datasets = {name: measure_dataset(name, sizes, work, log) for name in sizes.datasets}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn = multiprocessing.get_context("spawn")  # no forked torch or lru caches
        with ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
            running = {n: pool.submit(_measure_in_worker, n, sizes, work) for n in sizes.datasets}
            datasets = {name: job.result() for name, job in running.items()}
    results = {
        "sizes": asdict(sizes),
        "datasets": datasets,
        "jobs": jobs,
        "seconds": time.perf_counter() - started,
        "work": str(work),
    }
    (work / "kcurve.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="two small datasets, ε = 3, a 4-point grid (CI)"
    )
    parser.add_argument("--work", help="directory for the data, backbones and feature caches")
    parser.add_argument("--datasets", help=f"comma-separated, from {', '.join(DATASETS)}")
    parser.add_argument(
        "--jobs",
        type=int,
        help="datasets measured at once, one process each (default 2; --quick 1)",
    )
    parser.add_argument("--epsilons", help="comma-separated (default 1,3,8; --quick 3)")
    parser.add_argument("--repeats", type=int, help="seeds per figure (default 3; --quick 1)")
    parser.add_argument(
        "--benchmarks",
        help="markdown file to update (default: BENCHMARKS.md for a full run, none for --quick;"
        " '' = none)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.datasets:
        names = tuple(n.strip() for n in args.datasets.split(",") if n.strip())
        unknown = [n for n in names if n not in DATASETS]
        if unknown or not names:
            parser.error(f"--datasets {args.datasets!r}: use names from {', '.join(DATASETS)}")
        sizes = dataclasses.replace(sizes, datasets=names)
    if args.epsilons:
        try:
            epsilons = tuple(float(e) for e in args.epsilons.split(","))
        except ValueError:
            epsilons = ()
        if not epsilons or not all(0 < e < float("inf") for e in epsilons):
            parser.error(f"--epsilons {args.epsilons!r}: use positive numbers, e.g. 1,3,8")
        sizes = dataclasses.replace(sizes, epsilons=epsilons)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats {args.repeats}: use at least 1 seed")
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    if jobs < 1:
        parser.error(f"--jobs {args.jobs}: use at least 1")
    load_before = os.getloadavg()[0]
    results = run(sizes, Path(args.work) if args.work else None, jobs=jobs)
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m simulations.bench.kcurve_bench", *shown])
    table = render(results, command)
    print(table)
    print(headline(results))
    record_section(args.benchmarks, args.quick, HEADING, table, load_before)
    return results


if __name__ == "__main__":
    main()
