"""The server's per-round checkpoint: what a restarted server needs to continue a run.

``<out>/checkpoint.json`` is rewritten after every completed round, atomically (temp file,
fsync, rename, fsync of the directory), so it always describes the last completed round in
full or the one before it, never half of each. It holds:

* ``round``: the last completed round; ``arrays``: the aggregated trainable arrays after it
  (dtype, shape, base64 of the raw little-endian bytes);
* ``rng``: the client-sampling generator's state (numpy ``bit_generator.state``);
* ``holders`` (node ids known to hold the backbone), ``institutions`` (node id -> name),
  ``exhausted`` (node id -> why it is not selected again), ``clients`` (the per-institution
  summary) and ``rounds`` (the per-round metrics records);
* ``ledger``: the ledger's length and the sha256 of its last line at that moment. On resume
  the ledger must still start with exactly those records (they are hash-chained, so one hash
  pins them all); records written after it (a round that crashed mid-way) stay, as they
  describe privacy that really was spent;
* ``run_id``, ``backbone_sha256`` and ``config``: a resume with another backbone or other
  settings is refused.

Nothing here is private beyond what ``summary.json`` already holds.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import write_atomic
from ferry.common.errors import FerryError
from ferry.server.ledger import LEDGER_FILE, line_hash
from ferry.server.outputs import json_safe

CHECKPOINT_FILE = "checkpoint.json"
FORMAT = 1


@dataclass
class Checkpoint:
    run_id: str
    backbone_sha256: str
    config: dict
    round: int
    arrays: dict[str, np.ndarray]
    rng: dict
    holders: list[int] = field(default_factory=list)
    institutions: dict[int, str] = field(default_factory=dict)
    exhausted: dict[int, str] = field(default_factory=dict)
    clients: dict[str, dict] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    ledger_seq: int = 0  # number of ledger records covered
    ledger_prev: str = ""  # sha256 of the last covered line


def _encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    dtype = a.dtype.newbyteorder("<")
    return {
        "dtype": dtype.str,
        "shape": list(a.shape),
        "data": base64.b64encode(a.astype(dtype, copy=False).tobytes()).decode(),
    }


def _decode_array(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["data"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def _json_default(obj: object) -> object:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_checkpoint(out: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``<out>/checkpoint.json`` atomically; return its path."""
    out = Path(out)
    data = asdict(ckpt)
    data.update(
        format=FORMAT,
        arrays={k: _encode_array(v) for k, v in ckpt.arrays.items()},
        holders=[str(n) for n in sorted(ckpt.holders)],
        institutions={str(k): v for k, v in ckpt.institutions.items()},
        exhausted={str(k): v for k, v in ckpt.exhausted.items()},
    )
    payload = json.dumps(data, sort_keys=True, default=_json_default, allow_nan=True)
    return write_atomic(out / CHECKPOINT_FILE, payload)


def load_checkpoint(out: str | os.PathLike) -> Checkpoint:
    """Read ``<out>/checkpoint.json``; FerryError naming the problem if it is unusable."""
    path = Path(out) / CHECKPOINT_FILE
    if not path.exists():
        raise FerryError(
            f"{Path(out)} holds no {CHECKPOINT_FILE}: it is not a run that completed a round "
            "(start a new run instead of --resume)"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return Checkpoint(
            run_id=str(data["run_id"]),
            backbone_sha256=str(data["backbone_sha256"]),
            config=dict(data["config"]),
            round=int(data["round"]),
            arrays={k: _decode_array(v) for k, v in data["arrays"].items()},
            rng=dict(data["rng"]),
            holders=[int(n) for n in data["holders"]],
            institutions={int(k): str(v) for k, v in data["institutions"].items()},
            exhausted={int(k): str(v) for k, v in data["exhausted"].items()},
            clients=dict(data["clients"]),
            rounds=list(data["rounds"]),
            ledger_seq=int(data["ledger_seq"]),
            ledger_prev=str(data["ledger_prev"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FerryError(f"checkpoint {path} is unreadable ({exc})") from None


def check_same_run(
    out: str | os.PathLike, ckpt: Checkpoint, config: dict, backbone_sha256: str
) -> None:
    """A resume must use the checkpointed run's backbone and settings (FerryError if not)."""
    if ckpt.backbone_sha256 != backbone_sha256:
        raise FerryError(
            f"the run in {out} used backbone {ckpt.backbone_sha256[:12]}, not "
            f"{backbone_sha256[:12]}: resume with the same weights"
        )
    changed = sorted(
        k for k in set(ckpt.config) | set(config) if ckpt.config.get(k) != config.get(k)
    )
    if changed:
        raise FerryError(
            f"the settings differ from the run in {out} ({', '.join(changed)}): "
            "resume with the run's own settings"
        )


def check_ledger_prefix(out: str | os.PathLike, ckpt: Checkpoint) -> None:
    """The ledger must still hold, unchanged, the records the checkpoint covered."""
    path = Path(out) / LEDGER_FILE
    lines = (path.read_bytes() if path.exists() else b"").split(b"\n")[:-1]  # complete ones
    if len(lines) < ckpt.ledger_seq or (
        ckpt.ledger_seq and line_hash(lines[ckpt.ledger_seq - 1]) != ckpt.ledger_prev
    ):
        raise FerryError(
            f"{path} no longer starts with the {ckpt.ledger_seq} records the checkpoint of "
            f"round {ckpt.round} covered: the ledger was truncated or replaced; not resuming"
        )


def restore_metrics(out: str | os.PathLike, rounds: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` (atomically) to exactly the checkpointed rounds."""
    lines = "".join(json.dumps(json_safe(record), sort_keys=True) + "\n" for record in rounds)
    write_atomic(Path(out) / "metrics.jsonl", lines)
