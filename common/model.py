"""The model an institution trains: frozen trunk + trainable tail, from a run config.

The server and every client build the same split from the same verified backbone and run
config (:func:`split_for_run`); the server's initial trainable arrays
(:func:`initial_trainable_arrays`) are what round 1 sends. Only trainable arrays ever travel.
"""

from __future__ import annotations

import numpy as np
import torch

from ferry.common.backbones.registry import backbone_spec
from ferry.common.config import RunConfig
from ferry.common.serialization import BackboneArtifact, instantiate
from ferry.common.trainable import SplitModel, TrainableSpec, split_model, trainable_state


def out_dim(task: str, num_classes: int) -> int:
    """Model outputs: one logit per class, or one value for regression."""
    return 1 if task == "regression" else num_classes


def trainable_spec(cfg: RunConfig) -> TrainableSpec:
    return TrainableSpec(
        kind=cfg.trainable,
        head=cfg.head,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_targets=tuple(cfg.names("lora_targets")),
        adapter_dim=cfg.adapter_dim,
    ).validate()


def split_for_run(
    backbone: torch.nn.Module, manifest: dict, cfg: RunConfig, outputs: int
) -> SplitModel:
    """Split a verified, frozen backbone for ``cfg``'s trainable part (raises FerryError)."""
    spec = backbone_spec(str(manifest["architecture"]))
    return split_model(backbone, spec, trainable_spec(cfg), outputs, seed=cfg.seed)


def initial_trainable_arrays(
    artifact: BackboneArtifact, cfg: RunConfig, outputs: int
) -> dict[str, np.ndarray]:
    """Round 1's trainable arrays (seeded head; zero-initialised adapters; pretrained weights
    of an unfrozen last block)."""
    torch.manual_seed(cfg.seed)
    return trainable_state(
        split_for_run(instantiate(artifact), artifact.manifest, cfg, outputs).tail
    )
