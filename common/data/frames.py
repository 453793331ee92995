"""The data-frame kit every table-shaped loader shares (:mod:`common.data.tabular`,
:mod:`common.data.series`, :mod:`common.data.molecules`, :mod:`common.data.synthetic_records`):
reading a CSV or Parquet file, naming where a value sits, and reading one column's cells as
numbers, canonical text or keys, one cell at a time (nothing here looks at more than one row to
decide how to read a value).

Where errors point: CSV rows by **line in the file**, counting the header as line 1; Parquet
files and in-memory frames by **row**, counting the first data row as row 1 (:class:`Origin`).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.common.errors import FerryError

CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
PARQUET_SUFFIXES = {".parquet", ".pq"}


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


def not_a_number(
    origin: Origin, rows: np.ndarray, column: str, values, bad, fix: str
) -> FerryError:
    """The error for the first cell of ``values`` (at file rows ``rows``) that ``bad`` marks:
    it names the file, the row or line, the column and the value, then ``fix``."""
    i = int(np.flatnonzero(bad)[0])
    return FerryError(
        f"{origin.name}, {origin.row(int(rows[i]))}, column '{column}': "
        f"{str(values.iloc[i]).strip()!r} is not a number: {fix}"
    )


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


def refuse_empty(column, what: str, origin: Origin, rows: np.ndarray, fix: str) -> None:
    """Raise a one-line error naming the first empty cell of ``column`` (``what``, e.g. "the
    label column 'y'") and ``fix``; ``rows`` maps the column's rows to the file's."""
    _, missing, _ = numbers(column)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise FerryError(f"{origin.name}, {origin.row(int(rows[i]))}: {what} is empty: {fix}")


def group_keys(column, name: str, origin: Origin, rows: np.ndarray) -> np.ndarray:
    """Each row's natural-split key as text; a missing key is an error."""
    refuse_empty(
        column,
        f"the partition column '{name}'",
        origin,
        rows,
        "fill in which institution the row belongs to, or remove the row",
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
