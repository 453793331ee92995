"""``ferry export RUN_DIR --out MODEL_DIR``: a run's final model as a self-contained folder.

``MODEL_DIR`` holds (:mod:`common.exported_model` reads it back, anywhere, without the run):

* ``backbone.safetensors``: the frozen backbone's weights (found through the run's
  reference, :mod:`server.final_model`, and checked against its sha256);
* ``trainable.safetensors``: the federation's trained part (head, adapters or last block);
* ``manifest.json``: the architecture and input shape, the preprocessing (from the backbone's
  own manifest, covered by its hash), the trainable part's settings, the task and the class
  names, the sha256 of both weight files, and the privacy statement: the unit of privacy,
  each institution's spent ε and δ, the accountant, and what else the run released.

Nothing is overwritten: an existing non-empty ``MODEL_DIR`` is refused, and the folder
appears only once it is complete (written beside it, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import fsync_dir
from ferry.common.errors import FerryError
from ferry.common.exported_model import (
    BACKBONE_FILE,
    FORMAT,
    MANIFEST_FILE,
    TRAINABLE_FILE,
    TRAINABLE_SETTINGS,
)
from ferry.common.serialization import BackboneArtifact, file_sha256, load_artifact, verify
from ferry.server.final_model import read_final_model
from ferry.server.outputs import institution_privacy
from ferry.server.pretrain import random_artifact


def _backbone(record: dict, weights: str | None) -> BackboneArtifact:
    """The run's backbone, verified against its sha256 (``weights`` overrides the reference)."""
    sha = record["backbone_sha256"]
    ref = record["backbone"]
    where = weights or ref["weights"]
    if where == "random":
        artifact = random_artifact(
            record["architecture"], int(ref.get("seed", 0)), tuple(record["input_shape"])
        )
        verify(artifact, sha)
        return artifact
    try:
        return load_artifact(where, sha)
    except FerryError as exc:
        raise FerryError(
            f"the run's backbone ({sha[:12]}) is not at {where} as it was ({exc}): pass "
            "--backbone-weights DIR with the weights the run used"
        ) from None


def _privacy(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary.get("privacy", {}), "institutions": institution_privacy(summary)}


def export_model(run_dir: str | Path, out: str | Path, weights: str | None = None) -> Path:
    """Write ``run_dir``'s final model to ``out`` (see the module docstring); returns ``out``."""
    from safetensors.numpy import save_file

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FerryError(f"{out} already exists: choose a new --out (nothing was overwritten)")
    record, arrays = read_final_model(run_dir)
    if record["rounds_completed"] < 1:
        raise FerryError(
            f"the run in {run_dir} trained no round ({record['end_reason']}): nothing to export"
        )
    artifact = _backbone(record, weights)
    config = record["config"]
    manifest = {
        "format": FORMAT,
        "architecture": record["architecture"],
        "input_shape": record["input_shape"],
        "backbone_sha256": artifact.sha256,
        "backbone_manifest": artifact.manifest,
        "trainable": {k: config[k] for k in TRAINABLE_SETTINGS if k in config},
        "data": {
            k: config[k]
            for k in ("scenario", "label-column", "categorical", "smiles-column", "window")
            if k in config
        },
        "task": record["task"],
        "num_classes": record["num_classes"],
        "classes": record["classes"],
        "rounds_completed": record["rounds_completed"],
        "run": str(run_dir.resolve()),
        "privacy": _privacy(run_dir),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        backbone = {k: np.ascontiguousarray(v) for k, v in artifact.tensors.items()}
        save_file(backbone, str(tmp / BACKBONE_FILE))
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / TRAINABLE_FILE)
        )
        manifest["files"] = {
            name: file_sha256(tmp / name) for name in (BACKBONE_FILE, TRAINABLE_FILE)
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for written in tmp.iterdir():
            fd = os.open(written, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
