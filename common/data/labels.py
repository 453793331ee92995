"""A label column as class ids or regression targets (:func:`parse_target`), for the table
loaders (:mod:`common.data.tabular`, :mod:`common.data.molecules`).

Contract (stateless), with the run's public class list (``classes``, what every deployed
institution gets): a row's class id is the position of its own label in that list; a label not
in it is an error naming it. Nothing about the other rows enters, so one row's presence moves
no other row's label. Without a list (only the researcher's side of a simulation, whose data is
public to the researcher, and pretraining on a public source): ``task="auto"`` picks
classification when the label is text or holds at most 20 distinct integers, regression
otherwise; class ids follow the sorted class names (numbers sorted by value); of two classes, a
conventional negative name (``inactive``, ``no``, ``false``, ``negative``, ``normal``,
``benign``, ``0``) comes first, so class 1 is the positive one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ferry.common.data.dataset import public_class_ids, unknown_label
from ferry.common.data.frames import Origin, canonical, not_a_number, numbers, refuse_empty
from ferry.common.errors import FerryError

MAX_AUTO_CLASSES = 20
EMPTY_LABEL_FIX = "fill it in or remove the row"
NEGATIVE_NAMES = {"inactive", "no", "false", "negative", "normal", "benign", "0"}


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
    refuse_empty(column, f"the label column '{name}'", origin, rows, EMPTY_LABEL_FIX)
    values, _, bad = numbers(column)
    present = len(values)
    if bad.any() and (task == "regression" or bad.sum() < present / 2):
        fix = (
            "regression needs a number in every row; fix it or use --task classification"
            if task == "regression"
            else "fix the value (most labels in this column are numbers)"
        )
        raise not_a_number(origin, rows, name, column, bad, fix)
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
    refuse_empty(column, f"the label column '{name}'", origin, rows, EMPTY_LABEL_FIX)
    index = public_class_ids(classes)
    names = [canonical(v) for v in column.to_numpy()]
    y = np.asarray([index.get(n, -1) for n in names], dtype=np.int64)
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        where = f"{origin.name}, {origin.row(int(rows[i]))}, column '{name}',"
        raise unknown_label(names[i], where, classes)
    return y, classes, "classification"
