"""One dataset in memory, whatever its format: what every loader returns.

A loader (image folder, DICOM, tabular CSV/Parquet, price series, molecules, or a built-in
synthetic generator) turns an institution's files into a :class:`Dataset`. Loaders are
stateless: they never compute statistics over the data (means, vocabularies). Standardisation
uses the public statistics in the backbone's manifest (:mod:`common.data.preprocess`), so one
record's presence changes no other record's features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TASKS = ("classification", "regression")


@dataclass
class Dataset:
    """Examples and targets.

    ``x`` (float32), by modality:
      * ``image``: (n, c, h, w) in [0, 1];
      * ``tabular``: (n, d), NaN where a value is missing; ``numeric[j]`` says whether column
        j is a measured number (standardised) or already an indicator (one-hot /
        hashed category, left as is);
      * ``series``: (n, channels, window) sliding windows;
      * ``molecule``: (n, bits) fingerprints in {0, 1}.
    ``y``: int64 class ids for classification, float32 targets for regression.
    ``groups``: per-example key of a natural split (a hospital or branch id), if any.
    ``fingerprint``: identifies the exact content (files' names, sizes and mtimes, or a
    generator's parameters); it keys the feature cache.
    """

    x: np.ndarray
    y: np.ndarray
    task: str
    classes: list[str]
    fingerprint: str
    modality: str
    groups: np.ndarray | None = None
    columns: list[str] = field(default_factory=list)
    numeric: np.ndarray | None = None
    # Regression targets that are returns: report directional accuracy too.
    directional: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.task == "classification" else 0

    @property
    def out_dim(self) -> int:
        """Width of the model output: one logit per class, or one regression value."""
        return self.num_classes if self.task == "classification" else 1

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(
            self.x[index],
            self.y[index],
            self.task,
            self.classes,
            self.fingerprint,
            self.modality,
            None if self.groups is None else self.groups[index],
            self.columns,
            self.numeric,
            self.directional,
        )
