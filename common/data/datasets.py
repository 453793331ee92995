"""What an institution trains on: its partition of a dataset, split into train and test.

In simulation every virtual institution regenerates (or reloads) the same dataset and keeps
only its partition; the whole dataset is loaded once per worker process and reused.
The ``fingerprint`` identifies the exact examples, for the feature cache key.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.data.partition import dirichlet_label_skew, train_test_split
from common.data.synthetic import make_images
from common.errors import FerryError


@dataclass(frozen=True)
class DataSpec:
    """Where a simulated federation's data comes from and how it is split."""

    data: str = ""  # "" = built-in synthetic target task; else an image folder
    examples: int = 4000
    num_partitions: int = 10
    alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0
    input_shape: tuple[int, ...] = (1, 32, 32)


@dataclass
class Partition:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    fingerprint: str

    @property
    def num_train(self) -> int:
        return len(self.train_y)


@functools.lru_cache(maxsize=4)
def load_dataset(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(images, labels, number of classes, fingerprint of the source) for ``spec``."""
    if spec.data:
        from common.data.image_folder import load_image_folder

        root = Path(spec.data)
        images, labels, classes = load_image_folder(root, spec.input_shape)
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            st = path.stat()
            h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return images, labels, len(classes), "folder:" + h.hexdigest()
    images, labels = make_images("target", spec.examples, spec.seed)
    source = json.dumps({"task": "target", "n": spec.examples, "seed": spec.seed})
    return images, labels, int(labels.max()) + 1, "synthetic:" + source


@functools.lru_cache(maxsize=4)
def _split(spec: DataSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    _, labels, _, _ = load_dataset(spec)
    if len(labels) < spec.num_partitions:
        raise FerryError(
            f"{len(labels)} examples cannot be split among {spec.num_partitions} clients: "
            "give more data or fewer --clients"
        )
    parts = dirichlet_label_skew(labels, spec.num_partitions, spec.alpha, spec.seed)
    return [train_test_split(p, spec.test_fraction, spec.seed + i) for i, p in enumerate(parts)]


def load_partition(spec: DataSpec, partition_id: int) -> Partition:
    images, labels, num_classes, source = load_dataset(spec)
    train_idx, test_idx = _split(spec)[partition_id]
    key = json.dumps({**asdict(spec), "source": source, "partition": partition_id}, sort_keys=True)
    return Partition(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        num_classes,
        hashlib.sha256(key.encode()).hexdigest(),
    )


def partition_sizes(spec: DataSpec) -> list[int]:
    """Training examples per partition (used to check delta < 1/n before a run starts)."""
    return [len(train) for train, _ in _split(spec)]
