"""A run's output directory: ``metrics.jsonl`` (one line per round) and ``summary.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ferry.common.atomic_files import write_atomic
from ferry.common.errors import FerryError
from ferry.common.privacy.statement import privacy_statement

RUN_FILES = ("ledger.jsonl", "metrics.jsonl", "summary.json")
# Federated evaluation metrics carried into summary.json's "final" (those the task has).
FINAL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "roc_auc",
    "roc_auc_bin_error",
    "loss",
    "rmse",
    "mae",
    "r2",
    "directional_accuracy",
    "eval_examples",
)


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out``; refuse one that already holds a run, so nothing is overwritten."""
    out = Path(out)
    if any((out / f).exists() for f in RUN_FILES):
        raise FerryError(f"{out} already holds a run: choose a new --out (nothing was overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerryError(
            f"cannot create output directory {out} ({exc.strerror}): choose another --out"
        ) from None
    return out


def json_safe(obj):
    """``obj`` with every non-finite float spelled as JSON can hold it: NaN as null, ±inf as
    "inf" / "-inf" (also what :mod:`server.checkpoint` rewrites metrics.jsonl with)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_summary(out: Path, summary: dict) -> None:
    write_atomic(out / "summary.json", json.dumps(json_safe(summary), indent=2, sort_keys=True))


def institution_privacy(summary: dict) -> dict[str, dict]:
    """Per institution in ``summary.json``: ε spent, δ, rounds trained and its budget ε, as
    its signed reports said (what an exported model and ``ferry.Run`` state)."""
    keys = ("epsilon", "delta", "rounds", "budget_epsilon")
    return {
        name: {k: client[k] for k in keys if k in client}
        for name, client in sorted(summary.get("clients", {}).items())
    }


def build_summary(plan, state, end_reason: str, wall_time_s: float) -> dict:
    """``summary.json``: final metrics, per-institution privacy, traffic, wall time, and the
    privacy statement (:func:`common.privacy.statement.privacy_statement`: what each release
    covers, against whom, and what the accountant does not cover)."""
    cfg = plan.cfg
    rounds = state.rounds
    last = rounds[-1] if rounds else {"round": 0, "accuracy": None, "loss": None}
    eps = [c["epsilon"] for c in state.clients.values()]
    return {
        "run": {**cfg.to_record(), "run_id": plan.run_id},
        "rounds_completed": len(rounds),
        "end_reason": end_reason,
        "privacy": {
            **privacy_statement(cfg.delta, non_private=cfg.non_private),
            "non_private": cfg.non_private,
            "max_epsilon": max(eps) if eps else 0.0,
            "ledger": "ledger.jsonl (verify with `ferry audit`)",
        },
        "backbone": {
            "sha256": plan.artifact.sha256,
            "architecture": plan.artifact.manifest["architecture"],
            "bytes": plan.artifact.nbytes,
            "pretraining": plan.artifact.manifest.get("pretraining", {}),
        },
        "final": {
            "round": last["round"],
            "task": cfg.task,
            **{k: last.get(k) for k in FINAL_METRICS if k in last},
        },
        "clients": state.clients,
        "not_selected": {
            state.institutions.get(node, str(node)): why for node, why in state.exhausted.items()
        },
        "bytes": {
            "head_bytes": sum(int(v.nbytes) for v in state.arrays.values()),
            "full_backbone_bytes": plan.artifact.nbytes,
            # The largest array payload of any one message after round 1: head-sized once
            # every client holds the backbone.
            "largest_message_arrays_after_round_1": max(
                (r["bytes"]["largest_message_arrays"] for r in rounds[1:]), default=0
            ),
            "sent_total": sum(r["bytes"]["sent"] for r in rounds),
            "received_total": sum(r["bytes"]["received"] for r in rounds),
            "backbone_sent_total": sum(r["bytes"]["backbone_sent"] for r in rounds),
            "per_round": [{"round": r["round"], **r["bytes"]} for r in rounds],
        },
        "wall_time_s": round(wall_time_s, 2),
    }
