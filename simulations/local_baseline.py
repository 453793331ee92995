"""``ferry simulate --baseline local``: is federating worth it, for each institution?

After the federated run, each virtual institution trains alone on its own training split at
the same (ε, δ), with the run's settings (rounds, local epochs, its batch, lr, clipping bound,
class weights) and the same DP-SGD (Ferry's vectorised DP-SGD for a linear head, σ from its
own q and steps by the PRV accountant), on the same frozen features; its model is scored on
its own held-out split: the records the federated model's per-institution metric was computed
on. Both go into ``summary.json`` (``baseline``), the run's report and the printed table.

Simulation only, and a linear head on a classification task (what
:mod:`simulations.linear_federation` trains). The local models are never released: they
exist in the researcher's process, which holds every institution's data anyway.
"""

from __future__ import annotations

from pathlib import Path

from ferry.client.institution_settings import simulated_institution
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.training_defaults import rule_batch_size
from ferry.server.federation import FederationPlan
from ferry.server.outputs import write_summary
from ferry.simulations.linear_federation import (
    Privacy,
    TrainingSettings,
    extract_features,
    run_federation,
)

BASELINES = ("local",)
METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def check_baseline(baseline: str, cfg: RunConfig) -> None:
    """A one-line refusal, before the run, of a baseline that does not apply."""
    if not baseline:
        return
    if baseline not in BASELINES:
        raise FerryError(f"--baseline {baseline!r} is unknown: use --baseline local")
    if cfg.trainable != "head" or cfg.head != "linear" or cfg.task == "regression":
        raise FerryError(
            "--baseline local trains each institution's linear head alone: use --trainable "
            "head --head linear on a classification task, or leave --baseline out"
        )


def local_baseline(plan: FederationPlan, summary: dict, rounds: list[dict], log=print) -> dict:
    """Train each institution alone (see the module docstring); the ``baseline`` section,
    also written into ``summary.json``."""
    cfg = plan.cfg
    if cfg.task != "classification":
        raise FerryError("--baseline local covers classification tasks only")
    log("baseline: each institution alone, same ε, δ and settings, on its own held-out split")
    features = extract_features(cfg, plan.artifact, log=None)
    splits = features.splits(cfg.clients)
    settings = TrainingSettings(cfg.batch_size or 0, cfg.local_epochs, cfg.rounds, cfg.lr)
    privacy = Privacy(None if cfg.non_private else cfg.epsilon, cfg.delta, cfg.max_grad_norm, "prv")
    weights = cfg.class_weights(features.num_classes, cfg.task)
    evaluated = [r["per_institution"] for r in rounds if r.get("per_institution")]
    federated = evaluated[-1] if evaluated else {}
    institutions = {}
    for i, split in enumerate(splits):
        name = simulated_institution(cfg.scenario, i, plan.institution_names)
        local = run_federation(
            features,
            [split],
            settings,
            privacy,
            seed=cfg.seed + i,
            batch_rule=None if cfg.batch_size else rule_batch_size,
            class_weights=weights,
        )
        institutions[name] = {
            "train_examples": len(split[0]),
            "held_out_examples": len(split[1]),
            "local": {k: v for k, v in local.items() if k in METRICS},
            "federated": {k: federated.get(name, {}).get(k) for k in METRICS if k in local},
        }
    section = {
        "kind": "local",
        "what": "each institution trained alone on its own training split at the same "
        "(epsilon, delta) and settings; both models scored on its own held-out split",
        "institutions": institutions,
    }
    summary["baseline"] = section
    write_summary(Path(plan.out), summary)
    log(table(section))
    return section


def table(section: dict) -> str:
    """The printed comparison, one institution per line: accuracy and balanced accuracy
    (under label skew a model alone learns its own prior, which accuracy rewards and balanced
    accuracy does not)."""
    lines = [
        f"{'institution':<14} {'held-out':>8}  {'accuracy':>17}  {'balanced accuracy':>17}",
        f"{'':<14} {'':>8}  {'alone':>7} {'federated':>9}  {'alone':>7} {'federated':>9}",
    ]

    def cell(value, width: int) -> str:
        return f"{value:{width}.3f}" if isinstance(value, float) else f"{'–':>{width}}"

    for name, row in section["institutions"].items():
        local, fed = row["local"], row["federated"]
        lines.append(
            f"{name:<14} {row['held_out_examples']:>8}  {cell(local.get('accuracy'), 7)} "
            f"{cell(fed.get('accuracy'), 9)}  {cell(local.get('balanced_accuracy'), 7)} "
            f"{cell(fed.get('balanced_accuracy'), 9)}"
        )
    return "\n".join(lines)
