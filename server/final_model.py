"""The run's final global model, written when the run ends: ``<out>/model/``.

* ``trainable.safetensors``: the aggregated trainable arrays after the last completed round
  (head, adapters or last block: only what trained);
* ``model.json``: the backbone by sha256 and where this server read it (its weights
  directory, or ``"random"`` with the seed and input shape that rebuild it), the run config,
  the task, the class names, the rounds completed and why the run ended.

The backbone is referenced, not copied (it can be large): ``ferry export``
(:mod:`server.model_export`) finds it by that reference, checks its hash, and writes a
self-contained model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import atomic_path, write_atomic
from ferry.common.errors import FerryError
from ferry.server.backbone_source import default_weights_dir

MODEL_DIR = "model"
MODEL_FILE = "model.json"
TRAINABLE_FILE = "trainable.safetensors"
FORMAT = 1


def backbone_reference(cfg, architecture: str) -> dict:
    """Where the run's backbone can be found again (``cfg.weights`` as the server resolved it)."""
    if cfg.weights == "random":
        return {"weights": "random", "seed": cfg.seed}
    path = Path(cfg.weights) if cfg.weights else default_weights_dir(architecture, cfg.scenario)
    return {"weights": str(path.resolve())}


def write_final_model(plan, state, end_reason: str) -> Path:
    """Write ``<out>/model/`` for the run ``plan`` ran to its end (``state``'s arrays)."""
    from safetensors.numpy import save_file  # as common.serialization: not for `ferry --help`

    folder = plan.out / MODEL_DIR
    folder.mkdir(exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.arrays.items()}
    with atomic_path(folder / TRAINABLE_FILE) as tmp:
        save_file(arrays, str(tmp))
    record = {
        "format": FORMAT,
        "backbone_sha256": plan.artifact.sha256,
        "architecture": plan.artifact.manifest["architecture"],
        "input_shape": list(plan.artifact.manifest["input_shape"]),
        "backbone": backbone_reference(plan.cfg, plan.artifact.manifest["architecture"]),
        "config": plan.cfg.to_record(),
        "task": plan.cfg.task,
        "num_classes": plan.num_classes,
        "classes": list(plan.class_names),
        "rounds_completed": len(state.rounds),
        "end_reason": end_reason,
    }
    write_atomic(folder / MODEL_FILE, json.dumps(record, indent=2, sort_keys=True))
    return folder


def read_final_model(run_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The final model a run left (its record and trainable arrays); a one-line FerryError
    when there is none (the run did not finish) or it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    folder = run_dir / MODEL_DIR
    if not (run_dir / "summary.json").is_file() or not (folder / MODEL_FILE).is_file():
        raise FerryError(
            f"{run_dir} holds no finished run (no summary.json and {MODEL_DIR}/{MODEL_FILE}): "
            "export a run directory after its run ended (resume an interrupted deployed run "
            "with `ferry server --resume`)"
        )
    try:
        record = json.loads((folder / MODEL_FILE).read_text())
        arrays = load_file(str(folder / TRAINABLE_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise FerryError(
            f"the final model in {folder} cannot be read ({str(exc).splitlines()[0][:120]}): "
            "it was damaged after the run; re-run it"
        ) from None
    if record.get("format") != FORMAT:
        raise FerryError(f"{folder / MODEL_FILE} is not a format-{FORMAT} model record")
    return record, arrays
