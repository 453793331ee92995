"""Price series (CSV or Parquet: a date column, one or more price columns, optionally a
ticker column) as windows of past log returns predicting the next return.

Contract (stateless: every number depends only on the prices of one ticker):

* Rows are sorted by date, per group when ``group_column`` (e.g. a ticker) is given;
  each group is its own series and no window straddles two groups.
* Prices become **log returns in percent**: ``r_t = 100 * (log p_t - log p_{t-1})``.
* Example ``i`` of a group: ``x`` (channels = ``value_columns``, length ``window``) holds the
  returns ``r_i .. r_{i+window-1}``; the target is the sum of the next ``horizon`` returns of
  ``target_column`` (the log return over the horizon, in percent). A group of ``m`` rows
  gives ``m - window - horizon`` examples. The task is regression, with
  ``directional=True`` (the sign of the return is what a trader acts on). Each example's
  ``spans`` row holds the first and last date of its forecast period (the dates of the rows
  closing its first and last target return) and the first date its input reads (the price
  row its first return starts from): the public held-out cutoff is compared with them
  (:func:`common.data.partition.cutoff_split`).
* Prices must be present, numeric and positive; dates present, parseable and unique per
  group. Errors name the row as :mod:`common.data.tabular` does (CSV: file line, header = 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ferry.common.data.dataset import Dataset
from ferry.common.data.frames import (
    Origin,
    canonical,
    columns_named,
    frame_origin,
    group_keys,
    non_blank_rows,
    numbers,
    read_frame,
    require_pandas,
    warn,
)
from ferry.common.errors import FerryError


def _dates(column, name: str, origin: Origin, rows: np.ndarray) -> np.ndarray:
    """The column as datetime64[ns]; FerryError at the first empty or unparseable date."""
    pd = require_pandas()
    from pandas.api import types

    if types.is_datetime64_any_dtype(column.dtype):
        parsed = pd.Series(column)
        failed = np.zeros(len(column), dtype=bool)
    else:
        text = column.astype("string").str.strip()
        given = (text.notna() & (text != "")).to_numpy(dtype=bool)
        parsed = pd.to_datetime(text, errors="coerce", format="ISO8601")
        if (parsed.isna().to_numpy() & given).any():
            # Not ISO: let pandas infer one format from the first date and apply it to all
            # (one format for the whole column, never a guess per row).
            try:
                parsed = pd.to_datetime(text, errors="coerce")
            except (ValueError, TypeError):
                pass
        failed = parsed.isna().to_numpy(dtype=bool) & given
    empty = parsed.isna().to_numpy(dtype=bool) & ~failed
    for mask, problem in ((empty, "is empty"), (failed, "is not a date")):
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            shown = "" if problem == "is empty" else f" ({str(column.iloc[i]).strip()!r})"
            raise FerryError(
                f"{origin.name}, {origin.row(int(rows[i]))}, column '{name}': the date{shown} "
                f"{problem}: write dates as YYYY-MM-DD, or remove the row"
            )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.to_numpy(dtype="datetime64[ns]")


def _prices(column, name: str, origin: Origin, rows: np.ndarray) -> np.ndarray:
    values, missing, bad = numbers(column)
    problems = (
        (missing, lambda i: "the price is empty", "fill it in or remove the row"),
        (bad, lambda i: f"{str(column.iloc[i]).strip()!r} is not a number", "fix the value"),
        (
            ~missing & ~bad & ~(values > 0),
            lambda i: f"the price {canonical(values[i])} is not positive",
            "prices must be > 0 for log returns: fix the value or remove the row",
        ),
    )
    for mask, problem, fix in problems:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise FerryError(
                f"{origin.name}, {origin.row(int(rows[i]))}, column '{name}': {problem(i)}: {fix}"
            )
    return values


def _numeric_columns(frame, exclude: set[str]) -> list[str]:
    found = []
    for name in frame.columns:
        if name in exclude:
            continue
        _, missing, bad = numbers(frame[name])
        if not bad.any() and not missing.all():
            found.append(name)
    return found


def from_frame(
    frame,
    date_column: str,
    value_columns: Sequence[str] | None = None,
    target_column: str = "",
    window: int = 30,
    horizon: int = 1,
    group_column: str = "",
    origin: Origin | None = None,
    log: Callable[[str], None] = warn,
) -> Dataset:
    """A price table already in memory (a pandas DataFrame) as a series :class:`Dataset`.

    ``value_columns`` None: every numeric column but the date and group columns. ``log``
    receives a warning when some groups are too short to give a single window.
    """
    if window < 1 or horizon < 1:
        raise FerryError(
            f"window {window} and horizon {horizon} must both be at least 1: "
            "fix --window / --horizon"
        )
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    origin = origin or frame_origin(frame, "the price table")
    columns_named(frame, [date_column], origin, "date", "--date-column")
    if group_column:
        columns_named(frame, [group_column], origin, "group", "--partition-column")
    if value_columns:
        value_columns = list(value_columns)
        columns_named(frame, value_columns, origin, "price", "--value-columns")
    else:
        value_columns = _numeric_columns(frame, {date_column, group_column})
        if not value_columns:
            raise FerryError(
                f"{origin.name} has no numeric price column besides '{date_column}': "
                "name them with --value-columns"
            )
    target_column = target_column or value_columns[0]
    columns_named(frame, [target_column], origin, "target", "--label-column")
    frame, rows = non_blank_rows(frame)

    dates = _dates(frame[date_column], date_column, origin, rows)
    needed = list(dict.fromkeys([*value_columns, target_column]))
    prices = {c: _prices(frame[c], c, origin, rows) for c in needed}
    keys = (
        group_keys(frame[group_column], group_column, origin, rows)
        if group_column
        else np.full(len(frame), "", dtype=object).astype(str)
    )
    order = np.lexsort((dates, keys))
    same = (keys[order][1:] == keys[order][:-1]) & (dates[order][1:] == dates[order][:-1])
    if same.any():
        j = int(np.flatnonzero(same)[0])
        a, b = sorted((int(rows[order[j]]), int(rows[order[j + 1]])))
        which = f" for {group_column} {keys[order[j]]!r}" if group_column else ""
        day = np.datetime_as_string(dates[order[j]], unit="D")
        raise FerryError(
            f"{origin.name}: {origin.row(a)} and {origin.row(b)} both hold the date {day}{which}:"
            " remove the duplicate"
            + ("" if group_column else " (or name a ticker column with --partition-column)")
        )

    xs, ys, gs, spans, short = [], [], [], [], []
    features = np.stack([prices[c] for c in value_columns], axis=1)
    for key in dict.fromkeys(keys[order]):
        idx = order[keys[order] == key]
        count = len(idx) - window - horizon
        if count < 1:
            short.append(key)
            continue
        returns = 100.0 * np.diff(np.log(features[idx]), axis=0)  # (m - 1, channels)
        target = 100.0 * np.diff(np.log(prices[target_column][idx]))
        windows = np.lib.stride_tricks.sliding_window_view(returns, window, axis=0)
        xs.append(windows[:count])  # (count, channels, window)
        ahead = np.lib.stride_tricks.sliding_window_view(target[window:], horizon)
        ys.append(ahead[:count].sum(axis=1))
        gs.append(np.full(count, key, dtype=object))
        # r_k (returns[k]) is realised on row k + 1: example i forecasts rows
        # window + i + 1 .. window + i + horizon of this group.
        day = dates[idx]
        first = np.arange(count) + window + 1
        # Its input window reads prices from row i (the first return's base) onwards.
        start = day[first - window - 1]
        spans.append(np.stack([day[first], day[first + horizon - 1], start], axis=1))
    need = window + horizon + 1
    if not xs:
        scope = " per group" if group_column else ""
        raise FerryError(
            f"{origin.name} is too short: a window of {window} returns and a horizon of "
            f"{horizon} need at least {need} dated rows{scope}, it has "
            f"{max(np.unique(keys, return_counts=True)[1])}: give more history or a smaller "
            "--window"
        )
    if short:
        log(
            f"{origin.name}: {len(short)} of {len(short) + len(xs)} {group_column} groups have "
            f"fewer than {need} rows and give no examples ({', '.join(short[:5])}"
            f"{' ...' if len(short) > 5 else ''})"
        )
    key = (
        f"{origin.fingerprint}|date={date_column}|values={value_columns}|target={target_column}"
        f"|window={window}|horizon={horizon}|group={group_column}"
    )
    return Dataset(
        x=np.concatenate(xs).astype(np.float32),
        y=np.concatenate(ys).astype(np.float32),
        task="regression",
        classes=[],
        fingerprint="series:" + hashlib.sha256(key.encode()).hexdigest(),
        modality="series",
        groups=np.concatenate(gs).astype(str) if group_column else None,
        columns=list(value_columns),
        directional=True,
        spans=np.concatenate(spans).astype("datetime64[ns]"),
    )


def load_series(
    path: Path | str,
    date_column: str,
    value_columns: list[str] | None = None,
    target_column: str = "",
    window: int = 30,
    horizon: int = 1,
    group_column: str = "",
    log: Callable[[str], None] = warn,
) -> Dataset:
    """A CSV or Parquet price table as a series :class:`Dataset` (see the module docstring)."""
    frame, origin = read_frame(path)
    return from_frame(
        frame,
        date_column,
        value_columns,
        target_column,
        window,
        horizon,
        group_column,
        origin,
        log,
    )
