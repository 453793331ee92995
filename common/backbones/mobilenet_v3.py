"""``mobilenet_v3_large``: torchvision's MobileNetV3-Large cut into stages.

Stages: ``stem`` (``features.0``), ``stage1`` .. ``stage6`` (the inverted-residual blocks
``features.1-15`` grouped by output width: 16, 24, 40, 80, 112, 160 channels), ``head`` (the
1x1 conv to 960 channels, ``features.16``), ``pool`` (average pool, flatten): 960 features,
taken before torchvision's classifier (whose first Linear to 1280 is part of the head left
out). ``last_stage`` is ``stage6``: the three 160-channel blocks at 1/32 resolution and
``head``.
"""

from torch import nn

from ferry.common.backbones.origins import (
    Origin,
    image_preprocessing,
    named_stages,
    pool_and_flatten,
    register_origin,
    torchvision_imagenet,
    torchvision_original,
)
from ferry.common.backbones.registry import register_backbone


def mobilenet_v3_stages(net: nn.Module) -> nn.Sequential:
    groups: list[list[nn.Module]] = []
    for block in list(net.features)[1:-1]:
        if not groups or groups[-1][-1].out_channels != block.out_channels:
            groups.append([])
        groups[-1].append(block)
    return named_stages(
        stem=net.features[0],
        **{f"stage{i}": nn.Sequential(*blocks) for i, blocks in enumerate(groups, 1)},
        head=net.features[-1],
        pool=pool_and_flatten(net.avgpool),
    )


MOBILENET_V3_LARGE = register_origin(
    "mobilenet_v3_large",
    Origin(
        torchvision_original("mobilenet_v3_large"),
        mobilenet_v3_stages,
        torchvision_imagenet("MobileNet_V3_Large_Weights"),
        head=("classifier.",),
    ),
)


@register_backbone(
    "mobilenet_v3_large",
    feature_dim=960,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224),
    last_stage="stage6",
    description="torchvision MobileNetV3-Large (3.0M parameters in the trunk), 960 features",
)
def build_mobilenet_v3_large(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return MOBILENET_V3_LARGE.build(input_shape)
