"""Where the server's backbone comes from: a ``ferry pretrain`` output, or random init."""

from __future__ import annotations

from common.backbones.registry import backbone_spec
from common.errors import FerryError
from common.paths import default_pretrained_dir
from common.serialization import BackboneArtifact, load_artifact


def resolve_backbone(backbone: str, weights: str, seed: int = 0) -> BackboneArtifact:
    """``weights``: a pretrain output (dir or file), ``"random"`` (no pretraining), or ``""``
    for the default pretrain location of ``backbone``. Raises FerryError on bad input."""
    backbone_spec(backbone)  # unknown names fail here, listing the known ones
    if weights == "random":
        from server.pretrain import random_artifact

        return random_artifact(backbone, seed)
    path = weights or str(default_pretrained_dir(backbone))
    if not weights and not default_pretrained_dir(backbone).exists():
        raise FerryError(
            f"no pretrained {backbone} backbone at {path}: run `ferry pretrain --arch {backbone}` "
            "first, or pass --weights PATH (or --weights random for no pretraining)"
        )
    artifact = load_artifact(path)
    arch = artifact.manifest.get("architecture")
    if arch != backbone:
        raise FerryError(
            f"weights at {path} are for architecture {arch!r}, not {backbone!r}: "
            f"pass --backbone {arch}"
        )
    return artifact
