"""Where the server's backbone comes from: a ``ferry pretrain`` (or ``ferry import-backbone``)
output, or random init."""

from __future__ import annotations

from pathlib import Path

from ferry.common.backbones.registry import backbone_spec
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.paths import ferry_home
from ferry.common.serialization import BackboneArtifact, load_artifact
from ferry.common.training_defaults import describe, resolve_schedule
from ferry.server.pretrain import random_artifact
from ferry.server.tuning import load_tuned


def default_weights_dir(backbone: str, scenario: str) -> Path:
    """``$FERRY_HOME/pretrained/<arch>`` for image backbones (one serves every image preset);
    ``$FERRY_HOME/pretrained/<scenario>/<arch>`` for tables, series and molecules, whose
    input layout belongs to one kind of data."""
    if backbone_spec(backbone).modality == "image":
        return ferry_home() / "pretrained" / backbone
    return ferry_home() / "pretrained" / scenario / backbone


def weights_dir(backbone: str, weights: str, scenario: str) -> Path | None:
    """The directory of the backbone ``weights`` names (where ``ferry tune`` records its
    settings), or None for a random backbone."""
    if weights == "random":
        return None
    path = Path(weights) if weights else default_weights_dir(backbone, scenario)
    return path if path.is_dir() else path.parent


def choose_training(cfg: RunConfig, artifact: BackboneArtifact, log=print):
    """``cfg`` with its training settings chosen (given > tuned with this backbone by `ferry
    tune` for this ε > the DP-aware rule: common.training_defaults), where each came from,
    and the one line printed about them."""
    folder = weights_dir(cfg.backbone, cfg.weights, cfg.scenario)
    tuned = load_tuned(folder, artifact.sha256, cfg) if folder is not None else None
    cfg, source = resolve_schedule(cfg, tuned)
    log(describe(cfg, source))
    return cfg, source


def resolve_backbone(
    backbone: str,
    weights: str,
    seed: int = 0,
    scenario: str = "hospital-imaging",
    input_shape: tuple[int, ...] | None = None,
) -> BackboneArtifact:
    """``weights``: a pretrain output (dir or file), ``"random"`` (no pretraining; built for
    ``input_shape`` when given), or ``""`` for the default location of ``backbone`` in
    ``scenario``. Raises FerryError on bad input."""
    backbone_spec(backbone)  # unknown names fail here, listing the known ones
    if weights == "random":
        return random_artifact(backbone, seed, input_shape)
    default = default_weights_dir(backbone, scenario)
    path = weights or str(default)
    if not weights and not default.exists():
        scenario_flag = (
            "" if backbone_spec(backbone).modality == "image" else (f" --scenario {scenario}")
        )
        raise FerryError(
            f"no pretrained {backbone} backbone at {path}: run `ferry pretrain{scenario_flag} "
            f"--arch {backbone}` first, or pass --weights PATH (or --weights random for no "
            "pretraining)"
        )
    artifact = load_artifact(path)
    arch = artifact.manifest.get("architecture")
    if arch != backbone:
        raise FerryError(
            f"weights at {path} are for architecture {arch!r}, not {backbone!r}: "
            f"pass --backbone {arch}"
            + (" (naming an import path trusts its code)" if ":" in str(arch) else "")
        )
    return artifact
