"""The backbone registry (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ferry.common.errors import FerryError

MODALITIES = ("image", "tabular", "series", "molecule")


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered architecture needs and produces.

    A builder takes the input shape (``input_shape`` by default; tabular and series encoders
    take the width of their source data) and returns an ``nn.Sequential`` of named stages
    mapping a preprocessed batch to ``(n, feature_dim)`` features. The stage structure is
    what trainable parts split at (:mod:`common.trainable`):

    * ``last_stage``: name of the first child that belongs to the last block; ``last-block``
      and ``conv-adapter`` train from there on ("" = the architecture has none).
    * ``lora_targets``: default name patterns (``fnmatch``, on module names relative to the
      backbone) of the Linear layers that ``lora`` adapts ("" = none).

    ``preprocessing`` is recorded in every manifest: the client applies exactly this to its
    raw examples before the trunk sees them.
    """

    name: str
    feature_dim: int
    input_shape: tuple[int, ...]
    preprocessing: dict = field(default_factory=dict)
    builder: Callable[..., nn.Module] | None = None
    modality: str = "image"
    last_stage: str = ""
    lora_targets: tuple[str, ...] = ()
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    *,
    feature_dim: int,
    input_shape: tuple[int, ...],
    preprocessing: dict,
    modality: str = "image",
    last_stage: str = "",
    lora_targets: tuple[str, ...] = (),
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    if modality not in MODALITIES:
        raise ValueError(f"backbone {name!r}: modality {modality!r} not in {MODALITIES}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneSpec(
            name,
            feature_dim,
            tuple(input_shape),
            preprocessing,
            builder,
            modality,
            last_stage,
            tuple(lora_targets),
            description,
        )
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


def build_backbone(name: str, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A randomly initialised trunk of architecture ``name`` for inputs of ``input_shape``
    (default: the registered shape)."""
    spec = backbone_spec(name)
    assert spec.builder is not None
    return spec.builder(tuple(input_shape or spec.input_shape))
