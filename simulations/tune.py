"""``ferry tune``: choose training settings on public data, at no privacy cost.

Input: a verified backbone directory and *public* data: the scenario's built-in synthetic
pretraining source task (default), or a file or folder the operator names with ``--data``,
which must be public (tuning on it spends no privacy only because no one's privacy is in it).
No institution's data is read, and nothing is sent anywhere.

For each ε asked for, :func:`simulations.linear_federation.grid_search` trains federations
of DP linear heads over K simulated institutions of that public data (the mechanism every
Ferry client runs, at that ε and δ) and keeps the settings with the best mean held-out
accuracy; the DP-aware rule (:mod:`common.training_defaults`) is scored on the same data for
comparison.

Output: ``DIR/tuning.json`` (:mod:`server.tuning` describes it), merged into any existing
record of the same backbone, one entry per ε. ``ferry simulate`` and ``ferry
server`` read it with :func:`server.tuning.load_tuned`; options given on their command line
still win.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path

from ferry.common.backbones.registry import backbone_spec
from ferry.common.config import RunConfig
from ferry.common.data.datasets import DataSpec, _split, load_dataset
from ferry.common.data.preprocess import preprocess
from ferry.common.errors import FerryError
from ferry.common.metrics import headline_metric
from ferry.common.scenarios import get_scenario, with_scenario_defaults
from ferry.common.serialization import load_artifact
from ferry.common.training_defaults import rule_batch_size, rule_schedule
from ferry.server.tuning import epsilon_key, read_tuning, tuning_path, write_tuning
from ferry.simulations import linear_federation as federation
from ferry.simulations.linear_federation import Privacy, TrainingSettings

# ``--quick``: four grid points, two seeds (a smoke test, or a first look).
QUICK_GRID = {"batch_size": (64, 256), "schedules": ((5, 3),), "lr": (0.5, 2.0)}
FULL_GRID = {
    "batch_size": federation.GRID_BATCH,
    "schedules": federation.GRID_SCHEDULE,
    "lr": federation.GRID_LR,
}


def parse_epsilons(text: str) -> list[float]:
    """``--epsilon`` as a comma list of positive, finite numbers (duplicates dropped)."""
    fix = "give positive, finite ε values as a comma list, e.g. --epsilon 1,3,8"
    values: list[float] = []
    for part in str(text).split(","):
        try:
            eps = float(part)
        except ValueError:
            raise FerryError(f"--epsilon {text!r} is invalid: {fix}") from None
        if not (math.isfinite(eps) and eps > 0):
            raise FerryError(f"--epsilon {text!r} is invalid: {fix}")
        if eps not in values:
            values.append(eps)
    return values


def scenario_of(manifest: dict) -> str:
    """The scenario a backbone was pretrained for, as its manifest records it ("" if none)."""
    pre = manifest.get("pretraining") or {}
    kind = str(pre.get("kind", ""))
    if pre.get("scenario"):
        return str(pre["scenario"])
    return kind.removeprefix("synthetic-") if kind.startswith("synthetic-") else ""


def describe_data(cfg: RunConfig, split: str, records: int) -> dict:
    """What public data the settings were tuned on, for the record."""
    if split == "source":
        return {
            "kind": "synthetic-source",
            "scenario": cfg.scenario,
            "split": "source",
            "examples": records,
            "seed": cfg.seed,
        }
    path = Path(cfg.data)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        kind = {"kind": "file", "sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    else:
        files = [p for p in path.rglob("*") if p.is_file()]
        kind = {
            "kind": "folder",
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
        }
    return {**kind, "path": str(path.resolve()), "scenario": cfg.scenario, "records": records}


def _check_inputs(cfg: RunConfig, weights: str, epsilons: list[float], seed: int | None):
    """Everything that can be refused before any work: returns (artifact, cfg with the
    scenario's defaults and the public data's seed, split, splits, record)."""
    if not epsilons:
        raise FerryError("--epsilon names no ε: give a comma list, e.g. --epsilon 1,3,8")
    if weights in ("", "random"):
        raise FerryError(
            "--weights must name a backbone directory (a `ferry pretrain` or `ferry "
            "import-backbone` output): its tuned settings are recorded next to it"
        )
    if Path(weights).exists() and not Path(weights).is_dir():
        raise FerryError(f"--weights {weights} is a file: give the backbone's directory")
    artifact = load_artifact(weights)  # verified; a missing or corrupt backbone fails here
    pretrained_on = scenario_of(artifact.manifest)
    if not cfg.scenario and not pretrained_on:
        raise FerryError(
            f"the backbone at {weights} does not record the scenario it was pretrained for: "
            "name the --scenario whose public data to tune on"
        )
    cfg = dataclasses.replace(cfg, scenario=cfg.scenario or pretrained_on)
    get_scenario(cfg.scenario)  # an unknown name fails here, listing the known ones
    if cfg.task == "regression":
        raise FerryError("tuning covers classification only: drop --task regression")
    split = "target" if cfg.data else "source"
    cfg = with_scenario_defaults(cfg)
    if split == "source":
        cfg = federation.source_config(cfg)
    if seed is None:  # synthetic source records the backbone was not pretrained on
        pre = artifact.manifest.get("pretraining") or {}
        fresh = split == "source" and pretrained_on == cfg.scenario and "seed" in pre
        seed = (int(pre["seed"]) + 1) % 2**32 if fresh else cfg.seed
    cfg = dataclasses.replace(cfg, seed=seed).validate()
    modality = backbone_spec(artifact.manifest.get("architecture", "")).modality
    shape = tuple(artifact.manifest["input_shape"])
    dataset = load_dataset(DataSpec.from_run(cfg, 1, shape), split)
    if dataset.task != "classification":
        raise FerryError(
            f"tuning covers classification only, and the public data of {cfg.scenario} is "
            f"{dataset.task}: tune on a classification task"
        )
    if dataset.modality != modality:
        raise FerryError(
            f"backbone {artifact.manifest.get('architecture')} takes {modality} data but the "
            f"public {cfg.scenario} data is {dataset.modality}: pass the --scenario it was "
            "pretrained for"
        )
    preprocess(dataset.x[:1], artifact.manifest["preprocessing"])  # a layout it cannot read
    spec = DataSpec.from_run(cfg, cfg.clients, shape)
    splits = []
    if len(dataset) >= cfg.clients:
        splits = _split(spec, split)
    if (
        not splits
        or any(len(train) < 1 for train, _ in splits)
        or not any(len(test) for _, test in splits)
    ):
        raise FerryError(
            f"--clients {cfg.clients} is more than the {len(dataset)} public records allow "
            "(each institution needs training records, and some must be held out): give "
            "fewer --clients or more public records (--examples)"
        )
    record = read_tuning(weights, artifact.sha256)  # a foreign record fails here
    return artifact, cfg, split, splits, record


def tune(
    cfg: RunConfig,
    weights: str,
    epsilons: list[float],
    quick: bool = False,
    seed: int | None = None,
    log=print,
) -> dict:
    """Tune at each of ``epsilons`` on ``cfg``'s public data (its ``--data``, else the
    scenario's synthetic source task) over ``cfg.clients`` simulated institutions; merge the
    entries into ``weights``/tuning.json and return the record written.

    ``cfg.scenario`` "": the one the backbone was pretrained for. ``seed`` (of the synthetic
    records, partitions and held-out split) None: the backbone's pretraining seed + 1, so the
    source records are not the ones it was fitted on."""
    artifact, cfg, split, splits, record = _check_inputs(cfg, weights, epsilons, seed)
    axes = QUICK_GRID if quick else FULL_GRID
    points = federation.grid(axes["batch_size"], axes["schedules"], axes["lr"])
    repeats, top = (2, 2) if quick else (3, 4)
    where = cfg.data or f"the {cfg.scenario} synthetic source task (public)"
    log(
        f"tuning on {where}: {cfg.clients} simulated institutions "
        f"({', '.join(str(len(t)) for t, _ in splits)} training records), δ={cfg.delta:g}, "
        f"{len(points)} settings per ε; no institution's data is read, no privacy is spent"
    )
    features = federation.extract_features(cfg, artifact, log=log, split=split)
    data = describe_data(cfg, split, len(features.y))
    weights_of = cfg.class_weights(features.num_classes, features.task)
    metric = headline_metric(features.task)
    for eps in epsilons:
        started = time.perf_counter()
        privacy = Privacy(eps, cfg.delta, cfg.max_grad_norm)
        found = federation.grid_search(
            features,
            splits,
            privacy,
            points,
            metric=metric,
            repeats=repeats,
            top=top,
            log=log,
            class_weights=weights_of,
        )
        rule = _rule_metrics(features, splits, privacy, repeats, weights_of)
        key = epsilon_key(eps)
        replaced = key in record["entries"]
        record["entries"][key] = _entry(found, rule, cfg, data, splits, axes, repeats)
        write_tuning(weights, record)  # after each ε: an interruption keeps the rest
        best = found.best_metrics[metric]
        log(
            f"ε={eps:g}: best {found.best.label()} accuracy {best:.3f} ({repeats} seeds); "
            f"rule accuracy {rule['metrics']['accuracy']:.3f} "
            f"({time.perf_counter() - started:.0f}s)"
            + (f"; replaced the earlier ε={eps:g} entry" if replaced else "")
        )
    log(
        f"wrote {tuning_path(weights)} (ε {', '.join(sorted(record['entries'], key=float))}"
        f"); `ferry simulate --weights {weights} --epsilon E` uses the entry for E"
    )
    return record


def _rule_metrics(features, splits, privacy: Privacy, repeats: int, class_weights) -> dict:
    """The DP-aware rule's settings at this ε and its mean metrics on the same data."""
    schedule = rule_schedule(RunConfig(epsilon=privacy.epsilon))
    settings = TrainingSettings(0, schedule.local_epochs, schedule.rounds, schedule.lr)
    metrics = federation.repeated(
        features,
        splits,
        settings,
        privacy,
        repeats,
        first_seed=1,
        batch_rule=rule_batch_size,
        class_weights=class_weights,
    )
    return {
        "batch_size": [
            federation.batch_for(settings, len(t), rule_batch_size, features.head_size)
            for t, _ in splits
        ],
        "local_epochs": schedule.local_epochs,
        "rounds": schedule.rounds,
        "lr": schedule.lr,
        "metrics": metrics,
    }


def _entry(found, rule: dict, cfg: RunConfig, data: dict, splits, axes, repeats: int) -> dict:
    return {
        **dataclasses.asdict(found.best),
        "metric": headline_metric("classification"),  # tuning covers classification only
        "metrics": found.best_metrics,
        "seeds": repeats,
        "rule": rule,
        "data": data,
        "clients": cfg.clients,
        "institution_examples": [len(t) for t, _ in splits],
        "partition": cfg.partition,
        "alpha": cfg.alpha,
        "delta": cfg.delta,
        "max_grad_norm": cfg.max_grad_norm,
        "grid": {
            "batch_size": list(axes["batch_size"]),
            "rounds_local_epochs": [list(s) for s in axes["schedules"]],
            "lr": list(axes["lr"]),
        },
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
