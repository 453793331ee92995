"""``series-cnn`` and ``series-gru``: encoders for windows of returns, (channels, window).

``series-cnn`` stages: ``conv0``, ``conv1``, ``conv2`` (Conv1d k=3 with dilation 1, 2, 4,
GroupNorm, GELU), ``pool`` (global average over time), ``out`` (Linear 64->64 and a frozen
affine-free BatchNorm1d that standardises features with the pretraining statistics).
``last_stage`` is ``conv2``.

``series-gru`` stages: ``gru`` (a 2-layer GRU over time, last hidden state), ``out`` (as
above). ``last_stage`` is ``out``: the GRU stays in the frozen trunk (a plain ``nn.GRU`` has
no per-example gradients in Opacus). 64 features for both; LoRA adapts ``out.0``.

Any channel count and window length work (the convolutions keep the length, the pool and
the GRU remove it); ``ferry pretrain`` records the source data's (channels, window) in the
manifest. ``conv-adapter`` does not apply (it adapts Conv2d layers only).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ferry.common.backbones.registry import register_backbone
from ferry.common.errors import FerryError

FEATURES = 64
PREPROCESSING = {"kind": "series", "standardize": "public"}


def _conv(cin: int, cout: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(cin, cout, 3, padding=dilation, dilation=dilation),
        nn.GroupNorm(8, cout),
        nn.GELU(),
    )


class GlobalAveragePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)


def _out() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES, affine=False))


@register_backbone(
    "series-cnn",
    feature_dim=FEATURES,
    input_shape=(1, 30),
    preprocessing=PREPROCESSING,
    modality="series",
    last_stage="conv2",
    lora_targets=("out.0",),
    description="dilated 1-D CNN over windows of returns",
)
def build_series_cnn(input_shape: tuple[int, ...] = (1, 30)) -> nn.Module:
    channels = _channels("series-cnn", input_shape)
    return nn.Sequential(
        OrderedDict(
            conv0=_conv(channels, FEATURES, 1),
            conv1=_conv(FEATURES, FEATURES, 2),
            conv2=_conv(FEATURES, FEATURES, 4),
            pool=GlobalAveragePool(),
            out=_out(),
        )
    )


class LastHidden(nn.Module):
    """A GRU over the time axis of (n, channels, window); returns the last hidden state."""

    def __init__(self, channels: int, hidden: int = FEATURES, layers: int = 2):
        super().__init__()
        self.gru = nn.GRU(channels, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x.transpose(1, 2))
        return h[-1]


@register_backbone(
    "series-gru",
    feature_dim=FEATURES,
    input_shape=(1, 30),
    preprocessing=PREPROCESSING,
    modality="series",
    last_stage="out",
    lora_targets=("out.0",),
    description="GRU over windows of returns (last hidden state)",
)
def build_series_gru(input_shape: tuple[int, ...] = (1, 30)) -> nn.Module:
    return nn.Sequential(
        OrderedDict(gru=LastHidden(_channels("series-gru", input_shape)), out=_out())
    )


def _channels(name: str, input_shape: tuple[int, ...]) -> int:
    """Channels of a (channels, window) shape; any window length works."""
    if len(input_shape) != 2 or min(int(v) for v in input_shape) < 1:
        raise FerryError(
            f"{name} takes windows of shape (channels, window), not {tuple(input_shape)}: "
            "pretrain it on a price file (`ferry pretrain --data FILE`)"
        )
    return int(input_shape[0])
