"""Where each round's record goes besides ``metrics.jsonl``: ``--log-to tensorboard:DIR``.

A sink is called with every round's record (the line ``metrics.jsonl`` gets) as the round
ends, in the server's process. TensorBoard: ``federated/<metric>`` (the pooled held-out
metrics), ``privacy/max_epsilon``, ``round/participants`` and
``institution/<name>/<metric>`` (each institution's own held-out metrics), at step = round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ferry.common.errors import FerryError

Sink = Callable[[dict], None]
KINDS = ("tensorboard",)


def _scalars(record: dict) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
            if key == "max_epsilon":
                out["privacy/max_epsilon"] = value
            elif key in ("participants", "sampled", "seconds"):
                out[f"round/{key}"] = value
            else:
                out[f"federated/{key}"] = value
    for name, metrics in (record.get("per_institution") or {}).items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"institution/{name}/{key}"] = value
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        raise FerryError(
            "--log-to tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'ferry-fl[tensorboard]')"
        ) from None
    return SummaryWriter


def tensorboard_sink(folder: Path) -> Sink:
    writer = _writer_class()(log_dir=str(folder))

    def sink(record: dict) -> None:
        for tag, value in _scalars(record).items():
            writer.add_scalar(tag, value, global_step=int(record["round"]))
        writer.flush()

    return sink


def check_log_to(spec: str) -> Path:
    """The folder of ``--log-to tensorboard:DIR``, checked before anything runs or is
    written; a one-line FerryError otherwise."""
    kind, _, where = str(spec).partition(":")
    if kind not in KINDS or not where.strip():
        raise FerryError(f"--log-to {spec!r} is unknown: use tensorboard:DIR")
    _writer_class()
    if Path(where).exists() and not Path(where).is_dir():
        raise FerryError(f"--log-to {spec!r}: {where} is a file, not a folder")
    return Path(where)


def sink_for(spec: str) -> Sink:
    """The sink ``--log-to`` names (see :func:`check_log_to`)."""
    return tensorboard_sink(check_log_to(spec))
