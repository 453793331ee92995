"""What federating buys: accuracy against the number of institutions at ε = 1, 3, 8, with
Ferry's default training settings and with the best of a grid.

Every figure is a DP linear head on a frozen backbone's features, trained with
:mod:`server.tuning` (the DP-SGD and FedAvg every Ferry client and server run, in one process;
σ from each institution's own q and steps at (ε, δ), RDP accountant, C = 1). Per dataset and ε:

* **central**: one institution holds every training record (K = 1, central DP);
* **federated**: K = 2, 5, 10 institutions, split as ``ferry simulate`` splits the dataset
  (its scenario's partition: Dirichlet label skew α = 0.5 for the image sets, IID for the
  breast-cancer table);
* **alone**: each of the K = 5 institutions trains by itself with the same (ε, δ) and rule;
* **non-private**: K = 1 and K = 5 without DP (the rule's non-private schedule).

Defaults: each institution's expected batch from its own n and the head's size
(:func:`common.training_defaults.rule_batch_size`) and the schedule of
:func:`common.training_defaults.rule_schedule` for the run's ε, averaged over ``repeats`` seeds.
For K = 1 and K = 5 also the best of the grid (:func:`server.tuning.grid_search`: every point
once, the ``top`` ones again over the same seeds as the defaults) and the gap in points.

Scoring: every row, the alone rows included, is scored on the same records: the pooled
held-out 20% of all institutions (held-out membership is a function of each record alone, so
it does not move with K). For two classes, balanced accuracy and ROC AUC too.

Run: ``python -m simulations.bench.kcurve_bench [--quick] [--work DIR]
[--datasets digits,hospital-imaging,breast-cancer] [--epsilons 1,3,8] [--repeats 3]
[--jobs 2]``; data, backbones and features are cached in ``--work``; ``--jobs`` datasets run
at once, each in its own process (the full run: about 17 min of one core's time, chiefly σ
searches and digits' 1,280-feature head; about 10 min on two idle cores with ``--jobs 2``). The full run writes its tables to ``BENCHMARKS.md``
(:data:`HEADING`), ``--quick`` (about a minute: two small datasets, ε = 3, a 4-point grid, one
seed) nothing unless ``--benchmarks`` names a file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ferry.common.config import RunConfig
from ferry.common.training_defaults import rule_batch_size, rule_schedule
from ferry.server.tuning import (
    GRID_BATCH,
    GRID_LR,
    GRID_SCHEDULE,
    FeatureSet,
    Privacy,
    TrainingSettings,
    extract_features,
    grid,
    grid_search,
    mean_metrics,
    repeated,
)
from ferry.simulations.bench.report import record_section

HEADING = (
    "## What federating buys: accuracy vs number of institutions at ε = 1, 3, 8 "
    "(defaults vs best of grid)"
)
WITHIN_POINTS = 2.0  # the defaults' promise: within this many points of the best of the grid


@dataclass(frozen=True)
class KCurveSizes:
    # Longest first: with two processes, digits runs beside the other two.
    datasets: tuple[str, ...] = ("digits", "hospital-imaging", "breast-cancer")
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    federated: tuple[int, ...] = (2, 5, 10)
    tuned: tuple[int, ...] = (1, 5)  # institution counts also searched over the grid
    alone: int = 5  # each institution of this split also trains alone
    repeats: int = 3
    top: int = 4  # grid points confirmed over ``repeats`` seeds
    batches: tuple[int, ...] = GRID_BATCH
    schedules: tuple[tuple[int, int], ...] = GRID_SCHEDULE  # (rounds, local epochs)
    lrs: tuple[float, ...] = GRID_LR
    delta: float = 1e-5
    synthetic_examples: int = 4000  # hospital-imaging records
    pretrain_examples: int = 8000  # hospital-imaging synthetic source task
    pretrain_epochs: int = 4
    tabular_pretrain_epochs: int = 30  # breast-cancer encoder, on the public 30%
    digits_size: int = 128
    digits_images: int | None = None  # None: all 1,797


FULL = KCurveSizes()
QUICK = KCurveSizes(
    datasets=("breast-cancer", "hospital-imaging"),
    epsilons=(3.0,),
    federated=(2, 5),
    repeats=1,
    top=2,
    batches=(512,),  # above most institutions' n: q = 1, whose σ costs no search
    schedules=((5, 3), (6, 5)),
    lrs=(0.5, 2.0),
    synthetic_examples=800,
    pretrain_examples=800,
    pretrain_epochs=2,
    tabular_pretrain_epochs=10,
)


# --- datasets: each returns (run config of its data, backbone artifact, description) ---


def _digits(sizes: KCurveSizes, work: Path, log):
    from ferry.common.serialization import load_artifact
    from ferry.server.backbone_import import import_backbone
    from ferry.simulations.bench.transfer_bench import write_digits_folder

    data = work / "digits"
    if not data.exists():
        partial = work / "digits.partial"
        write_digits_folder(partial, sizes.digits_images)
        partial.rename(data)
    weights = work / f"backbone-lite0-imagenet-{sizes.digits_size}"
    if not weights.exists():
        import_backbone("efficientnet_lite0", "imagenet", sizes.digits_size, weights, log)
    cfg = RunConfig(
        scenario="hospital-imaging",
        data=str(data),
        backbone="efficientnet_lite0",
        partition="dirichlet",
        alpha=0.5,
    )
    count = sum(1 for _ in data.rglob("*.png"))
    text = (
        f"scikit-learn `load_digits` ({count:,} 8×8 grayscale digits, 10 classes) as PNGs "
        f"upsampled to {sizes.digits_size}×{sizes.digits_size}×3; backbone: EfficientNet-Lite0 "
        "with ImageNet weights"
    )
    return cfg, load_artifact(weights), text


def _breast_cancer(sizes: KCurveSizes, work: Path, log):
    from ferry.common.data.datasets import DataSpec
    from ferry.common.serialization import load_artifact
    from ferry.server.pretrain import PretrainConfig, pretrain
    from ferry.simulations.breast_cancer import LABEL, write_tables

    public, hospitals = write_tables(work / "breast-cancer")
    encoder = work / f"backbone-breast-cancer-{sizes.tabular_pretrain_epochs}"
    if not encoder.exists():
        read_as = DataSpec.from_run(
            RunConfig(scenario="hospital-tabular", label_column=LABEL), 1, (1,)
        )
        pretrain(
            PretrainConfig(
                scenario="hospital-tabular",
                data=str(public),
                epochs=sizes.tabular_pretrain_epochs,
                batch_size=32,
                out=str(encoder),
                data_spec=read_as,
            ),
            log=log,
        )
    cfg = RunConfig(
        scenario="hospital-tabular", data=str(hospitals), label_column=LABEL, partition="iid"
    )
    text = (
        "scikit-learn breast cancer (569 patients, 30 measurements, malignant vs benign): the "
        f"hospitals' 70%; backbone: the hospital-tabular encoder pretrained "
        f"({sizes.tabular_pretrain_epochs} epochs) on the other 30%, the server's public cohort"
    )
    return cfg, load_artifact(encoder), text


def _hospital_imaging(sizes: KCurveSizes, work: Path, log):
    from ferry.common.serialization import load_artifact
    from ferry.server.pretrain import PretrainConfig, pretrain

    encoder = work / f"backbone-hospital-imaging-{sizes.pretrain_examples}-{sizes.pretrain_epochs}"
    if not encoder.exists():
        pretrain(
            PretrainConfig(
                scenario="hospital-imaging",
                examples=sizes.pretrain_examples,
                epochs=sizes.pretrain_epochs,
                out=str(encoder),
            ),
            log=log,
        )
    cfg = RunConfig(scenario="hospital-imaging", examples=sizes.synthetic_examples)
    text = (
        f"the `hospital-imaging` synthetic preset ({sizes.synthetic_examples:,} scans of 4 "
        f"lesion types); backbone: ferry-cnn pretrained on the preset's synthetic source task "
        f"({sizes.pretrain_examples:,} images, {sizes.pretrain_epochs} epochs)"
    )
    return cfg, load_artifact(encoder), text


DATASETS = {
    "digits": _digits,
    "breast-cancer": _breast_cancer,
    "hospital-imaging": _hospital_imaging,
}


def load_features(name: str, sizes: KCurveSizes, work: Path, log=print) -> tuple[FeatureSet, str]:
    """``name``'s FeatureSet and description; features cached in ``work`` under a key of the
    data settings and the backbone's hash (the data files stay there too: splits read them)."""
    from ferry.common.scenarios import with_scenario_defaults

    cfg, artifact, text = DATASETS[name](sizes, work, log)
    settings = json.dumps(asdict(cfg), sort_keys=True, default=str) + artifact.sha256
    cache = work / f"features-{name}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        features = FeatureSet(
            x=saved["x"],
            y=saved["y"],
            task=saved["task"],
            num_classes=int(saved["num_classes"]),
            cfg=dataclasses.replace(with_scenario_defaults(cfg), task=saved["task"]),
            input_shape=tuple(saved["input_shape"]),
        )
    else:
        features = extract_features(cfg, artifact, log=log)
        saved = {
            "x": features.x,
            "y": features.y,
            "task": features.task,
            "num_classes": features.num_classes,
            "input_shape": list(features.input_shape),
        }
        torch.save(saved, cache.with_suffix(".partial"))
        os.replace(cache.with_suffix(".partial"), cache)
    return features, f"{text} ({features.x.shape[1]:,} features)"


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


