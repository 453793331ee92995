"""Backbone registry: one file per architecture, registered by name.

A backbone is a frozen trunk mapping a preprocessed input batch to a feature vector of
``feature_dim`` per example. Adding one: a new module here that decorates its builder with
``@register_backbone("name")``, an import below, and a test.
"""

from ferry.common.backbones import (  # noqa: F401  (each module registers its backbones)
    convnext_tiny,
    efficientnet_b0,
    efficientnet_lite0,
    ferry_cnn,
    mobilenet_v3,
    resnet,
    series_encoder,
    tabular_mlp,
    vit_b_16,
)
from ferry.common.backbones.registry import (
    BackboneSpec,
    build_backbone,
    known_backbones,
    register_backbone,
)

__all__ = ["BackboneSpec", "build_backbone", "known_backbones", "register_backbone"]
