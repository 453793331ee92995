"""``ferry-cnn``: a small convolutional trunk for 1x32x32 images, 64 features.

Small enough to pretrain in seconds on two CPU cores, large enough that pretraining on the
synthetic source task gives features a linear head can use on the target task. Its
BatchNorm layers are part of the frozen trunk and always run in eval mode on clients: their
statistics come from pretraining, never from an institution's data.
"""

from torch import nn

from ferry.common.backbones.registry import register_backbone

PREPROCESSING = {"grayscale": True, "size": 32, "mean": 0.5, "std": 0.25}


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@register_backbone(
    "ferry-cnn",
    feature_dim=64,
    input_shape=(1, 32, 32),
    preprocessing=PREPROCESSING,
    last_stage="12",  # the fourth conv block: children 12-14, then pooling and the feature norm
    description="small CNN for 1x32x32 images, pretrained in seconds on synthetic shapes",
)
def build_ferry_cnn(input_shape: tuple[int, ...] = (1, 32, 32)) -> nn.Module:
    if input_shape[0] != 1:
        raise ValueError("ferry-cnn takes 1-channel images")
    return nn.Sequential(
        *_block(1, 16),
        nn.MaxPool2d(2),
        *_block(16, 32),
        nn.MaxPool2d(2),
        *_block(32, 64),
        nn.MaxPool2d(2),
        *_block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        # Standardises features with statistics of the pretraining data (frozen on clients),
        # so a DP head sees unit-scale inputs whatever the source task's feature scale.
        nn.BatchNorm1d(64, affine=False),
    )
