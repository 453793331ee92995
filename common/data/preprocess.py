"""Preprocessing named in a backbone manifest, applied on the client to its raw examples.

Contract: the map from one raw example to what the trunk sees is **data-independent**: it
depends on that example and on the manifest alone, never on the institution's other
examples. So adding or removing one record changes no other record's features, and DP-SGD's
clipping bound C holds for the whole pipeline (a statistic fitted on the private training
split would let one record move every other record's clipped gradient).

* Images: channel conversion, resize and normalisation with the manifest's fixed constants.
* Tables and series (``"standardize": "public"``): ``clip((x - mean) / std, -clip, clip)``
  with per-column (tables) or per-channel (series) ``mean`` and ``std`` that ``ferry pretrain``
  fitted on its *public* source data (:func:`public_preprocessing`) and wrote into the
  manifest, so they are covered by the backbone's sha256. A missing table value becomes 0
  (the public mean). A random-init backbone carries fixed statistics (mean 0, std 1).
* Molecules: fingerprint bits as they are.

A manifest that asks the client to fit statistics on its own data (``"standardize":
"local"``, written by older versions) is refused with a :class:`FerryError`.
"""

from __future__ import annotations

import warnings

import numpy as np

from ferry.common.data.dataset import Dataset
from ferry.common.errors import FerryError

PUBLIC = "public"
# Standardised values are clipped to [-CLIP, CLIP]: a fixed bound, so one extreme value
# cannot dominate a feature (it changes nothing about DP, which clipping of gradients bounds).
CLIP = 5.0
STANDARDIZED = ("tabular", "series")


def kind_of(preprocessing: dict) -> str:
    return str(preprocessing.get("kind", "image"))


def public_preprocessing(preprocessing: dict, source: Dataset) -> dict:
    """``preprocessing`` (a backbone spec's) completed with statistics of ``source``, which
    must be public to the federation: ``ferry pretrain``'s synthetic source task or the
    server's own file. The result goes into the manifest; never call this on an
    institution's data."""
    kind = kind_of(preprocessing)
    if kind not in STANDARDIZED:
        return dict(preprocessing)
    x = np.asarray(source.x, dtype=np.float64)
    if kind == "tabular":
        numeric = _numeric_mask(source, x.shape[1])
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
        if len(x) and numeric.any():
            with warnings.catch_warnings():  # an all-missing column gets mean 0, std 1
                warnings.simplefilter("ignore", RuntimeWarning)
                mean[numeric] = np.nan_to_num(np.nanmean(x[:, numeric], axis=0))
                std[numeric] = np.nan_to_num(np.nanstd(x[:, numeric], axis=0))
    else:  # (n, channels, window)
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
        if len(x):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nan_to_num(np.nanmean(x, axis=(0, 2)))
                std = np.nan_to_num(np.nanstd(x, axis=(0, 2)))
    std = np.where(std > 1e-8, std, 1.0)
    return _with_stats(preprocessing, mean, std)


def fixed_preprocessing(preprocessing: dict, input_shape: tuple[int, ...]) -> dict:
    """``preprocessing`` with fixed statistics (mean 0, std 1) for a trunk that saw no data
    (random init): tables of ``input_shape`` (d,), series of (channels, window)."""
    if kind_of(preprocessing) not in STANDARDIZED:
        return dict(preprocessing)
    width = int(input_shape[0])
    return _with_stats(preprocessing, np.zeros(width), np.ones(width))


def _with_stats(preprocessing: dict, mean: np.ndarray, std: np.ndarray) -> dict:
    # float32 values written as exact Python floats: the client rebuilds the same float32s.
    as_list = lambda a: [float(v) for v in np.asarray(a, dtype=np.float32)]  # noqa: E731
    return {
        **preprocessing,
        "standardize": PUBLIC,
        "mean": as_list(mean),
        "std": as_list(std),
        "clip": CLIP,
    }


def _numeric_mask(data: Dataset, width: int) -> np.ndarray:
    if data.numeric is None:
        return np.ones(width, dtype=bool)
    return np.asarray(data.numeric, dtype=bool)


def check_preprocessing(preprocessing: dict) -> None:
    """FerryError unless the manifest's preprocessing is data-independent (see the module
    docstring). The client calls this before it uses a backbone, cached features included."""
    kind = kind_of(preprocessing)
    if kind not in STANDARDIZED or "standardize" not in preprocessing:
        return
    how = preprocessing.get("standardize")
    if how == "local":
        raise FerryError(
            "this backbone's manifest asks each institution to standardise with statistics of "
            "its own private data ('standardize': 'local'), which breaks the DP bound: re-run "
            "`ferry pretrain` (or re-import the backbone) to get a manifest with public statistics"
        )
    if how != PUBLIC or not all(k in preprocessing for k in ("mean", "std", "clip")):
        raise FerryError(
            f"backbone preprocessing 'standardize': {how!r} without public mean, std and clip is "
            "unknown: re-run `ferry pretrain` to get a manifest with public statistics"
        )


def _stats(preprocessing: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    check_preprocessing(preprocessing)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    width = x.shape[1] if x.ndim >= 2 else 0
    if mean.shape != (width,) or std.shape != (width,):
        what = "columns" if kind_of(preprocessing) == "tabular" else "channels"
        raise FerryError(
            f"the data has {width} {what} but the backbone's public statistics cover "
            f"{len(mean)}: give data with the layout the backbone was pretrained on"
        )
    if kind_of(preprocessing) == "series":
        mean, std = mean.reshape(1, -1, 1), std.reshape(1, -1, 1)
    return mean, std, float(preprocessing["clip"])


def preprocess(x: np.ndarray, preprocessing: dict) -> np.ndarray:
    """One batch of raw examples, ready for the trunk (float32). Each output row depends on
    its own input row and the manifest only."""
    kind = kind_of(preprocessing)
    x = np.asarray(x, dtype=np.float32)
    if kind == "image":
        return _image(x, preprocessing)
    if kind in STANDARDIZED and "standardize" in preprocessing:
        mean, std, clip = _stats(preprocessing, x)
        x = (x - mean) / std
        x = np.nan_to_num(x, nan=0.0, posinf=clip, neginf=-clip)
        return np.clip(x, -clip, clip).astype(np.float32)
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
