"""Tables (CSV or Parquet, one row per example) as a :class:`~common.data.dataset.Dataset`.

Contract (stateless: nothing here looks at more than one row to decide how to encode a value):

* **Numeric columns** stay measured numbers, float with NaN where a value is missing (blank,
  ``NA``, ``null``...). They are standardised later with the backbone manifest's public
  statistics (:mod:`common.data.preprocess`), never with statistics of the data itself.
* **Categorical columns** (listed in ``categorical``, or holding non-numeric text) become
  *hashed indicator* columns: each value ``v`` of column ``c`` sets two of the column's
  ``hash_buckets`` indicators, chosen by SHA-1 of ``"c=v"``. Every institution gets the same
  layout without sharing a vocabulary; two values share both indicators with probability
  about 2 / (B (B - 1)) (1 in 120 for 16 buckets) instead of 1 in B for a single hash. A
  missing category sets none. Numbers in a categorical column are written canonically first
  (``3``, ``3.0`` and ``3.00`` are one category; codes with leading zeros such as ``007``
  are kept verbatim).
* A column that is mostly numbers with a few non-numeric entries is an error (a typo such as
  ``12,5`` would otherwise turn a measurement into categories).
* **Label**: class ids by the run's public class list, one row at a time, or inferred without
  one (:mod:`common.data.labels`).

Reading the file, and where errors point (CSV lines, other rows): :mod:`common.data.frames`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ferry.common.data.dataset import Dataset
from ferry.common.data.frames import (
    Origin,
    canonical,
    columns_named,
    enough_rows,
    frame_origin,
    group_keys,
    non_blank_rows,
    not_a_number,
    numbers,
    read_frame,
    require_pandas,
)
from ferry.common.data.labels import parse_target
from ferry.common.data.partition import row_digests
from ferry.common.errors import FerryError


def hash_buckets_of(column: str, value: str, buckets: int) -> tuple[int, int]:
    """The two distinct indicator positions of ``column=value`` among ``buckets``."""
    digest = hashlib.sha1(f"{column}={value}".encode()).digest()
    first = int.from_bytes(digest[:8], "big") % buckets
    second = (first + 1 + int.from_bytes(digest[8:16], "big") % (buckets - 1)) % buckets
    return first, second


def hashed_indicators(column, name: str, buckets: int) -> np.ndarray:
    """(n, buckets) float32 indicators of one categorical column (all 0 where missing)."""
    pd = require_pandas()
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    out = np.zeros((len(column), buckets), dtype=np.float32)
    for code, value in enumerate(uniques):
        text = canonical(value)
        if text == "":
            continue
        rows = codes == code
        for b in hash_buckets_of(name, text, buckets):
            out[rows, b] = 1.0
    return out


def from_frame(
    frame,
    label_column: str,
    task: str = "auto",
    categorical: Sequence[str] | None = None,
    drop_columns: Sequence[str] = (),
    group_column: str = "",
    hash_buckets: int = 16,
    min_rows: int = 1,
    origin: Origin | None = None,
    classes: Sequence[str] = (),
) -> Dataset:
    """A table already in memory (a pandas DataFrame) as a tabular :class:`Dataset`.

    ``origin`` names it in errors and fingerprints it; by default the frame's content.
    ``classes``: the run's public class list (see the module docstring).
    """
    if hash_buckets < 4:
        raise FerryError(f"hash_buckets {hash_buckets} is too small: use at least 4 (e.g. 16)")
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    origin = origin or frame_origin(frame, "the table")
    categorical = list(categorical or [])
    columns_named(frame, [label_column], origin, "label", "--label-column")
    columns_named(frame, categorical, origin, "categorical", "--categorical")
    columns_named(frame, list(drop_columns), origin, "dropped", "drop_columns")
    if group_column:
        columns_named(frame, [group_column], origin, "partition", "--partition-column")
    frame, rows = non_blank_rows(frame)
    enough_rows(len(frame), min_rows, origin)
    raw = row_digests(frame)  # the rows as read: what the held-out split hashes

    public = list(classes)
    y, classes, task = parse_target(frame[label_column], label_column, task, origin, rows, public)
    groups = group_keys(frame[group_column], group_column, origin, rows) if group_column else None
    skip = {label_column, group_column, *drop_columns}
    blocks, names, numeric = [], [], []
    for name in frame.columns:
        if name in skip:
            continue
        column = frame[name]
        values, missing, bad = numbers(column)
        mostly_text = bool(bad.any()) and bad.sum() >= (~missing).sum() / 2
        is_category = name in categorical or mostly_text
        if not is_category and bad.any():
            raise not_a_number(
                origin,
                rows,
                name,
                column,
                bad,
                f"fix the value (blank means missing) or declare the column categorical with "
                f"--categorical {name}",
            )
        if is_category:
            blocks.append(hashed_indicators(column, name, hash_buckets))
            names += [f"{name}=<bucket {b}>" for b in range(hash_buckets)]
            numeric += [False] * hash_buckets
        else:
            blocks.append(values.astype(np.float32)[:, None])
            names.append(name)
            numeric.append(True)
    if not blocks:
        raise FerryError(
            f"{origin.name} has no feature columns besides the label '{label_column}'"
            + (f" and the partition column '{group_column}'" if group_column else "")
            + ": add columns to learn from"
        )
    key = (
        f"{origin.fingerprint}|label={label_column}|task={task}|cat={sorted(categorical)}"
        f"|drop={sorted(drop_columns)}|group={group_column}|buckets={hash_buckets}"
        f"|classes={public}"
    )
    return Dataset(
        x=np.concatenate(blocks, axis=1).astype(np.float32),
        y=y,
        task=task,
        classes=classes,
        fingerprint="table:" + hashlib.sha256(key.encode()).hexdigest(),
        modality="tabular",
        groups=groups,
        columns=names,
        numeric=np.asarray(numeric, dtype=bool),
        record_keys=raw,
    )


def load_table(
    path: Path | str,
    label_column: str,
    task: str = "auto",
    categorical: list[str] | None = None,
    drop_columns: Sequence[str] = (),
    group_column: str = "",
    hash_buckets: int = 16,
    min_rows: int = 1,
    classes: Sequence[str] = (),
) -> Dataset:
    """A CSV (``.csv``, ``.tsv``, optionally ``.gz``) or Parquet file as a tabular
    :class:`Dataset` (see the module docstring). ``min_rows``: the number of clients that
    will share the rows (an error names it when there are fewer rows). ``classes``: the run's
    public class list."""
    frame, origin = read_frame(path)
    return from_frame(
        frame,
        label_column,
        task,
        categorical,
        drop_columns,
        group_column,
        hash_buckets,
        min_rows,
        origin,
        classes,
    )
