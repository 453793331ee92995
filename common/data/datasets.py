"""What an institution trains on: its partition of a dataset, split into train and test.

The dataset comes from the run's scenario (:mod:`common.scenarios`): its built-in synthetic
data, or the user's file or folder (``--data``) read by the scenario's loader. In simulation
every virtual institution reloads (or regenerates) the same dataset and keeps only its
partition; the whole dataset is loaded once per worker process and reused. A deployed
institution's partition is all of its own data. The ``fingerprint`` identifies the exact
examples, for the feature cache key.

Nothing an institution trains on is fitted to its own data: class ids come from the run's
public class list (``classes``; a deployed institution refuses a classification run without
one), and price series are split by the run's public cutoff date (``test_from``; a deployed
institution refuses a series without one). Only the researcher's side of a simulation, which
holds the pooled data and is public to the researcher, may derive either from the data when
the run leaves it unset.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from ferry.common.data.arrays import is_arrays_file, load_arrays
from ferry.common.data.dataset import Dataset, by_public_classes
from ferry.common.data.partition import (
    cutoff_split,
    default_cutoff,
    partition,
    record_digests,
    train_test_split,
)
from ferry.common.errors import FerryError
from ferry.common.scenarios import get_scenario


@dataclass(frozen=True)
class DataSpec:
    """Where a federation's data comes from, how it is read and how it is split."""

    scenario: str = "hospital-imaging"
    data: str = ""  # "" = the scenario's built-in synthetic data
    examples: int = 4000
    num_partitions: int = 10
    partition: str = "dirichlet"
    partition_column: str = ""
    alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0
    input_shape: tuple[int, ...] = (1, 32, 32)  # images from folders are read at this size
    label_column: str = ""
    categorical: tuple[str, ...] = ()
    task: str = "auto"
    classes: tuple[str, ...] = ()  # the run's public class list (() = derive: simulation only)
    date_column: str = ""
    value_columns: tuple[str, ...] = ()
    window: int = 30
    horizon: int = 1
    test_from: str = ""  # price series: the public held-out cutoff date
    smiles_column: str = ""
    skip_unreadable: bool = False
    deployed: bool = False  # a deployed institution: nothing may be derived from its data

    @classmethod
    def from_run(cls, cfg, num_partitions: int, input_shape: tuple[int, ...]) -> DataSpec:
        """The data settings of a :class:`~common.config.RunConfig` (scenario defaults
        already applied)."""
        return cls(
            scenario=cfg.scenario,
            data=cfg.data,
            examples=cfg.examples,
            num_partitions=num_partitions,
            partition=cfg.partition or "dirichlet",
            partition_column=cfg.partition_column,
            alpha=cfg.alpha,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            input_shape=tuple(input_shape),
            label_column=cfg.label_column,
            categorical=tuple(cfg.names("categorical")),
            task=cfg.task,
            classes=tuple(cfg.names("classes")),
            date_column=cfg.date_column,
            value_columns=tuple(cfg.names("value_columns")),
            window=cfg.window,
            horizon=cfg.horizon,
            test_from=cfg.test_from,
            smiles_column=cfg.smiles_column,
            skip_unreadable=cfg.skip_unreadable,
        )


@dataclass
class Partition:
    train: Dataset
    test: Dataset
    fingerprint: str

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def train_x(self) -> np.ndarray:
        return self.train.x

    @property
    def train_y(self) -> np.ndarray:
        return self.train.y

    @property
    def test_x(self) -> np.ndarray:
        return self.test.x

    @property
    def test_y(self) -> np.ndarray:
        return self.test.y

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


@functools.lru_cache(maxsize=4)
def load_dataset(spec: DataSpec, split: str = "target") -> Dataset:
    """The whole dataset ``spec`` names (``split`` "source": the scenario's pretraining
    data, synthetic only)."""
    scenario = get_scenario(spec.scenario)
    if spec.data and split == "target":
        dataset = load_arrays(spec.data) if is_arrays_file(spec.data) else scenario.load(spec)
    else:
        dataset = scenario.synthetic(spec, split)
    if spec.task != "auto" and dataset.task != spec.task:
        raise FerryError(
            f"--task {spec.task} does not fit this data, whose target is {dataset.task}: "
            f"use --task auto or {dataset.task}"
        )
    if dataset.task == "classification" and spec.deployed and not spec.classes:
        raise FerryError(
            f"the run names no classes for the data in {spec.data}: the operator must list "
            'them in the run config (e.g. classes = "no,yes"), so that every institution maps '
            "its labels by the same public list"
        )
    where = spec.data or f"the {spec.scenario} synthetic data"
    return by_public_classes(dataset, spec.classes, where)


@functools.lru_cache(maxsize=4)
def _split(spec: DataSpec, split: str = "target") -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train index, held-out index)] per partition of ``spec``'s data (``split`` "source":
    the scenario's public pretraining source, which ``ferry tune`` may use)."""
    dataset = load_dataset(spec, split)
    where = spec.data or f"the {spec.scenario} synthetic data"
    if len(dataset) < spec.num_partitions:
        raise FerryError(
            f"{len(dataset)} examples in {where} cannot be split among {spec.num_partitions} "
            "clients: give more data or fewer --clients"
        )
    if spec.partition == "natural" and spec.num_partitions == 1:
        parts = [np.arange(len(dataset))]
    else:
        parts = partition(
            spec.partition,
            dataset.y,
            dataset.groups,
            spec.num_partitions,
            spec.alpha,
            spec.seed,
            dataset.task,
        )
    if dataset.modality == "series":  # hold out the windows after a public cutoff date
        if split == "target":
            cutoff = _cutoff(spec, dataset)
        else:
            cutoff = default_cutoff(dataset.spans, spec.test_fraction)
        return [cutoff_split(p, dataset.spans, cutoff) for p in parts]
    # Held-out membership is a function of each raw record alone (see train_test_split): its
    # source row or file as read, so no run setting (label column, class order, task) moves it.
    digests = dataset.record_keys
    if digests is None:  # synthetic data: generated, not read
        digests = record_digests(dataset.x, dataset.y)
    return [train_test_split(p, spec.test_fraction, spec.seed, digests) for p in parts]


def _cutoff(spec: DataSpec, dataset: Dataset):
    """The public held-out cutoff of a price series (see the module docstring)."""
    if spec.test_from:
        return np.datetime64(spec.test_from.strip(), "ns")
    if spec.deployed:
        raise FerryError(
            f"the run names no held-out cutoff for the price series in {spec.data}: the "
            'operator must give one in the run config (e.g. test-from = "2024-01-01"), so that '
            "each window's split depends on its own dates alone"
        )
    return default_cutoff(dataset.spans, spec.test_fraction)


def load_partition(spec: DataSpec, partition_id: int) -> Partition:
    dataset = load_dataset(spec)
    train_idx, test_idx = _split(spec)[partition_id]
    key = json.dumps(
        {**asdict(spec), "source": dataset.fingerprint, "partition": partition_id},
        sort_keys=True,
    )
    return Partition(
        dataset.subset(train_idx),
        dataset.subset(test_idx),
        hashlib.sha256(key.encode()).hexdigest(),
    )


def whole(spec: DataSpec) -> DataSpec:
    """A deployed institution's spec: all of its data is one partition, and nothing (class
    list, held-out cutoff) may be derived from it."""
    return replace(spec, num_partitions=1, partition="iid", deployed=True)


def partition_sizes(spec: DataSpec) -> list[int]:
    """Training examples per partition (used to check delta < 1/n before a run starts)."""
    return [len(train) for train, _ in _split(spec)]
