"""An exported Ferry model (``ferry export``), read back anywhere: :func:`load_model`.

The folder holds ``backbone.safetensors``, ``trainable.safetensors`` and ``manifest.json``
(:mod:`server.model_export` writes them). Loading checks both files against the sha256s in the
manifest and the backbone against its own hash, rebuilds the run's split (frozen trunk +
trained tail, :mod:`common.model`) and loads the trained arrays: the module is the model the
federation evaluated, in eval mode. Its input is what :class:`Preprocessing` makes of raw
examples (images (n, c, h, w) in [0, 1], or table rows as Ferry's loaders read them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferry.common.backbones.own_module import register_module
from ferry.common.backbones.registry import registered_backbones
from ferry.common.config import RunConfig
from ferry.common.data.preprocess import check_preprocessing, preprocess
from ferry.common.errors import FerryError
from ferry.common.model import out_dim, split_for_run
from ferry.common.serialization import BackboneArtifact, file_sha256, instantiate, verify
from ferry.common.trainable import load_trainable_state

FORMAT = 1
MANIFEST_FILE = "manifest.json"
BACKBONE_FILE = "backbone.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
# The run settings that shape the trained part (and its seeded initialisation).
TRAINABLE_SETTINGS = (
    "trainable",
    "head",
    "lora-rank",
    "lora-alpha",
    "lora-targets",
    "adapter-dim",
    "seed",
)


class ExportedModel(nn.Module):
    """The frozen trunk then the trained tail; outputs logits (one per class) or one value."""

    def __init__(self, trunk: nn.Module, tail: nn.Module, manifest: dict):
        super().__init__()
        self.trunk, self.tail = trunk, tail
        self.task: str = manifest["task"]
        self.classes: list[str] = list(manifest["classes"])
        self.manifest = manifest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))


@dataclass(frozen=True)
class Preprocessing:
    """Raw examples (a numpy batch as Ferry's loaders read them) -> the model's input tensor;
    the backbone manifest's data-independent preprocessing (:mod:`common.data.preprocess`)."""

    spec: dict
    input_shape: tuple[int, ...]

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise FerryError(
                f"examples of shape {tuple(x.shape[1:])} do not fit this model, which takes "
                f"{self.input_shape}: give data like the data it was trained on"
            )
        return torch.from_numpy(preprocess(x, self.spec))


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FerryError(
            f"{folder} is not a Ferry model ({MANIFEST_FILE}: {exc.__class__.__name__}): give "
            "a folder written by `ferry export`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FerryError(f"{path} is not a format-{FORMAT} Ferry model manifest")
    return manifest


def load_model(
    folder: str | Path, backbone: torch.nn.Module | None = None
) -> tuple[ExportedModel, Preprocessing]:
    """The exported model in ``folder``, verified, in eval mode, and its preprocessing.

    A model whose backbone was the user's own ``nn.Module`` (``ferry.simulate(backbone=net,
    split=...)``) needs that module's code: pass a fresh instance as ``backbone`` (its weights
    are replaced by the model's, which are checked against their hash)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, sha in manifest["files"].items():
        if not (folder / name).is_file() or file_sha256(folder / name) != sha:
            raise FerryError(
                f"{folder / name} does not match its manifest (sha256): the model was altered "
                "or damaged; export it again with `ferry export`"
            )
    backbone_manifest = manifest["backbone_manifest"]
    _register_own_module(backbone_manifest, backbone)
    check_preprocessing(backbone_manifest["preprocessing"])
    artifact = BackboneArtifact(backbone_manifest, load_file(str(folder / BACKBONE_FILE)))
    verify(artifact, manifest["backbone_sha256"])
    cfg = RunConfig.from_mapping(manifest["trainable"])
    outputs = out_dim(manifest["task"], int(manifest["num_classes"]))
    split = split_for_run(instantiate(artifact), backbone_manifest, cfg, outputs)
    load_trainable_state(split.tail, load_file(str(folder / TRAINABLE_FILE)))
    model = ExportedModel(split.trunk, split.tail, manifest).eval()
    model.requires_grad_(False)
    shape = tuple(int(d) for d in manifest["input_shape"])
    return model, Preprocessing(backbone_manifest["preprocessing"], shape)


def _register_own_module(backbone_manifest: dict, backbone: torch.nn.Module | None) -> None:
    """Register the user's module for a model trained on one (see :func:`load_model`)."""
    arch = str(backbone_manifest["architecture"])
    own = backbone_manifest.get("pretraining", {})
    if own.get("kind") != "own-module":
        if backbone is not None:
            raise FerryError(
                f"this model's backbone is {arch}, not your own module: drop backbone="
            )
        return
    if backbone is None:
        if arch in registered_backbones():
            return  # the process that trained it
        raise FerryError(
            f"this model's backbone is your own {own.get('class')} cut at {own.get('split')!r}: "
            f"pass an instance, ferry.load_model(folder, backbone={own.get('class')}())"
        )
    shape = tuple(int(d) for d in backbone_manifest["input_shape"])
    spec = register_module(backbone, str(own.get("split", "")), shape)
    if spec.name != arch:
        raise FerryError(
            f"backbone={type(backbone).__name__}(...) is {spec.name}, but the model was trained "
            f"on {arch}: build the module as it was built for training"
        )


def predict(
    model: ExportedModel, preprocessing: Preprocessing, x: np.ndarray, batch: int = 256
) -> np.ndarray:
    """Class probabilities (n, classes) or regression values (n,) for raw examples ``x``."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(preprocessing(x[i : i + batch])).float())
    width = len(model.classes) if model.task == "classification" else 1
    out = torch.cat(outs) if outs else torch.zeros((0, width))
    if model.task == "classification":
        return torch.softmax(out, dim=1).numpy()
    return out[:, 0].numpy()
