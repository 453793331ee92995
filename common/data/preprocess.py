"""Preprocessing named in a backbone manifest, applied on the client to its raw examples.

Images: channel conversion, resize and normalisation with the manifest's fixed constants.
Tables and series: standardisation with statistics the client fits on **its own training
split** (:func:`fit_local`). Those statistics stay on the client: they are never sent,
logged or cached outside the client's own cache directory. Missing table values become 0
after standardisation (the local mean).
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import Dataset


def kind_of(preprocessing: dict) -> str:
    return str(preprocessing.get("kind", "image"))


def fit_local(train: Dataset, preprocessing: dict) -> dict:
    """Statistics of ``train`` that the manifest's preprocessing needs (may be empty)."""
    kind = kind_of(preprocessing)
    if kind == "tabular" and preprocessing.get("standardize") == "local":
        x = np.asarray(train.x, dtype=np.float64)
        numeric = _numeric_mask(train, x.shape[1])
        mean = np.zeros(x.shape[1])
        std = np.ones(x.shape[1])
        if len(x) and numeric.any():
            cols = x[:, numeric]
            with np.errstate(all="ignore"):
                m = np.nanmean(cols, axis=0) if np.isfinite(cols).any() else np.zeros(cols.shape[1])
                s = np.nanstd(cols, axis=0)
            mean[numeric] = np.nan_to_num(m)
            std[numeric] = np.where(np.nan_to_num(s) > 1e-8, np.nan_to_num(s), 1.0)
        return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
    if kind == "series" and preprocessing.get("standardize") == "local":
        x = np.asarray(train.x, dtype=np.float64)  # (n, channels, window)
        if not len(x):
            return {
                "mean": np.zeros((1, x.shape[1], 1), np.float32),
                "std": np.ones((1, x.shape[1], 1), np.float32),
            }
        mean = np.nanmean(x, axis=(0, 2), keepdims=True)
        std = np.nanstd(x, axis=(0, 2), keepdims=True)
        std = np.where(std > 1e-8, std, 1.0)
        return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
    return {}


def _numeric_mask(data: Dataset, width: int) -> np.ndarray:
    if data.numeric is None:
        return np.ones(width, dtype=bool)
    return np.asarray(data.numeric, dtype=bool)


def preprocess(x: np.ndarray, preprocessing: dict, stats: dict | None = None) -> np.ndarray:
    """One batch of raw examples, ready for the trunk (float32)."""
    kind = kind_of(preprocessing)
    x = np.asarray(x, dtype=np.float32)
    if kind == "image":
        return _image(x, preprocessing)
    if stats:
        x = (x - stats["mean"]) / stats["std"]
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _image(x: np.ndarray, pre: dict) -> np.ndarray:
    channels = int(pre.get("channels", x.shape[1]))
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = np.repeat(x, channels, axis=1)
        elif channels == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    size = pre.get("size")
    if size and (x.shape[2] != size or x.shape[3] != size):
        import torch

        t = torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(x)),
            size=(int(size), int(size)),
            mode="bilinear",
            align_corners=False,
            antialias=x.shape[2] > size,
        )
        x = t.numpy()
    mean = np.asarray(pre.get("mean", 0.0), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.get("std", 1.0), dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)
