"""Preprocessing named in a backbone manifest, applied on the client to its raw examples."""

from __future__ import annotations

import numpy as np


def preprocess(images: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Normalise images in [0, 1] of shape (n, c, h, w) as the manifest says."""
    mean = float(preprocessing.get("mean", 0.0))
    std = float(preprocessing.get("std", 1.0))
    return ((images - mean) / std).astype(np.float32)
