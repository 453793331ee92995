"""Backbone registry: one file per architecture, registered by name.

A backbone is a frozen trunk mapping a preprocessed input batch to a feature vector of
``feature_dim`` per example. Adding one: a new module here that decorates its builder with
``@register_backbone("name")``, an import below, and a test.
"""

from common.backbones import ferry_cnn  # noqa: F401  (registers "ferry-cnn")
from common.backbones.registry import (
    BackboneSpec,
    build_backbone,
    known_backbones,
    register_backbone,
)

__all__ = ["BackboneSpec", "build_backbone", "known_backbones", "register_backbone"]
