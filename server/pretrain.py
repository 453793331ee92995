"""``ferry pretrain``: train a backbone on a source task, write it as a verified artifact.

The source data is the scenario's built-in synthetic source task by default (synthetic
shapes for images; a related cohort, applicant pool, market or compound library for the
other presets), or the server's own file or folder given with ``--data`` (read like the
scenario's institutions read theirs). A temporary classifier (or regressor) is trained on
top of the trunk and discarded; only the trunk is written. For tables and series the
manifest records the input layout (``input_shape``, ``pretraining.columns``), which every
institution's data must match, and the source data's standardisation statistics
(``preprocessing.mean``/``std``/``clip``), which every institution applies as they are: the
source data is public (synthetic, or the server's own file), so no institution's data shapes
another institution's, or its own other records', features.

The output directory must be new or empty of backbone files: an existing backbone is never
replaced (institutions may hold its hash; a run may be using it), and ``--out`` naming a
file is refused, both before any training (:func:`check_backbone_out`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferry.common.backbones.registry import backbone_spec, build_backbone
from ferry.common.data.dataset import Dataset
from ferry.common.data.datasets import DataSpec, load_dataset
from ferry.common.data.preprocess import fixed_preprocessing, preprocess, public_preprocessing
from ferry.common.errors import FerryError
from ferry.common.metrics import headline_metric
from ferry.common.serialization import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    BackboneArtifact,
    make_artifact,
    save_artifact,
)

MAX_EPOCHS = 10_000
MAX_EXAMPLES = 10_000_000


def check_backbone_out(out: str | os.PathLike) -> Path:
    """``out`` may receive a new backbone: it is not a file and holds no backbone yet."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FerryError(f"--out {path} is a file: give a directory for the backbone")
    existing = [name for name in (WEIGHTS_FILE, MANIFEST_FILE) if (path / name).exists()]
    if existing:
        raise FerryError(
            f"--out {path} already holds a backbone ({', '.join(existing)}); it is not "
            "replaced: choose another --out, or remove that directory first"
        )
    return path


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = ""  # "" = the scenario's default backbone
    scenario: str = "hospital-imaging"
    data: str = ""  # "" = the scenario's built-in synthetic source task
    examples: int = 8000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    out: str = ""
    # How --data is read (as in `ferry simulate`).
    data_spec: DataSpec | None = None

    def validate(self) -> PretrainConfig:
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise FerryError(
                f"--epochs {self.epochs} is invalid: pretrain for 1 to {MAX_EPOCHS:,} epochs"
            )
        if not self.data and not 100 <= self.examples <= MAX_EXAMPLES:
            raise FerryError(
                f"--examples {self.examples} is invalid: pretrain on 100 to {MAX_EXAMPLES:,} "
                "synthetic examples"
            )
        if not 0 <= self.seed < 2**32:
            raise FerryError(f"--seed {self.seed} is invalid: use a seed from 0 to 2**32 - 1")
        if self.out:
            check_backbone_out(self.out)
        if self.batch_size < 2 or not self.lr > 0:
            raise FerryError("pretraining needs a batch size >= 2 and a positive learning rate")
        return self

    @property
    def architecture(self) -> str:
        from ferry.common.scenarios import get_scenario

        return self.arch or get_scenario(self.scenario).backbone


def source_data(cfg: PretrainConfig) -> tuple[Dataset, dict]:
    """The source dataset and a description of it for the manifest."""
    spec = backbone_spec(cfg.architecture)
    base = cfg.data_spec or DataSpec()
    data_spec = replace(
        base,
        scenario=cfg.scenario,
        data=cfg.data,
        examples=cfg.examples,
        seed=cfg.seed,
        num_partitions=1,
        input_shape=spec.input_shape,
    )
    dataset = load_dataset(data_spec, "target" if cfg.data else "source")
    if dataset.modality != spec.modality:
        raise FerryError(
            f"backbone {spec.name} takes {spec.modality} data but the {cfg.scenario} "
            f"{'file' if cfg.data else 'source task'} is {dataset.modality}: choose a "
            f"{dataset.modality} backbone with --arch, or another --scenario"
        )
    if cfg.data:
        source = {"kind": "file", "path": cfg.data, "scenario": cfg.scenario}
    else:
        source = {"kind": f"synthetic-{cfg.scenario}", "task": "source", "seed": cfg.seed}
    return dataset, source


