"""The feature cache: frozen-trunk outputs at the split point, computed once per
(backbone, data, preprocessing, split point).

The trunk is the frozen part of the backbone up to the first trainable module
(:mod:`common.trainable`); training every round runs only the trainable tail on these
activations. The trunk runs once per example per run (once per example ever, while the
on-disk copy lives). Activations never leave the client.

Every example is preprocessed with the manifest's preprocessing alone (public statistics,
covered by the backbone hash that is part of the key): no statistic of the client's data
enters the features, so one record's presence changes no other record's activations. A
manifest asking for statistics fitted on local data is refused before any cached copy is
served (:func:`common.data.preprocess.check_preprocessing`).

On disk: ``<cache_dir>/features/<key>/<split>.npy``. A file larger than ``MMAP_BYTES`` is
written batch by batch into a memory map and read back memory-mapped, so split-point
activations of a large backbone (e.g. ResNet-50 before ``layer4``) need not fit in memory.
The per-process memory cache keeps the arrays (or memory maps) by key. Features are as
sensitive as the data: every cache file is created 0600 and every directory made for it
0700 (:mod:`common.private_files`), so another local user reads none of them.
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

from ferry.common.atomic_files import atomic_path
from ferry.common.data.preprocess import check_preprocessing, preprocess
from ferry.common.private_files import PRIVATE_FILE, private_dir
from ferry.common.progress import Progress

MMAP_BYTES = 64 * 2**20
_MEMORY: dict[str, dict[str, np.ndarray]] = {}
trunk_examples = 0


def feature_key(
    backbone_sha256: str, data_fingerprint: str, preprocessing: dict, split: str = ""
) -> str:
    """Identity of one set of activations; ``split`` names the first trainable stage
    ("" = the backbone's output features)."""
    blob = json.dumps([backbone_sha256, data_fingerprint, preprocessing, split], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def extract(
    trunk: nn.Module,
    examples: np.ndarray,
    preprocessing: dict,
    batch: int = 256,
    device: str = "cpu",
    out_path: Path | None = None,
) -> np.ndarray:
    """Trunk outputs for ``examples`` (preprocessed batch by batch); the trunk stays in eval
    mode, no gradients. With ``out_path`` and a large result, the outputs are written into a
    memory-mapped ``.npy`` there (returned memory-mapped)."""
    global trunk_examples
    trunk.eval()
    n = len(examples)
    if device != "cpu":
        batch *= 8  # large batches keep a GPU busy; outputs come back to host memory
    trunk = trunk.to(device)
    out: np.ndarray | None = None
    progress = Progress("extracting features", n)
    with torch.no_grad():
        for i in range(0, n, batch):
            chunk = torch.from_numpy(preprocess(examples[i : i + batch], preprocessing))
            y = trunk(chunk.to(device)).cpu().numpy().astype(np.float32)
            if out is None:
                shape = (n, *y.shape[1:])
                big = n * int(np.prod(y.shape[1:])) * 4 > MMAP_BYTES
                if big and out_path is not None:
                    out = np.lib.format.open_memmap(out_path, "w+", np.float32, shape)
                else:
                    out = np.empty(shape, np.float32)
            out[i : i + len(y)] = y
            progress.update(i + len(y))
    progress.finish()
    trunk.to("cpu")
    trunk_examples += n
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    if isinstance(out, np.memmap):
        out.flush()
    return out


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
        """Activations for each named split of examples, from memory, disk, or one trunk
        pass. FerryError when ``preprocessing`` is not data-independent, even if a copy made
        by an older version is cached."""
        check_preprocessing(preprocessing)
        if key in _MEMORY:
            return _MEMORY[key]
        directory = self.root / key
        feats = self._load(directory, splits)
        if feats is None:
            private_dir(directory)
            feats = {}
            for name, examples in splits.items():
                # Created 0600 before a byte is written; np.save and the memory map keep it.
                final = directory / f"{name}.npy"
                with atomic_path(final, mode=PRIVATE_FILE, suffix=".tmp.npy") as tmp:
                    arr = extract(trunk, examples, preprocessing, device=device, out_path=tmp)
                    if not isinstance(arr, np.memmap):
                        np.save(tmp, arr)
                    del arr
            feats = self._load(directory, splits)
            assert feats is not None, f"features just written to {directory} do not read back"
        _MEMORY[key] = feats
        return feats

    @staticmethod
    def _load(directory: Path, splits: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The cached activations, or None when any split is missing, damaged or stale."""
        feats = {}
        for name, examples in splits.items():
            path = directory / f"{name}.npy"
            if not path.is_file():
                return None
            try:
                big = path.stat().st_size > MMAP_BYTES
                arr = np.load(path, mmap_mode="r" if big else None, allow_pickle=False)
            except (ValueError, OSError, EOFError):
                return None  # a damaged cache file is recomputed, never trusted
            if len(arr) != len(examples):
                return None
            feats[name] = arr
        return feats
