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
* **Label**, with the run's public class list (``classes``, what every deployed institution
  gets): a row's class id is the position of its own label in that list; a label not in it
  is an error naming it. Nothing about the other rows enters, so one row's presence moves no
  other row's label. Without a list (only the researcher's side of a simulation, whose data
  is public to the researcher, and pretraining on a public source): ``task="auto"`` picks
  classification when the label is text or holds at most 20 distinct integers, regression
  otherwise; class ids follow the sorted class names (numbers sorted by value); of two
  classes, a conventional negative name (``inactive``, ``no``, ``false``, ``negative``,
  ``normal``, ``benign``, ``0``) comes first, so class 1 is the positive one.

Where errors point: CSV rows by **line in the file**, counting the header as line 1; Parquet
files and in-memory frames by **row**, counting the first data row as row 1.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ferry.common.data.dataset import Dataset, public_class_ids, unknown_label
from ferry.common.data.partition import row_digests
from ferry.common.errors import FerryError

CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
MAX_AUTO_CLASSES = 20
NEGATIVE_NAMES = {"inactive", "no", "false", "negative", "normal", "benign", "0"}


@dataclass(frozen=True)
class Origin:
    """Where a frame came from: how errors name it and its rows, and its content identity."""

    name: str  # the file path, or e.g. "the synthetic patients data"
    fingerprint: str
    header_is_line_1: bool = False  # CSV: data row i (0-based) is line i + 2 of the file

    def row(self, i: int, explain: bool = True) -> str:
        """Data row ``i`` (0-based) as the user finds it; ``explain`` adds the convention."""
        if self.header_is_line_1:
            return f"line {i + 2}" + (" (line 1 is the header)" if explain else "")
        return f"row {i + 1}" + (" (the first data row is row 1)" if explain else "")


