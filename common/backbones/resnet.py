"""``resnet18`` and ``resnet50``: torchvision's ResNets cut into stages.

Stages: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` .. ``layer4``, ``pool`` (global
average pool, flatten). ``last_stage`` is ``layer4`` (the last resolution stage, its
downsampling block included). Weights map 1:1 from torchvision's layout (``conv1.weight`` ->
``stem.conv1.weight``, ``layer1.*`` unchanged; ``fc`` is the classifier and is left out).
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


def resnet_stages(net: nn.Module) -> nn.Sequential:
    return named_stages(
        stem=named_stages(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool),
        layer1=net.layer1,
        layer2=net.layer2,
        layer3=net.layer3,
        layer4=net.layer4,
        pool=pool_and_flatten(net.avgpool),
    )


RESNET18 = register_origin(
    "resnet18",
    Origin(
        torchvision_original("resnet18"),
        resnet_stages,
        torchvision_imagenet("ResNet18_Weights"),
        head=("fc.",),
    ),
)
RESNET50 = register_origin(
    "resnet50",
    Origin(
        torchvision_original("resnet50"),
        resnet_stages,
        torchvision_imagenet("ResNet50_Weights"),
        head=("fc.",),
    ),
)


@register_backbone(
    "resnet18",
    feature_dim=512,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224),
    last_stage="layer4",
    description="torchvision ResNet-18 (11.2M parameters), 512 features",
)
def build_resnet18(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return RESNET18.build(input_shape)


@register_backbone(
    "resnet50",
    feature_dim=2048,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224),
    last_stage="layer4",
    description="torchvision ResNet-50 (23.5M parameters), 2048 features",
)
def build_resnet50(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return RESNET50.build(input_shape)
