"""Loading helpers shared by the table-shaped presets (hospital-tabular, bank-credit)."""

from __future__ import annotations

from pathlib import Path

from ferry.common.data.dataset import Dataset
from ferry.common.data.tabular import load_table
from ferry.common.errors import FerryError


def load_table_for(spec, scenario: str) -> Dataset:
    if not spec.label_column:
        raise FerryError(
            f"--data {spec.data} needs --label-column: name the column the {scenario} preset "
            "should predict"
        )
    return load_table(
        Path(spec.data),
        label_column=spec.label_column,
        task=spec.task,
        categorical=list(spec.categorical) or None,
        group_column=spec.partition_column,
        min_rows=spec.num_partitions,
        classes=spec.classes,
    )
