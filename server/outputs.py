"""A run's output directory: ``metrics.jsonl`` (one line per round) and ``summary.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from common.errors import FerryError

RUN_FILES = ("metrics.jsonl", "summary.json")


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


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_json_safe(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(summary), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "summary.json")