def pretrain(cfg: PretrainConfig, log=print) -> BackboneArtifact:
    cfg.validate()
    spec = backbone_spec(cfg.architecture)
    dataset, source = source_data(cfg)
    regression = dataset.task == "regression"
    input_shape = spec.input_shape if spec.modality == "image" else tuple(dataset.x.shape[1:])
    # Statistics of the public source data, written into the manifest (so covered by the
    # backbone's hash): every institution standardises with exactly these, never its own.
    preprocessing = public_preprocessing(spec.preprocessing, dataset)
    x = torch.from_numpy(preprocess(dataset.x, preprocessing))
    y = torch.from_numpy(dataset.y.astype(np.float32 if regression else np.int64))
    torch.manual_seed(cfg.seed)
    trunk = build_backbone(cfg.architecture, input_shape)
    outputs = 1 if regression else dataset.num_classes
    model = nn.Sequential(trunk, nn.Linear(spec.feature_dim, outputs))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_val = max(1, len(x) // 10)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=gen)
    val, train = perm[:n_val], perm[n_val:]

    def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if regression:
            return nn.functional.mse_loss(out[:, 0], target)
        return nn.functional.cross_entropy(out, target)

    started = time.perf_counter()
    score = float("nan")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm in train mode needs two examples per batch
                continue
            loss = loss_of(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(x[val[i : i + 256]]) for i in range(0, len(val), 256)])
            if regression:
                score = float(torch.sqrt(nn.functional.mse_loss(out[:, 0], y[val])))
            else:
                score = float((out.argmax(1) == y[val]).float().mean())
        log(
            f"pretrain epoch {epoch}/{cfg.epochs}  loss {total / max(len(train), 1):.3f}  "
            f"source val {'rmse' if regression else 'acc'} {score:.3f}  "
            f"({time.perf_counter() - started:.0f}s)"
        )
    manifest = {
        "architecture": cfg.architecture,
        "feature_dim": spec.feature_dim,
        "input_shape": list(input_shape),
        "preprocessing": preprocessing,
        "pretraining": {
            **source,
            "examples": int(len(x)),
            "task": dataset.task,
            "classes": dataset.num_classes,
            "epochs": cfg.epochs,
            f"source_val_{headline_metric(dataset.task)}": round(score, 4),
            **({"columns": list(dataset.columns)} if dataset.columns else {}),
        },
    }
    artifact = make_artifact(manifest, trunk.eval())
    if cfg.out:
        save_artifact(artifact, check_backbone_out(cfg.out))  # again: one may have appeared
    return artifact


def random_artifact(
    arch: str, seed: int = 0, input_shape: tuple[int, ...] | None = None
) -> BackboneArtifact:
    """The same architecture left at random initialisation (the no-pretraining baseline)."""
    spec = backbone_spec(arch)
    shape = tuple(input_shape or spec.input_shape)
    torch.manual_seed(seed)
    trunk = build_backbone(arch, shape).eval()
    manifest = {
        "architecture": arch,
        "feature_dim": spec.feature_dim,
        "input_shape": list(shape),
        # An image trunk built at another size tells clients to resize to that size; tables
        # and series get fixed statistics (no data was seen).
        "preprocessing": {**spec.preprocessing, "size": shape[-1]}
        if "size" in spec.preprocessing
        else fixed_preprocessing(spec.preprocessing, shape),
        "pretraining": {"kind": "random-init", "seed": seed},
    }
    return make_artifact(manifest, trunk)
