"""``ferry pretrain``: train a backbone on a source task, write it as a verified artifact.

The source task is the built-in synthetic shapes task by default, or an image folder
(one subfolder per class) given with ``--data``. A temporary linear classifier is trained on
top of the trunk and discarded; only the trunk is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.backbones.registry import backbone_spec, build_backbone
from common.data.preprocess import preprocess
from common.data.synthetic import make_images
from common.errors import FerryError
from common.serialization import BackboneArtifact, make_artifact, save_artifact


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "ferry-cnn"
    data: str = ""  # "" = built-in synthetic source task
    examples: int = 8000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    out: str = ""

    def validate(self) -> PretrainConfig:
        if self.epochs < 1:
            raise FerryError(f"--epochs {self.epochs} is invalid: pretrain for at least 1 epoch")
        if not self.data and self.examples < 100:
            raise FerryError(
                f"--examples {self.examples} is too few to pretrain on: use at least 100"
            )
        if self.batch_size < 2 or not self.lr > 0:
            raise FerryError("pretraining needs a batch size >= 2 and a positive learning rate")
        return self


def pretrain(cfg: PretrainConfig, log=print) -> BackboneArtifact:
    cfg.validate()
    spec = backbone_spec(cfg.arch)
    if cfg.data:
        from common.data.image_folder import load_image_folder

        images, labels, classes = load_image_folder(Path(cfg.data), spec.input_shape)
        source = {"kind": "image-folder", "path": str(Path(cfg.data).resolve())}
    else:
        images, labels = make_images("source", cfg.examples, cfg.seed)
        classes = sorted(set(labels.tolist()))
        source = {"kind": "synthetic-shapes", "task": "source", "seed": cfg.seed}
    x = torch.from_numpy(preprocess(images, spec.preprocessing))
    y = torch.from_numpy(labels)
    torch.manual_seed(cfg.seed)
    trunk = build_backbone(cfg.arch)
    classifier = nn.Linear(spec.feature_dim, len(classes))
    model = nn.Sequential(trunk, classifier)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_val = max(1, len(x) // 10)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=gen)
    val, train = perm[:n_val], perm[n_val:]
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm in train mode needs two examples per batch
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            acc = float((model(x[val]).argmax(1) == y[val]).float().mean())
        log(
            f"pretrain epoch {epoch}/{cfg.epochs}  loss {total / len(train):.3f}  "
            f"source val acc {acc:.3f}  ({time.perf_counter() - started:.0f}s)"
        )
    manifest = {
        "architecture": cfg.arch,
        "feature_dim": spec.feature_dim,
        "input_shape": list(spec.input_shape),
        "preprocessing": spec.preprocessing,
        "pretraining": {
            **source,
            "examples": int(len(x)),
            "classes": len(classes),
            "epochs": cfg.epochs,
            "source_val_accuracy": round(acc, 4),
        },
    }
    artifact = make_artifact(manifest, trunk.eval())
    if cfg.out:
        save_artifact(artifact, cfg.out)
    return artifact


def random_artifact(arch: str, seed: int = 0) -> BackboneArtifact:
    """The same architecture left at random initialisation (the no-pretraining baseline)."""
    spec = backbone_spec(arch)
    torch.manual_seed(seed)
    trunk = build_backbone(arch).eval()
    manifest = {
        "architecture": arch,
        "feature_dim": spec.feature_dim,
        "input_shape": list(spec.input_shape),
        "preprocessing": spec.preprocessing,
        "pretraining": {"kind": "random-init", "seed": seed},
    }
    return make_artifact(manifest, trunk)


def features_of(trunk: nn.Module, images: np.ndarray, preprocessing: dict) -> np.ndarray:
    x = torch.from_numpy(preprocess(images, preprocessing))
    with torch.no_grad():
        return torch.cat([trunk(x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()