# --- the report ---


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _sizes(ns: list[int]) -> str:
    return f"{ns[0]:,}" if len(ns) == 1 else f"{min(ns):,}–{max(ns):,}"


def _row_label(row: dict) -> str:
    k, ns = row["institutions"], row["train_examples"]
    if row["row"] == "alone":
        return f"each of the {k} alone ({_sizes(ns)})"
    if row["row"] == "central" or (row["row"] == "non-private" and k == 1):
        return f"1, central ({_sizes(ns)})"
    return f"{k} federated ({_sizes(ns)} each)"


def _accuracy(row: dict) -> str:
    if row["row"] != "alone":
        return _pct(row["defaults"]["accuracy"])
    accs = [m["accuracy"] for m in row["each"]]
    return f"{_pct(np.mean(accs))} ({_pct(min(accs))}–{_pct(max(accs))})"


def render(results: dict, command: str) -> str:
    s = results["sizes"]
    grid_text = (
        f"expected batch {{{', '.join(map(str, s['batches']))}}} (capped at n) × (rounds, local "
        f"epochs) {{{', '.join(f'({r}, {e})' for r, e in s['schedules'])}}} × learning rate "
        f"{{{', '.join(f'{lr:g}' for lr in s['lrs'])}}}"
    )
    seeds = f"{s['repeats']} seed{'s' if s['repeats'] > 1 else ''}"
    lines = [
        f"Command: `{command}` ({results['seconds'] / 60:.1f} min in all, "
        f"{results['jobs']} dataset{'s' if results['jobs'] > 1 else ''} at a time). A DP linear "
        "head on frozen features, trained in-process by `server.tuning` (Ferry's DP-SGD and "
        f"FedAvg; σ per institution from its own q and steps at (ε, δ = {s['delta']:g}), RDP "
        "accountant, C = 1). **Defaults**: each institution's batch from its own n and the "
        "head's size (`rule_batch_size`), epochs, rounds and learning rate from "
        f"`rule_schedule`; mean of {seeds}. **Best of grid** (1 and 5 institutions): "
        f"{grid_text}, every point once, the best {s['top']} again over the defaults' {seeds}; "
        "the best of those (a maximum over noisy means: it flatters the grid). Every row, the "
        "institutions alone included, is scored on the same records: the pooled held-out 20% "
        "of all institutions. Each institution alone has the same (ε, δ) and rule.",
    ]
    verdicts = []
    for name, d in results["datasets"].items():
        binary = d["classes"] == 2
        split = (
            f"Dirichlet label skew α = {d['alpha']:g}"
            if d["partition"] == "dirichlet"
            else d["partition"].upper()
        )
        lines += [
            "",
            f"### {name}",
            "",
            f"Data: {d['description']}; {d['records']:,} records, {split} among institutions, "
            f"{d['held_out']:,} held out ({d['seconds'] / 60:.1f} min).",
            "",
            "| ε | institutions (training examples) | defaults: accuracy | "
            + ("balanced accuracy | ROC AUC | " if binary else "")
            + "best of grid: accuracy (setting) | defaults − best (points) | within "
            f"{WITHIN_POINTS:g} points |",
            "|---|---|---|" + ("---|---|" if binary else "") + "---|---|---|",
        ]
        for row in d["rows"]:
            eps = "∞ (no DP)" if row["epsilon"] is None else f"{row['epsilon']:g}"
            cells = [eps, _row_label(row), _accuracy(row)]
            if binary:
                m = row["defaults"]
                cells += [f"{m['balanced_accuracy']:.3f}", f"{m.get('roc_auc', float('nan')):.3f}"]
            if "grid" in row:
                g = row["grid"]
                cells += [
                    f"{_pct(g['metrics']['accuracy'])} ({g['best']})",
                    f"{row['gap_points']:+.1f}",
                    "PASS" if row["within"] else "**FAIL**",
                ]
                verdicts.append((name, row))
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", interpret(name, d)]
    failed = [
        f"{n} ε={r['epsilon']:g} K={r['institutions']}" for n, r in verdicts if not r["within"]
    ]
    lines += [
        "",
        f"Defaults within {WITHIN_POINTS:g} points of the best of the grid in "
        f"{len(verdicts) - len(failed)} of {len(verdicts)} cells"
        + (f"; not in: {', '.join(failed)}." if failed else "."),
    ]
    return "\n".join(lines) + "\n"


