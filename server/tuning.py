"""The record ``ferry tune`` leaves next to a backbone (``DIR/tuning.json``), read and written.

:mod:`simulations.tune` chooses the settings (on public data, in-process federations of
:mod:`simulations.linear_federation`) and writes them here; the server's planners read them
back with :func:`load_tuned` (:mod:`server.backbone_source`) when a run leaves them out.

DIR/tuning.json: {"format": TUNING_FORMAT, "backbone_sha256": ..., "entries": {ε key: entry}}.
An entry holds the settings chosen at that ε (TUNED_FIELDS), their mean metrics, the rule's
metrics on the same data, and how it was tuned (public data, clients, δ, grid). Each entry
carries its own description because a later `ferry tune` merges into the file and may use
other data, clients or δ. Fields are only ever added; a reader ignores ones it does not know.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ferry.common.atomic_files import write_atomic
from ferry.common.config import _LIMITS, RunConfig
from ferry.common.errors import FerryError
from ferry.common.training_defaults import TUNED_FIELDS

TUNING_FILE = "tuning.json"
TUNING_FORMAT = "ferry-tuning/1"


def epsilon_key(epsilon: float) -> str:
    """The stable key of an ε in tuning.json: ``repr(float(ε))`` ("3.0", "0.5")."""
    return repr(float(epsilon))


def tuning_path(weights_dir) -> Path:
    """Where a backbone's tuning record lives (``weights_dir`` may name its weights file)."""
    path = Path(weights_dir)
    if path.suffix in (".safetensors", ".json") and not path.is_dir():
        path = path.parent
    return path / TUNING_FILE


def _malformed(path: Path, why: str) -> FerryError:
    return FerryError(f"{path} {why}: rerun `ferry tune --weights {path.parent}` or delete {path}")


def _check_settings(path: Path, key: str, entry: object) -> dict:
    """The four tuned settings of one entry, each of the type and range a run accepts."""
    if not isinstance(entry, dict):
        raise _malformed(path, f"is malformed (entry {key} is not an object)")
    out = {}
    for name in TUNED_FIELDS:
        value = entry.get(name)
        if name == "lr":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and value > 0
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and 1 <= value <= _LIMITS[name]
        if not ok:
            raise _malformed(path, f"is malformed (entry {key}: {name} {value!r})")
        out[name] = float(value) if name == "lr" else int(value)
    return out


def read_tuning(weights_dir, sha256: str) -> dict:
    """The tuning record of the backbone ``sha256`` in ``weights_dir`` (a new, empty one when
    there is none). A one-line FerryError naming the fix when the file is unreadable,
    malformed, or belongs to another backbone (tuned settings fit the backbone they were
    tuned on)."""
    path = tuning_path(weights_dir)
    if not path.exists():
        return {"format": TUNING_FORMAT, "backbone_sha256": sha256, "entries": {}}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _malformed(path, f"is unreadable ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(record, dict) or record.get("format") != TUNING_FORMAT:
        raise _malformed(path, f"is malformed (not a {TUNING_FORMAT} record)")
    if record.get("backbone_sha256") != sha256:
        named = str(record.get("backbone_sha256"))[:12]
        raise FerryError(
            f"{path} holds settings tuned for backbone {named}, not this backbone "
            f"{sha256[:12]}: rerun `ferry tune --weights {path.parent}` or delete {path}"
        )
    entries = record.get("entries")
    if not isinstance(entries, dict):
        raise _malformed(path, "is malformed (no entries object)")
    for key, entry in entries.items():
        try:
            float(key)
        except ValueError:
            raise _malformed(path, f"is malformed (entry key {key[:20]!r} is no ε)") from None
        _check_settings(path, key, entry)
    return record


def write_tuning(weights_dir, record: dict) -> Path:
    """Write ``record`` to ``weights_dir``/tuning.json atomically (a fsynced temporary file
    renamed over it): a reader sees the old record or the new one, never a torn one. The
    backbone's own files are not touched."""
    return write_atomic(
        tuning_path(weights_dir), json.dumps(record, indent=2, sort_keys=True) + "\n"
    )


def load_tuned(weights_dir, sha256: str, cfg: RunConfig) -> dict | None:
    """The settings ``ferry tune`` recorded with the backbone ``sha256`` in ``weights_dir``
    for ``cfg.epsilon`` (exact match), as {batch_size, local_epochs, rounds, lr}; None when
    there is no tuning.json, no entry for that ε, or the run is non-private. A tuning.json
    that is malformed or names another backbone is a one-line FerryError (rerun `ferry tune`
    or delete the file). ``weights_dir``: the backbone's directory ("random": None)."""
    if cfg.non_private or not weights_dir or str(weights_dir) == "random":
        return None
    path = tuning_path(weights_dir)
    if not path.exists():
        return None
    entry = read_tuning(weights_dir, sha256)["entries"].get(epsilon_key(cfg.epsilon))
    return None if entry is None else _check_settings(path, epsilon_key(cfg.epsilon), entry)
