"""Ferry's Python API: ``ferry.simulate`` and ``ferry.load_model`` (``import ferry``).

``ferry.simulate(**settings)`` takes the settings ``ferry simulate`` takes, spelled as Python
names (``clients=3, rounds=2, epsilon=3.0, data="my-images/"``; every option of ``ferry
simulate --help``), runs the same simulation (same checks, same DP-SGD, ledger and summary)
and returns a :class:`Run`. Bad settings raise :class:`ferry.common.errors.FerryError` with
the one-line message the command prints, before anything runs.

It also takes the user's own objects: ``data`` as one ``(x, y)`` pair of arrays or one
``torch.utils.data.Dataset`` per institution (a dict by name, or a list), and ``backbone``
as any ``nn.Module`` with ``split``, the name of the module that Ferry's trainable head
replaces (:mod:`common.backbones.own_module`). They go through the same machinery as files
and zoo backbones: the arrays become one arrays file (:mod:`common.data.arrays`, each
institution its own partition), the module's frozen trunk a hashed backbone artifact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ferry.common.backbones.own_module import code_digest, pickled, register_module, save_module
from ferry.common.config import RunConfig
from ferry.common.data.arrays import write_arrays
from ferry.common.errors import FerryError
from ferry.common.exported_model import ExportedModel, Preprocessing, load_model
from ferry.common.paths import ferry_home
from ferry.common.private_files import private_dir
from ferry.common.serialization import make_artifact, save_artifact
from ferry.server.model_export import export_model
from ferry.server.outputs import institution_privacy
from ferry.simulations.runner import simulate as run_simulation


@dataclass(frozen=True)
class Run:
    """A finished run: its directory and what it wrote there."""

    out: Path

    @property
    def summary(self) -> dict:
        """``summary.json``: final metrics, per-institution privacy, traffic, statement."""
        return json.loads((self.out / "summary.json").read_text())

    @property
    def rounds(self) -> list[dict]:
        """``metrics.jsonl``: one record per round (federated metrics, participants, ε)."""
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    @property
    def privacy(self) -> dict[str, dict]:
        """Per institution: ε spent, δ, rounds trained, budget ε (as its signed reports said)."""
        return institution_privacy(self.summary)

    @property
    def ledger(self) -> Path:
        return self.out / "ledger.jsonl"

    def export(self, folder: str | Path) -> Path:
        """The final model as a self-contained folder (what ``ferry export`` writes)."""
        return export_model(self.out, folder)

    def model(self) -> tuple[ExportedModel, Preprocessing]:
        """The final model, ready in eval mode, and its preprocessing (exported once, into
        ``out/exported``)."""
        folder = self.out / "exported"
        if not folder.exists():
            self.export(folder)
        return load_model(folder)


def simulate(
    *,
    data=None,
    backbone: str | nn.Module | None = None,
    split: str = "",
    input_shape: tuple[int, ...] | None = None,
    baseline: str = "",
    log_to: str = "",
    log=print,
    **settings,
) -> Run:
    """Run a simulation with ``ferry simulate``'s settings; return the finished :class:`Run`.

    ``data``: a path (as ``--data``), or each institution's own examples: ``{name: (x, y)}``,
    ``{name: Dataset}`` or a list of either (one institution each). ``backbone``: a name (zoo
    or ``package.module:builder``), or an ``nn.Module`` cut at ``split`` (the module the
    trainable head replaces); its input shape is the data's, or ``input_shape`` with a path.
    ``baseline="local"``: also each institution alone (``summary["baseline"]``).
    ``log_to="tensorboard:DIR"``: every round's metrics and ε in TensorBoard too.
    ``log`` receives the progress lines (``print`` by default)."""
    if isinstance(data, str | os.PathLike):
        settings["data"] = str(data)
    elif data is not None:
        institutions = _institutions(data)
        settings["data"] = str(write_arrays(ferry_home() / "arrays", institutions))
        settings.setdefault("partition", "natural")
        settings.setdefault("partition_column", "institution")
        if settings.get("clients", len(institutions)) != len(institutions):
            raise FerryError(
                f"clients={settings['clients']} but data holds {len(institutions)} "
                "institutions: leave clients out (each institution is one client)"
            )
        settings["clients"] = len(institutions)
        first = next(iter(institutions.values()))[0]
        input_shape = input_shape or tuple(first.shape[1:])
    own = None
    if isinstance(backbone, nn.Module):
        if input_shape is None:
            raise FerryError(
                "an nn.Module backbone needs the shape of one example: give data as arrays or "
                "pass input_shape=(c, h, w)"
            )
        settings["backbone"], settings["weights"], own = _own_backbone(backbone, split, input_shape)
    elif backbone is not None:
        if split:
            raise FerryError(
                f"split={split!r} applies to an nn.Module backbone, not to {backbone!r}: drop it"
            )
        settings["backbone"] = str(backbone)
    cfg = RunConfig.from_mapping(settings).validate()
    summary = run_simulation(cfg, log=log, own_module=own, baseline=baseline, log_to=log_to)
    return Run(Path(summary["run"]["out"]))


def _institutions(data) -> dict[str, tuple]:
    """``data`` as ``{name: (x, y)}`` (see :func:`simulate`)."""
    if isinstance(data, Mapping):
        items = [(str(name), value) for name, value in data.items()]
    elif isinstance(data, list | tuple):
        width = len(str(len(data)))
        items = [(f"institution-{i + 1:0{width}d}", value) for i, value in enumerate(data)]
    else:
        raise FerryError(
            f"data must be a path, a dict or a list of (x, y) per institution, not "
            f"{type(data).__name__}"
        )
    return {name: _pair(name, value) for name, value in items}


def _pair(name: str, value) -> tuple:
    if isinstance(value, tuple | list) and len(value) == 2:
        return tuple(value)
    if hasattr(value, "__getitem__") and hasattr(value, "__len__") and not hasattr(value, "shape"):
        # a torch Dataset of (x, y) pairs
        import numpy as np

        rows = [value[i] for i in range(len(value))]
        if not rows:
            raise FerryError(f"{name}'s Dataset is empty: give it examples")
        x = np.stack([np.asarray(row[0]) for row in rows])
        return x, np.asarray([np.asarray(row[1]).item() for row in rows])
    raise FerryError(
        f"{name}'s data must be (x, y) arrays or a torch Dataset of (x, y) pairs, not "
        f"{type(value).__name__}"
    )


def _own_backbone(net: nn.Module, split: str, input_shape) -> tuple[str, str, tuple[str, str]]:
    """Register ``net`` cut at ``split``, store its trunk as a backbone artifact and its code
    for the workers; (name, weights folder, (folder, pickle sha256))."""
    spec = register_module(net, split, tuple(input_shape))
    manifest = {
        "architecture": spec.name,
        "feature_dim": spec.feature_dim,
        "input_shape": list(spec.input_shape),
        "preprocessing": spec.preprocessing,
        "pretraining": {
            "kind": "own-module",
            "class": type(net).__name__,
            "split": split,
            "code_sha256": code_digest(net),
        },
    }
    artifact = make_artifact(manifest, spec.builder(spec.input_shape))
    folder = ferry_home() / "own-backbones" / artifact.sha256[:32]
    save_artifact(artifact, private_dir(folder), private=True)  # the user's own weights
    return spec.name, str(folder), (str(folder), save_module(pickled(spec), folder))
