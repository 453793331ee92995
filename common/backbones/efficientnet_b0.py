"""``efficientnet_b0``: torchvision's EfficientNet-B0 cut into stages.

Stages: ``stem`` (``features.0``), ``stage1`` .. ``stage7`` (torchvision's MBConv stages
``features.1-7``), ``head`` (the 1x1 conv to 1280 channels, ``features.8``), ``pool``
(average pool, flatten): 1280 features. ``last_stage`` is ``stage7``: the last MBConv stage
(one block, 192 -> 320 channels) and ``head``. Stochastic depth inside the blocks only acts
in training mode, as in torchvision.
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


def efficientnet_stages(net: nn.Module) -> nn.Sequential:
    features = list(net.features)
    return named_stages(
        stem=features[0],
        **{f"stage{i}": stage for i, stage in enumerate(features[1:-1], 1)},
        head=features[-1],
        pool=pool_and_flatten(net.avgpool),
    )


EFFICIENTNET_B0 = register_origin(
    "efficientnet_b0",
    Origin(
        torchvision_original("efficientnet_b0"),
        efficientnet_stages,
        torchvision_imagenet("EfficientNet_B0_Weights"),
        head=("classifier.",),
    ),
)


@register_backbone(
    "efficientnet_b0",
    feature_dim=1280,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224),
    last_stage="stage7",
    description="torchvision EfficientNet-B0 (4.0M parameters in the trunk), 1280 features",
)
def build_efficientnet_b0(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return EFFICIENTNET_B0.build(input_shape)
