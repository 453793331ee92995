"""``convnext_tiny``: torchvision's ConvNeXt-Tiny cut into stages.

Stages: ``stem`` (``features.0``: 4x4 patchify conv, LayerNorm), ``stage1`` (``features.1``),
then for k = 2, 3, 4 ``down<k>`` (the LayerNorm + 2x2 stride-2 conv between stages,
``features.{2k-2}``) and ``stage<k>`` (``features.{2k-1}``), and ``pool`` (average pool,
torchvision's final LayerNorm ``classifier.0``, flatten): 768 features. ``last_stage`` is
``down4``: the downsampling into the last stage belongs to it, as ResNet's ``layer4`` starts
with its strided block. Stochastic depth only acts in training mode, as in torchvision.
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


def convnext_stages(net: nn.Module) -> nn.Sequential:
    f = list(net.features)
    return named_stages(
        stem=f[0],
        stage1=f[1],
        down2=f[2],
        stage2=f[3],
        down3=f[4],
        stage3=f[5],
        down4=f[6],
        stage4=f[7],
        pool=pool_and_flatten(net.avgpool, ("norm", net.classifier[0])),
    )


CONVNEXT_TINY = register_origin(
    "convnext_tiny",
    Origin(
        torchvision_original("convnext_tiny"),
        convnext_stages,
        torchvision_imagenet("ConvNeXt_Tiny_Weights"),
        head=("classifier.2.",),
    ),
)


@register_backbone(
    "convnext_tiny",
    feature_dim=768,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224),
    last_stage="down4",
    description="torchvision ConvNeXt-Tiny (27.8M parameters in the trunk), 768 features",
)
def build_convnext_tiny(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return CONVNEXT_TINY.build(input_shape)
