"""Per-institution arrays in one file: what ``ferry.simulate(data=...)`` is given in memory.

An arrays file is a NumPy ``.npz`` (read without pickle) holding ``x`` (n examples: images
(n, c, h, w) or table rows (n, d), the model's inputs as they are), ``y`` (integer classes
or float targets) and ``institution`` (each example's institution name). ``--partition
natural`` gives each institution its own rows; each keeps its held-out split as with any
data. Class names are the distinct integer labels, in order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import atomic_path
from ferry.common.data.dataset import Dataset
from ferry.common.errors import FerryError
from ferry.common.private_files import PRIVATE_FILE, private_dir

SUFFIX = ".npz"
KEYS = ("x", "y", "institution")
MODALITY_BY_NDIM = {4: "image", 2: "tabular"}


def is_arrays_file(data: str) -> bool:
    return str(data).lower().endswith(SUFFIX)


def as_arrays(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One institution's examples and targets as arrays (float32 x; int64 or float32 y)."""
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    y = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    if x.dtype == object or y.dtype == object:
        raise FerryError(f"{name}'s arrays hold Python objects: give numeric arrays")
    if len(x) != len(y) or y.ndim != 1:
        raise FerryError(
            f"{name} has {len(x)} examples but targets of shape {y.shape}: give one target "
            "per example"
        )
    if x.ndim not in MODALITY_BY_NDIM:
        raise FerryError(
            f"{name}'s examples have shape {x.shape[1:]}: give images as (n, c, h, w) or table "
            "rows as (n, d)"
        )
    integral = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    return x.astype(np.float32), y.astype(np.int64 if integral else np.float32)


def write_arrays(folder: str | os.PathLike, institutions: dict[str, tuple]) -> Path:
    """Write ``{name: (x, y)}`` as one arrays file in ``folder``, named by its content's
    sha256 (the same arrays reuse one file and their cached features)."""
    if len(institutions) < 1:
        raise FerryError("data names no institution: give one (x, y) per institution")
    parts = {name: as_arrays(x, y, name) for name, (x, y) in institutions.items()}
    shapes = {x.shape[1:] for x, _ in parts.values()}
    kinds = {y.dtype.kind for _, y in parts.values()}
    if len(shapes) > 1 or len(kinds) > 1:
        raise FerryError(
            "the institutions' arrays differ in example shape or target type "
            f"({sorted(map(str, shapes))}): give every institution the same kind of data"
        )
    x = np.concatenate([x for x, _ in parts.values()])
    y = np.concatenate([y for _, y in parts.values()])
    names = np.concatenate([np.full(len(yy), name) for name, (_, yy) in parts.items()])
    digest = hashlib.sha256()
    for array in (x, y, names.astype("U")):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    path = Path(folder) / f"{digest.hexdigest()[:32]}{SUFFIX}"
    if not path.exists():  # every institution's raw examples: 0600 in a 0700 folder
        private_dir(path.parent)
        with atomic_path(path, mode=PRIVATE_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=x, y=y, institution=names.astype("U"))
    return path


def load_arrays(path: str) -> Dataset:
    """The dataset of an arrays file (see the module docstring); a FerryError if it is not
    one."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise FerryError(
                    f"{path} is not a Ferry arrays file (no {', '.join(missing)}): write it "
                    "with x, y and institution arrays"
                )
            x, y, groups = (npz[k] for k in KEYS)
    except (OSError, ValueError) as exc:
        raise FerryError(f"{path} is not a readable .npz arrays file ({exc}): rewrite it") from None
    x, y = as_arrays(x, y, path)
    if y.dtype == np.int64:
        values, y = np.unique(y, return_inverse=True)
        task, classes = "classification", [str(v) for v in values]
    else:
        task, classes = "regression", []
    modality = MODALITY_BY_NDIM[x.ndim]
    return Dataset(
        x,
        y.astype(np.int64) if task == "classification" else y,
        task,
        classes,
        _fingerprint(path),
        modality,
        groups=groups.astype(str),
        columns=[f"x{j}" for j in range(x.shape[1])] if modality == "tabular" else [],
    )


def _fingerprint(path: str) -> str:
    """Like the other loaders': the file's name, size and mtime."""
    stat = Path(path).stat()
    return f"arrays:{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
