"""What the K-curve benchmark (:mod:`simulations.bench.kcurve_bench`) measures: its sizes (the
full run and ``--quick``), the defaults' promise it checks, and its datasets, each built (data,
backbone) and turned into features once, cached in the work directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ferry.common.atomic_files import atomic_path
from ferry.common.config import RunConfig
from ferry.simulations.linear_federation import (
    GRID_BATCH,
    GRID_LR,
    GRID_SCHEDULE,
    FeatureSet,
    extract_features,
)

WITHIN_POINTS = 2.0  # the defaults' promise: within this many points of the best of the grid


@dataclass(frozen=True)
class KCurveSizes:
    # Longest first: with two processes, digits runs beside the other two.
    datasets: tuple[str, ...] = ("digits", "hospital-imaging", "breast-cancer")
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    federated: tuple[int, ...] = (2, 5, 10)
    tuned: tuple[int, ...] = (1, 5)  # institution counts also searched over the grid
    alone: int = 5  # each institution of this split also trains alone
    repeats: int = 3
    top: int = 4  # grid points confirmed over ``repeats`` seeds
    batches: tuple[int, ...] = GRID_BATCH
    schedules: tuple[tuple[int, int], ...] = GRID_SCHEDULE  # (rounds, local epochs)
    lrs: tuple[float, ...] = GRID_LR
    delta: float = 1e-5
    synthetic_examples: int = 4000  # hospital-imaging records
    pretrain_examples: int = 8000  # hospital-imaging synthetic source task
    pretrain_epochs: int = 4
    tabular_pretrain_epochs: int = 30  # breast-cancer encoder, on the public 30%
    digits_size: int = 128
    digits_images: int | None = None  # None: all 1,797


FULL = KCurveSizes()
QUICK = KCurveSizes(
    datasets=("breast-cancer", "hospital-imaging"),
    epsilons=(3.0,),
    federated=(2, 5),
    repeats=1,
    top=2,
    batches=(512,),  # above most institutions' n: q = 1, whose σ costs no search
    schedules=((5, 3), (6, 5)),
    lrs=(0.5, 2.0),
    synthetic_examples=800,
    pretrain_examples=800,
    pretrain_epochs=2,
    tabular_pretrain_epochs=10,
)


# --- datasets: each returns (run config of its data, backbone artifact, description) ---


def _digits(sizes: KCurveSizes, work: Path, log):
    from ferry.common.serialization import load_artifact
    from ferry.server.backbone_import import import_backbone
    from ferry.simulations.bench.transfer_bench import write_digits_folder

    data = work / "digits"
    if not data.exists():
        partial = work / "digits.partial"
        write_digits_folder(partial, sizes.digits_images)
        partial.rename(data)
    weights = work / f"backbone-lite0-imagenet-{sizes.digits_size}"
    if not weights.exists():
        import_backbone("efficientnet_lite0", "imagenet", sizes.digits_size, weights, log)
    cfg = RunConfig(
        scenario="hospital-imaging",
        data=str(data),
        backbone="efficientnet_lite0",
        partition="dirichlet",
        alpha=0.5,
    )
    count = sum(1 for _ in data.rglob("*.png"))
    text = (
        f"scikit-learn `load_digits` ({count:,} 8×8 grayscale digits, 10 classes) as PNGs "
        f"upsampled to {sizes.digits_size}×{sizes.digits_size}×3; backbone: EfficientNet-Lite0 "
        "with ImageNet weights"
    )
    return cfg, load_artifact(weights), text


def _breast_cancer(sizes: KCurveSizes, work: Path, log):
    from ferry.common.data.datasets import DataSpec
    from ferry.common.serialization import load_artifact
    from ferry.server.pretrain import PretrainConfig, pretrain
    from ferry.simulations.breast_cancer import LABEL, write_tables

    public, hospitals = write_tables(work / "breast-cancer")
    encoder = work / f"backbone-breast-cancer-{sizes.tabular_pretrain_epochs}"
    if not encoder.exists():
        read_as = DataSpec.from_run(
            RunConfig(scenario="hospital-tabular", label_column=LABEL), 1, (1,)
        )
        pretrain(
            PretrainConfig(
                scenario="hospital-tabular",
                data=str(public),
                epochs=sizes.tabular_pretrain_epochs,
                batch_size=32,
                out=str(encoder),
                data_spec=read_as,
            ),
            log=log,
        )
    cfg = RunConfig(
        scenario="hospital-tabular", data=str(hospitals), label_column=LABEL, partition="iid"
    )
    text = (
        "scikit-learn breast cancer (569 patients, 30 measurements, malignant vs benign): the "
        f"hospitals' 70%; backbone: the hospital-tabular encoder pretrained "
        f"({sizes.tabular_pretrain_epochs} epochs) on the other 30%, the server's public cohort"
    )
    return cfg, load_artifact(encoder), text


def _hospital_imaging(sizes: KCurveSizes, work: Path, log):
    from ferry.common.serialization import load_artifact
    from ferry.server.pretrain import PretrainConfig, pretrain

    encoder = work / f"backbone-hospital-imaging-{sizes.pretrain_examples}-{sizes.pretrain_epochs}"
    if not encoder.exists():
        pretrain(
            PretrainConfig(
                scenario="hospital-imaging",
                examples=sizes.pretrain_examples,
                epochs=sizes.pretrain_epochs,
                out=str(encoder),
            ),
            log=log,
        )
    cfg = RunConfig(scenario="hospital-imaging", examples=sizes.synthetic_examples)
    text = (
        f"the `hospital-imaging` synthetic preset ({sizes.synthetic_examples:,} scans of 4 "
        f"lesion types); backbone: ferry-cnn pretrained on the preset's synthetic source task "
        f"({sizes.pretrain_examples:,} images, {sizes.pretrain_epochs} epochs)"
    )
    return cfg, load_artifact(encoder), text


DATASETS = {
    "digits": _digits,
    "breast-cancer": _breast_cancer,
    "hospital-imaging": _hospital_imaging,
}


def load_features(name: str, sizes: KCurveSizes, work: Path, log=print) -> tuple[FeatureSet, str]:
    """``name``'s FeatureSet and description; features cached in ``work`` under a key of the
    data settings and the backbone's hash (the data files stay there too: splits read them)."""
    from ferry.common.scenarios import with_scenario_defaults

    cfg, artifact, text = DATASETS[name](sizes, work, log)
    settings = json.dumps(asdict(cfg), sort_keys=True, default=str) + artifact.sha256
    cache = work / f"features-{name}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        features = FeatureSet(
            x=saved["x"],
            y=saved["y"],
            task=saved["task"],
            num_classes=int(saved["num_classes"]),
            cfg=dataclasses.replace(with_scenario_defaults(cfg), task=saved["task"]),
            input_shape=tuple(saved["input_shape"]),
        )
    else:
        features = extract_features(cfg, artifact, log=log)
        saved = {
            "x": features.x,
            "y": features.y,
            "task": features.task,
            "num_classes": features.num_classes,
            "input_shape": list(features.input_shape),
        }
        with atomic_path(cache, suffix=".partial") as partial:
            torch.save(saved, partial)
    return features, f"{text} ({features.x.shape[1]:,} features)"
