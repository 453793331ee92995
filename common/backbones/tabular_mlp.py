"""``tabular-mlp`` and ``molecule-mlp``: MLP encoders for record tables and fingerprints.

Stages: ``block0`` (Linear d->128, LayerNorm, GELU), ``block1`` (Linear 128->128, LayerNorm,
GELU), ``out`` (Linear 128->64, then a BatchNorm1d without affine parameters that
standardises features with the pretraining data's statistics; it is part of the frozen trunk
and always runs in eval mode on clients, so a DP head sees unit-scale features). 64 features.
``last_stage`` is ``block1``; LoRA can adapt ``block1.0`` and ``out.0``.

The input width is the width of the source data's layout (``ferry pretrain`` records it in the
manifest); every institution's table must have the same columns.

One architecture, two names: a spec carries one modality and one preprocessing, and tables
(standardised with the public pretraining data's statistics that ``ferry pretrain`` writes
into the manifest, missing values filled with that mean) and fingerprints (bits used as they
are) need different ones, so each gets its own entry.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ferry.common.backbones.registry import register_backbone
from ferry.common.errors import FerryError

FEATURES = 64
HIDDEN = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.LayerNorm(cout), nn.GELU())


def mlp_encoder(width: int) -> nn.Sequential:
    """The MLP trunk for rows of ``width`` features: (n, width) -> (n, 64)."""
    return nn.Sequential(
        OrderedDict(
            block0=_block(width, HIDDEN),
            block1=_block(HIDDEN, HIDDEN),
            out=nn.Sequential(nn.Linear(HIDDEN, FEATURES), nn.BatchNorm1d(FEATURES, affine=False)),
        )
    )


@register_backbone(
    "tabular-mlp",
    feature_dim=FEATURES,
    input_shape=(16,),
    preprocessing={"kind": "tabular", "standardize": "public"},
    modality="tabular",
    last_stage="block1",
    lora_targets=("block1.0", "out.0"),
    description="MLP encoder for record tables (numeric + hashed categorical columns)",
)
def build_tabular_mlp(input_shape: tuple[int, ...] = (16,)) -> nn.Module:
    return mlp_encoder(_width("tabular-mlp", input_shape))


@register_backbone(
    "molecule-mlp",
    feature_dim=FEATURES,
    input_shape=(2048,),
    preprocessing={"kind": "molecule"},
    modality="molecule",
    last_stage="block1",
    lora_targets=("block1.0", "out.0"),
    description="MLP encoder for molecular fingerprints (Morgan bits)",
)
def build_molecule_mlp(input_shape: tuple[int, ...] = (2048,)) -> nn.Module:
    return mlp_encoder(_width("molecule-mlp", input_shape))


def _width(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise FerryError(
            f"{name} takes rows of d features, input shape (d,), not {tuple(input_shape)}: "
            "pretrain it on a table or fingerprint file (`ferry pretrain --data FILE`)"
        )
    return int(input_shape[0])
