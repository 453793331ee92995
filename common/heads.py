"""Trainable heads, by name. Only a head's arrays travel between clients and server."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ferry.common.errors import FerryError

_HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": lambda d, k: nn.Linear(d, k),
    "mlp": lambda d, k: nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, k)),
}


def known_heads() -> list[str]:
    return sorted(_HEADS)


def build_head(name: str, feature_dim: int, num_classes: int) -> nn.Module:
    try:
        return _HEADS[name](feature_dim, num_classes)
    except KeyError:
        raise FerryError(
            f"unknown head {name!r}: choose one of {', '.join(known_heads())}"
        ) from None
