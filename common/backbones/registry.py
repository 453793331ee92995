"""The backbone registry (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from common.errors import FerryError


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered architecture needs and produces.

    ``preprocessing`` is recorded in every manifest: the client applies exactly this to its
    raw examples before the trunk sees them.
    """

    name: str
    feature_dim: int
    input_shape: tuple[int, ...]
    preprocessing: dict = field(default_factory=dict)
    builder: Callable[[], nn.Module] | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str, *, feature_dim: int, input_shape: tuple[int, ...], preprocessing: dict
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    def decorator(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneSpec(name, feature_dim, input_shape, preprocessing, builder)
        return builder

    return decorator


def known_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FerryError(
            f"unknown backbone {name!r}: choose one of {', '.join(known_backbones())}"
        ) from None


def build_backbone(name: str) -> nn.Module:
    """A randomly initialised trunk of architecture ``name``."""
    spec = backbone_spec(name)
    assert spec.builder is not None
    return spec.builder()