def _pick(d: dict, kind: str, k: int, eps) -> dict | None:
    for row in d["rows"]:
        if row["row"] == kind and row["institutions"] == k and row["epsilon"] == eps:
            return row
    return None


def interpret(name: str, d: dict) -> str:
    """One sentence on ``name``'s K-curve at the middle ε, from the table's own figures."""
    epsilons = sorted({r["epsilon"] for r in d["rows"] if r["epsilon"] is not None})
    eps = epsilons[len(epsilons) // 2]
    lone = next(r for r in d["rows"] if r["row"] == "alone" and r["epsilon"] == eps)
    k = lone["institutions"]
    fed, central = _pick(d, "federated", k, eps), _pick(d, "central", 1, eps)
    accs = [m["accuracy"] for m in lone["each"]]
    text = (
        f"{name}, ε = {eps:g}: {k} institutions of ~{np.mean(lone['train_examples']):,.0f} "
        f"training examples reach {_pct(fed['defaults']['accuracy'])} federated against "
        f"{_pct(np.mean(accs))} ({_pct(min(accs))}–{_pct(max(accs))}) each alone"
    )
    others = sorted(
        r["institutions"]
        for r in d["rows"]
        if r["row"] == "federated" and r["epsilon"] == eps and r["institutions"] != k
    )
    for other in others:
        r = _pick(d, "federated", other, eps)
        text += (
            f"; {other} of ~{np.mean(r['train_examples']):,.0f} reach "
            f"{_pct(r['defaults']['accuracy'])}"
        )
    text += (
        f"; one institution holding all {central['train_examples'][0]:,} reaches "
        f"{_pct(central['defaults']['accuracy'])} (central DP)"
    )
    private = _pick(d, "non-private", 1, None)
    if private:
        text += f", {_pct(private['defaults']['accuracy'])} without DP"
    return text + "."


def headline(results: dict, name: str | None = None) -> str:
    """One sentence for the README: what federating bought on ``name`` (default: the demo's
    preset, hospital-imaging, when it ran; else the first dataset)."""
    datasets = results["datasets"]
    name = name or ("hospital-imaging" if "hospital-imaging" in datasets else next(iter(datasets)))
    return "On " + interpret(name, datasets[name])


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
