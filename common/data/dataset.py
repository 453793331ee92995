"""One dataset in memory, whatever its format: what every loader returns.

A loader (image folder, DICOM, tabular CSV/Parquet, price series, molecules, or a built-in
synthetic generator) turns an institution's files into a :class:`Dataset`. Loaders are
stateless: they never compute statistics over the data (means, vocabularies). Standardisation
uses the public statistics in the backbone's manifest (:mod:`common.data.preprocess`), so one
record's presence changes no other record's features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ferry.common.data.frames import canonical
from ferry.common.errors import FerryError

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
    ``classes``: the class names in class-id order. Loaders given the run's public class list
    use it as is (:func:`by_public_classes`); without one the list is derived from the data,
    which only the researcher's side of a simulation does (never a deployed institution).
    ``groups``: per-example key of a natural split (a hospital or branch id), if any.
    ``spans``: series only, (n, 3) datetime64[ns]: the first and last day of each example's
    forecast period, then the first day of its input window (what the public held-out cutoff
    is compared with).
    ``record_keys``: per-example uint64 digest of the raw source record (a table row's cells
    as read, an image file's bytes), computed before any parsing or labelling, so that no run
    setting (label column, class order, categorical columns, task) changes it; the held-out
    split hashes it. None (synthetic data): the split hashes ``x`` and ``y``.
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
    spans: np.ndarray | None = None
    record_keys: np.ndarray | None = None

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
            None if self.spans is None else self.spans[index],
            None if self.record_keys is None else self.record_keys[index],
        )


def class_key(name: object) -> str:
    """How a class name is compared with a label: numbers written canonically (``1.0`` is
    ``1``), text stripped (see :func:`common.data.frames.canonical`)."""
    return canonical(name)


def public_class_ids(classes: Sequence[str]) -> dict[str, int]:
    """Each public class name's id (its position in the run's list)."""
    return {class_key(c): i for i, c in enumerate(classes)}


def unknown_label(label: str, where: str, classes: Sequence[str]) -> FerryError:
    """The one-line refusal of a label that is not one of the run's public classes."""
    return FerryError(
        f"{where} holds the label {label!r}, which is not one of the run's classes "
        f"({', '.join(classes)}): fix or remove those records, or have the run's classes "
        "include it (--classes, or classes in the run config)"
    )


def by_public_classes(data: Dataset, classes: Sequence[str], where: str) -> Dataset:
    """``data`` with class ids taken from the run's public list ``classes``: a record's id is
    the position of its own label in that list, whatever else the data holds. A label not in
    the list is a :class:`FerryError` naming it (nothing is dropped or renumbered)."""
    if not classes or (list(data.classes) == list(classes) and data.task == "classification"):
        return data
    if data.task != "classification":
        raise FerryError(
            f"{where} has a regression target but the run lists classes "
            f"({', '.join(classes)}): drop the classes setting or use a classification task"
        )
    index = public_class_ids(classes)
    mapping = np.asarray([index.get(class_key(c), -1) for c in data.classes], dtype=np.int64)
    present = np.unique(data.y) if len(data.y) else np.zeros(0, dtype=np.int64)
    for k in present:
        if mapping[k] < 0:
            raise unknown_label(str(data.classes[int(k)]), where, classes)
    y = mapping[data.y] if len(data.y) else data.y
    return replace(data, y=y.astype(np.int64), classes=list(classes))
