"""The backbone registry (see the package docstring).

A backbone is named three ways:

* a zoo name (``resnet18``), registered by this package's modules;
* an **import path** ``package.module:builder`` to a builder decorated with
  :func:`backbone`, in code the user installed. It resolves the same way in the server,
  every Ray worker and every deployed client, each importing the module itself; the weights
  still travel as a hashed artifact. Importing a module runs its code, so a process imports
  only the paths it trusts (:func:`trusted_code`): those an installed distribution declares
  in the ``ferry.backbones`` entry-point group, those listed in ``FERRY_BACKBONE_CODE``, and
  those this process trusted itself (``ferry simulate --backbone PATH``: the researcher named
  it). A deployed institution trusts only the first two, so an operator cannot make it
  import an arbitrary installed module by naming it in a run config;
* a name registered in this process (:func:`register_backbone`, or ``ferry.simulate`` with
  an ``nn.Module``: :mod:`common.backbones.own_module`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points

from torch import nn

from ferry.common.errors import FerryError
from ferry.common.imports import IMPORT_PATH, import_object, is_import_path

ENTRY_POINT_GROUP = "ferry.backbones"
TRUST_VAR = "FERRY_BACKBONE_CODE"

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
_ZOO: set[str] = set()  # names registered by register_backbone (Ferry's modules)
_TRUSTED: set[str] = set()  # import paths this process was told to trust (trust_code)


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
    """Register one of Ferry's own backbones by ``name`` (the zoo): :func:`backbone`'s
    declaration, under a name instead of an import path."""
    declare = backbone(
        feature_dim=feature_dim,
        input_shape=input_shape,
        preprocessing=preprocessing,
        modality=modality,
        last_stage=last_stage,
        lora_targets=lora_targets,
        description=description,
    )

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        declare(builder)
        _ZOO.add(name)
        _REGISTRY[name] = replace(builder.ferry_backbone, name=name)  # type: ignore[attr-defined]
        return builder

    return decorator


def backbone(
    *,
    feature_dim: int,
    input_shape: tuple[int, ...],
    preprocessing: dict | None = None,
    modality: str = "image",
    last_stage: str = "",
    lora_targets: tuple[str, ...] = (),
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Declare a builder as a Ferry backbone named by its import path (``ferry.backbone``).

    The builder takes the input shape and returns an ``nn.Sequential`` of named stages
    mapping a preprocessed batch to ``(n, feature_dim)`` features (see :class:`BackboneSpec`).
    Nothing is registered at import: the path (``--backbone mypkg.models:build_net``) names
    it wherever it is resolved."""
    if modality not in MODALITIES:
        raise ValueError(f"backbone modality {modality!r} not in {MODALITIES}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        builder.ferry_backbone = BackboneSpec(  # type: ignore[attr-defined]
            "",
            feature_dim,
            tuple(input_shape),
            dict(preprocessing or {"kind": modality}),
            builder,
            modality,
            last_stage,
            tuple(lora_targets),
            description,
        )
        return builder

    return decorator


def register_spec(spec: BackboneSpec) -> BackboneSpec:
    """Register (or re-register) a spec built at run time: ``ferry.simulate``'s own module."""
    if spec.name in _ZOO:
        raise ValueError(f"backbone {spec.name!r} is one of Ferry's own")
    _REGISTRY[spec.name] = spec
    return spec


def known_backbones() -> list[str]:
    """Ferry's own backbones (the zoo)."""
    return sorted(_ZOO)


def registered_backbones() -> set[str]:
    """Every name this process can build now (the zoo, resolved paths, own modules)."""
    return set(_REGISTRY)


def trust_code(path: str) -> None:
    """Let this process import backbone ``path`` (the person running it named it)."""
    _TRUSTED.add(path)


def declared_code() -> set[str]:
    """Import paths that installed distributions declare as Ferry backbones."""
    return {ep.value.replace(" ", "") for ep in entry_points(group=ENTRY_POINT_GROUP)}


def trusted_code(path: str) -> bool:
    listed = {p.strip() for p in os.environ.get(TRUST_VAR, "").split(",") if p.strip()}
    return path in _TRUSTED or path in listed or path in declared_code()


def backbone_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if is_import_path(name):
        _REGISTRY[name] = _imported(name)
        return _REGISTRY[name]
    raise FerryError(
        f"unknown backbone {name!r}: choose one of {', '.join(known_backbones())}, or name "
        "your own by its import path (package.module:builder)"
    )


def _imported(path: str) -> BackboneSpec:
    """The spec of the decorated builder at import path ``path`` (see the module docstring)."""
    if not IMPORT_PATH.fullmatch(path):
        raise FerryError(f"backbone {path!r} is not an import path: write package.module:builder")
    if not trusted_code(path):
        module_name = path.split(":")[0]
        raise FerryError(
            f"backbone code {path!r} is not installed here as a Ferry backbone: install the "
            f"package that provides {module_name} (it declares {path} in its "
            f"{ENTRY_POINT_GROUP!r} entry points), or list it in {TRUST_VAR} to trust it"
        )
    spec = getattr(import_object(path, "backbone"), "ferry_backbone", None)
    if not isinstance(spec, BackboneSpec):
        raise FerryError(
            f"backbone {path!r} is not a Ferry backbone: decorate its builder with "
            "@ferry.backbone(feature_dim=..., input_shape=...)"
        )
    return replace(spec, name=path)


def build_backbone(name: str, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A randomly initialised trunk of architecture ``name`` for inputs of ``input_shape``
    (default: the registered shape)."""
    spec = backbone_spec(name)
    assert spec.builder is not None
    return spec.builder(tuple(input_shape or spec.input_shape))
