"""The feature cache: frozen-trunk outputs computed once per (backbone, data, preprocessing).

Training every round runs only the head on these features; the trunk runs once per example
per run (once per example ever, while the on-disk copy lives). Features never leave the
client. On disk: ``<cache_dir>/features/<key>.safetensors``; in memory per process too.
``trunk_examples`` counts examples that went through a trunk, for tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.data.preprocess import preprocess

_MEMORY: dict[str, dict[str, np.ndarray]] = {}
trunk_examples = 0


def feature_key(backbone_sha256: str, data_fingerprint: str, preprocessing: dict) -> str:
    blob = json.dumps([backbone_sha256, data_fingerprint, preprocessing], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def extract(
    trunk: nn.Module,
    images: np.ndarray,
    preprocessing: dict,
    batch: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """Trunk features of ``images``; the trunk stays in eval mode, no gradients."""
    global trunk_examples
    trunk.eval()
    x = torch.from_numpy(preprocess(images, preprocessing))
    out = []
    if device != "cpu":
        batch *= 8  # large batches keep a GPU busy; features come back to host memory
    trunk = trunk.to(device)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch].to(device)
            out.append(trunk(chunk).reshape(len(chunk), -1).cpu())
    trunk.to("cpu")
    trunk_examples += len(x)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


class FeatureCache:
    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir) / "features"

    def get(
        self,
        key: str,
        trunk: nn.Module,
        preprocessing: dict,
        splits: dict[str, np.ndarray],
        device: str = "cpu",
    ) -> dict[str, np.ndarray]:
        """Features for each named split of images, from memory, disk, or one trunk pass."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file, save_file

        if key in _MEMORY:
            return _MEMORY[key]
        path = self.root / f"{key}.safetensors"
        feats = None
        if path.is_file():
            try:
                feats = load_file(str(path))
                if set(feats) != set(splits) or any(
                    len(feats[k]) != len(v) for k, v in splits.items()
                ):
                    feats = None
            except (SafetensorError, OSError):
                feats = None  # a damaged cache file is recomputed, never trusted
        if feats is None:
            feats = {
                name: extract(trunk, imgs, preprocessing, device=device)
                for name, imgs in splits.items()
            }
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            save_file({k: np.ascontiguousarray(v) for k, v in feats.items()}, str(tmp))
            os.replace(tmp, path)
        _MEMORY[key] = feats
        return feats
