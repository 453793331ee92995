"""A deployed institution's own held-out split: its test fraction and a secret salt, pinned.

The held-out split decides which records train (under DP) and which are only evaluated (their
sufficient statistics leave without DP). If the server chose it, an evaluate message with
``test-fraction 0.95`` (or another seed) would turn training records into "held-out" ones and
release their exact statistics. So a deployed institution's split is its own:

- ``ferry client --test-fraction F`` (default 0.2) fixes the fraction, and a salt is drawn
  once from OS entropy (:mod:`secrets`); both are written to ``<state_dir>/split.json`` on
  first start and never change (a different ``--test-fraction`` later is refused: records
  would move between train and held-out);
- each record's side is a function of this salt and the record's own content
  (:func:`common.data.partition.train_test_split`), so the operator can neither predict nor
  move it, and adding one record moves no other.

The server's ``test-fraction`` and ``seed`` never reach a deployed client's split. In a
simulation the researcher owns the data, and the run's settings decide the split.

The settings that decide which records load and how they are parsed and labelled (label
column, classes, task, cutoff, window, loader options: :data:`DATA_SETTINGS`) are pinned too,
in ``<state_dir>/data-settings.json``, by the first message that reads data (or up front by
``ferry client --classes/--test-from``); a later message that changes one is refused before
any data is read (:func:`pin_data_settings`), so two releases cannot be differenced over a
moved setting, and the refusal depends on the configuration alone.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.common.private_files import write_private

SPLIT_FILE = "split.json"
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class HeldOutSplit:
    """The institution's pinned split: the fraction held out and the private salt."""

    test_fraction: float
    salt: int  # secret: never sent, never logged


def check_test_fraction(value: float) -> float:
    if not (0 < value < 1 and math.isfinite(value)):
        raise FerryError(f"--test-fraction {value!r} is invalid: use a fraction in (0, 1)")
    return float(value)


def pin_split(state_dir: str | os.PathLike, test_fraction: float | None = None) -> HeldOutSplit:
    """The split pinned in ``state_dir`` (made on first use with ``test_fraction``, default
    0.2, and a fresh salt). A ``test_fraction`` other than the pinned one is refused."""
    path = Path(state_dir) / SPLIT_FILE
    if not path.exists():
        fraction = check_test_fraction(
            DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        )
        text = json.dumps({"test_fraction": fraction, "salt": secrets.randbits(63)})
        # Exclusive: a concurrent first start keeps the winner's salt.
        _durable_write(path, text + "\n", exclusive=True)
    pinned = _read(path)
    if test_fraction is not None and test_fraction != pinned.test_fraction:
        raise FerryError(
            f"this institution's held-out split is pinned at test fraction "
            f"{pinned.test_fraction:g} in {path}, not {test_fraction:g}: drop --test-fraction "
            "or give the pinned value (changing it would move records between training and "
            "held-out)"
        )
    return pinned


def _read(path: Path) -> HeldOutSplit:
    try:
        data = json.loads(path.read_text())
        split = HeldOutSplit(check_test_fraction(float(data["test_fraction"])), int(data["salt"]))
    except (OSError, ValueError, KeyError, TypeError, FerryError):
        raise FerryError(
            f"{path} is unreadable: restore it from your backup (it fixes which of your records "
            "are held out; deleting it would move records between training and held-out)"
        ) from None
    if not 0 <= split.salt < 2**63:
        raise FerryError(f"{path} holds an invalid salt: restore it from your backup")
    return split


DATA_SETTINGS_FILE = "data-settings.json"
# The run settings that decide which of a deployed institution's records load and how they are
# parsed, labelled and split (RunConfig names). Pinned on first use: were the server free to
# change them between messages, it could difference two releases (move the cutoff by a day,
# reorder the classes to re-draw labels, skip rows to count them).
DATA_SETTINGS = (
    "scenario",
    "label-column",
    "categorical",
    "task",
    "classes",
    "test-from",
    "window",
    "horizon",
    "date-column",
    "value-columns",
    "partition-column",
    "smiles-column",
    "skip-unreadable",
)


def data_settings_of(run) -> dict[str, object]:
    """The data-shaping settings of a :class:`~common.config.RunConfig`, by config name."""
    lists = {"categorical", "classes", "value-columns"}
    out: dict[str, object] = {}
    for name in DATA_SETTINGS:
        attr = name.replace("-", "_")
        value = getattr(run, attr)
        out[name] = list(run.names(attr)) if name in lists else value
    out["task"] = "regression" if run.task == "regression" else "classification"
    out["test-from"] = str(run.test_from).strip()
    return out


ADOPTED = ("classes", "test-from")  # a run that leaves these empty takes the pinned ones


def pin_data_settings(
    state_dir: str | os.PathLike, settings: dict[str, object]
) -> dict[str, object]:
    """Trust on first use: record ``settings`` (those of :data:`DATA_SETTINGS` not yet pinned)
    in ``<state_dir>/data-settings.json``, or refuse, in one line naming the setting, a value
    that differs from the pinned one. Called before any data is read, so a refusal depends on
    the configuration alone, never on the data. ``ferry client --classes/--test-from`` pin
    those two up front, and a run that leaves them empty takes the pinned values. Only the
    institution resets the pin, by deleting the file (or using a new ``--state-dir``).
    Returns the settings in force (``settings`` with adopted values filled in)."""
    path = Path(state_dir) / DATA_SETTINGS_FILE
    pinned = _read_settings(path)
    settings = dict(settings)
    for name in ADOPTED:
        if name in settings and not settings[name] and pinned.get(name):
            settings[name] = pinned[name]
    for name, value in settings.items():
        if name in pinned and pinned[name] != value:
            raise FerryError(
                f"this institution's data settings are pinned: {name} is {pinned[name]!r} in "
                f"{path}, the run asks {value!r}: run with the pinned value, or the "
                f"institution deletes {path} (or uses a new --state-dir) to accept new ones"
            )
    new = {k: v for k, v in settings.items() if k not in pinned}
    if new:
        _write_settings(path, {**pinned, **new})
    return settings


def _read_settings(path: Path) -> dict[str, object]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError
        return data
    except (OSError, ValueError):
        raise FerryError(
            f"{path} is unreadable: restore it from your backup, or delete it to pin the next "
            "run's data settings"
        ) from None


def _write_settings(path: Path, settings: dict[str, object]) -> None:
    _durable_write(path, json.dumps(settings, sort_keys=True, indent=1) + "\n")


def _durable_write(path: Path, text: str, exclusive: bool = False) -> None:
    """:func:`common.private_files.write_private` (0600: the salt is a secret), its failure
    one line naming the fix."""
    try:
        write_private(path, text.encode(), exclusive=exclusive)
    except OSError as exc:
        raise FerryError(
            f"cannot write {path} ({exc.strerror}): give a writable --state-dir"
        ) from None