def frame_origin(frame, name: str) -> Origin:
    """An :class:`Origin` for an in-memory frame, fingerprinted by its content."""
    import pandas as pd

    digest = hashlib.sha256(",".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return Origin(name, "frame:" + digest.hexdigest())


def file_identity(path: Path) -> str:
    """``name:size:mtime_ns`` of a file: what a fingerprint of file content rests on."""
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def warn(message: str) -> None:
    """The loaders' default ``log``: a one-line warning the user sees on stderr."""
    print(f"ferry: warning: {message}", file=sys.stderr, flush=True)


def require_pandas():
    try:
        import pandas as pd
    except ImportError:
        raise FerryError("reading tables needs pandas: pip install pandas pyarrow") from None
    return pd


def read_frame(path: Path | str):
    """(every cell of a CSV as text, or a Parquet table as stored; its :class:`Origin`)."""
    pd = require_pandas()
    path = Path(path)
    if not path.exists():
        raise FerryError(f"data file {path} does not exist: check the --data path")
    if path.is_dir():
        raise FerryError(f"{path} is a folder: give a CSV or Parquet file")
    suffixes = [s.lower() for s in path.suffixes]
    suffix = (
        suffixes[-2]
        if len(suffixes) > 1 and suffixes[-1] in {".gz", ".zip"}
        else (suffixes[-1] if suffixes else "")
    )
    origin = Origin(str(path), "file:" + file_identity(path), suffix in CSV_SUFFIXES)
    if suffix in CSV_SUFFIXES:
        try:
            frame = pd.read_csv(
                path,
                dtype=str,
                sep="\t" if suffix == ".tsv" else ",",
                skip_blank_lines=False,  # keep line numbers right; blank rows are dropped later
                skipinitialspace=True,
            )
        except UnicodeDecodeError:
            raise FerryError(f"{path} is not UTF-8 text: save it as a UTF-8 CSV") from None
        except pd.errors.EmptyDataError:
            raise FerryError(f"{path} is empty: give a CSV with a header line") from None
        except (pd.errors.ParserError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FerryError(
                f"{path} is not a readable CSV ({first}): fix or re-export it"
            ) from None
    elif suffix in PARQUET_SUFFIXES:
        try:
            frame = pd.read_parquet(path)
        except ImportError:
            raise FerryError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise FerryError(
                f"{path} is not a readable Parquet file ({type(exc).__name__}): re-export it"
            ) from None
    else:
        raise FerryError(
            f"{path}: unknown table format {suffix or '(no suffix)'}: give a .csv, .tsv or "
            ".parquet file"
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, origin


def numbers(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(floats, NaN where missing; mask of missing; mask of present values that are not
    finite numbers) of one column."""
    pd = require_pandas()
    from pandas.api import types

    if types.is_bool_dtype(column.dtype) or types.is_datetime64_any_dtype(column.dtype):
        missing = column.isna().to_numpy()
        return np.full(len(column), np.nan), missing, ~missing
    if types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(values)
        return values, missing, ~missing & ~np.isfinite(values)
    text = column.astype("string").str.strip()
    missing = (text.isna() | (text == "")).to_numpy(dtype=bool)
    values = pd.to_numeric(text.mask(missing), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    bad = ~missing & ~np.isfinite(values)
    values[bad] = np.nan
    return values, missing, bad


def canonical(value) -> str:
    """One spelling per category: numbers written canonically, text stripped."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, str):
        text = value.strip()
        leading_zero = len(text) > 1 and text[0] == "0" and text[1].isdigit()
        try:
            number = float(text)
        except ValueError:
            return text
        if leading_zero or not math.isfinite(number):
            return text
        value = number
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value).strip()


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


def _not_a_number(origin: Origin, rows: np.ndarray, column: str, values, bad, fix: str):
    i = int(np.flatnonzero(bad)[0])
    return FerryError(
        f"{origin.name}, {origin.row(int(rows[i]))}, column '{column}': "
        f"{str(values.iloc[i]).strip()!r} is not a number: {fix}"
    )


def _class_order(names: list[str], numeric: bool) -> list[str]:
    ordered = sorted(names, key=float) if numeric else sorted(names)
    if len(ordered) == 2:
        negative = [n.strip().lower() in NEGATIVE_NAMES for n in ordered]
        if negative == [False, True]:
            ordered.reverse()
    return ordered


def parse_target(
    column,
    name: str,
    task: str,
    origin: Origin,
    rows: np.ndarray,
    classes: Sequence[str] = (),
):
    """(y, classes, task) of the label column ``name`` (see the module docstring).

    ``classes``: the run's public class list; given, each row is mapped by it alone."""
    if task not in ("auto", "classification", "regression"):
        raise FerryError(f"--task {task!r} is unknown: use auto, classification or regression")
    if classes:
        return _public_target(column, name, task, origin, rows, list(classes))
    values, missing, bad = numbers(column)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise FerryError(
            f"{origin.name}, {origin.row(int(rows[i]))}: the label column '{name}' is empty: "
            "fill it in or remove the row"
        )
    present = len(values)
    if bad.any() and (task == "regression" or bad.sum() < present / 2):
        fix = (
            "regression needs a number in every row; fix it or use --task classification"
            if task == "regression"
            else "fix the value (most labels in this column are numbers)"
        )
        raise _not_a_number(origin, rows, name, column, bad, fix)
    is_numeric = not bad.any()
    integral = is_numeric and bool(np.all(values == np.round(values)))
    if task == "auto":
        few = is_numeric and integral and len(np.unique(values)) <= MAX_AUTO_CLASSES
        task = "classification" if (not is_numeric or few) else "regression"
    if task == "regression":
        return values.astype(np.float32), [], task
    names = [canonical(v) for v in (values if is_numeric else column.to_numpy())]
    classes = _class_order(sorted(set(names)), is_numeric)
    if len(classes) < 2:
        raise FerryError(
            f"{origin.name}: the label column '{name}' holds a single class ({classes[0]!r}): "
            "classification needs at least two; add examples of another class"
            + ("" if not is_numeric else " or use --task regression")
        )
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[n] for n in names], dtype=np.int64), classes, task


def _public_target(column, name: str, task: str, origin: Origin, rows, classes: list[str]):
    """Class ids of the label column by the run's public list (one row at a time)."""
    if task == "regression":
        raise FerryError(
            f"--task regression does not fit the run's classes ({', '.join(classes)}): "
            "drop the classes setting or use --task classification"
        )
    _, missing, _ = numbers(column)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise FerryError(
            f"{origin.name}, {origin.row(int(rows[i]))}: the label column '{name}' is empty: "
            "fill it in or remove the row"
        )
    index = public_class_ids(classes)
    names = [canonical(v) for v in column.to_numpy()]
    y = np.asarray([index.get(n, -1) for n in names], dtype=np.int64)
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        where = f"{origin.name}, {origin.row(int(rows[i]))}, column '{name}',"
        raise unknown_label(names[i], where, classes)
    return y, classes, "classification"


def columns_named(frame, names: Sequence[str], origin: Origin, what: str, flag: str) -> None:
    """FerryError unless every name in ``names`` is a column of ``frame``."""
    absent = [n for n in names if n not in frame.columns]
    if absent:
        existing = ", ".join(map(str, list(frame.columns)[:30]))
        more = " ..." if len(frame.columns) > 30 else ""
        raise FerryError(
            f"{origin.name} has no {what} column {absent[0]!r} (its columns: {existing}{more}): "
            f"pass {flag} with one of them"
        )


def non_blank_rows(frame):
    """(the frame without all-empty rows, each remaining row's 0-based position in the file)."""
    frame = frame.reset_index(drop=True)
    empty = frame.astype("string").apply(lambda c: c.str.strip().fillna("") == "")
    blank = empty.all(axis=1).to_numpy(dtype=bool)
    rows = np.flatnonzero(~blank)
    return frame.iloc[rows].reset_index(drop=True), rows


def group_keys(column, name: str, origin: Origin, rows: np.ndarray) -> np.ndarray:
    """Each row's natural-split key as text; a missing key is an error."""
    _, missing, _ = numbers(column)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise FerryError(
            f"{origin.name}, {origin.row(int(rows[i]))}: the partition column '{name}' is "
            "empty: fill in which institution the row belongs to, or remove the row"
        )
    return np.asarray([canonical(v) for v in column.to_numpy()], dtype=object).astype(str)


def enough_rows(n: int, min_rows: int, origin: Origin) -> None:
    if n == 0:
        raise FerryError(f"{origin.name} holds no data rows: give a table with examples")
    if n < min_rows:
        raise FerryError(
            f"{n} rows in {origin.name} cannot be split among {min_rows} clients: "
            "give more rows or fewer --clients"
        )


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
            raise _not_a_number(
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
