"""The checks every codec of :mod:`common.messages` applies to one field of a message.

Each returns the value in its checked type or raises :class:`MessageRejected` naming the
field and the problem (one line; untrusted text is clipped and escaped first).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ferry.common.errors import FerryError

MAX_TEXT = 256  # an institution's name, a run id, an accountant, a hash
MAX_REASON = 2_000  # a refusal's reason
MAX_KEYS = 200  # keys in one record
MAX_EXAMPLES = 10**9  # examples one institution may claim, in training or evaluation


class MessageRejected(FerryError, ValueError):
    """A message that does not parse as its type; the text names the first problem. A
    :class:`~common.errors.FerryError` too, so that an institution answers a rejected
    request with a refusal like any other bad input."""


def clipped(text: object, limit: int = MAX_REASON) -> str:
    """``text`` as one line of at most ``limit`` characters (for logs of untrusted text;
    see :func:`one_line`)."""
    text = one_line(str(text))
    return text if len(text) <= limit else f"{text[: limit - 40]}... ({len(text):,} chars)"


def one_line(text: str) -> str:
    """``text`` with every unprintable character (newlines, terminal escapes, Unicode line
    separators and direction overrides) written as its escape: an institution's text in
    the server's log is one line, so it cannot forge log lines for another institution."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _shown(value: object) -> str:
    return clipped(repr(value), 40)


def text(value: object, name: str, limit: int = MAX_TEXT, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise MessageRejected(f"{name} is {_shown(value)}, not a string")
    if len(value) > limit:
        raise MessageRejected(f"{name} is {len(value):,} characters long, over {limit:,}")
    if not value and not empty:
        raise MessageRejected(f"{name} is empty")
    return value


def count(value: object, name: str, low: int = 0, high: int = MAX_EXAMPLES) -> int:
    """An int (never a bool or a float) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MessageRejected(f"{name} is {_shown(value)}, not an integer count")
    if not low <= value <= high:
        raise MessageRejected(f"{name} {int(value):,} is outside [{low:,}, {high:,}]")
    return int(value)


def number(value: object, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number (int or float, never a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise MessageRejected(f"{name} is {_shown(value)}, not a number")
    try:
        value = float(value)
    except OverflowError:
        raise MessageRejected(f"{name} is beyond any float") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise MessageRejected(f"{name} {value!r} is not a finite number in [{low:g}, {high:g}]")
    return value


def record(content: RecordDict, name: str, kind: type) -> ConfigRecord | MetricRecord | ArrayRecord:
    """The record ``name`` of a message, of Flower type ``kind``."""
    rec = content.get(name) if isinstance(content, RecordDict) else None
    if not isinstance(rec, kind):
        raise MessageRejected(f"the message lacks a {kind.__name__} {name!r}")
    if len(rec) > MAX_KEYS:
        raise MessageRejected(f"record {name!r} holds {len(rec):,} keys, over {MAX_KEYS}")
    return rec


def only_keys(rec: dict, allowed: set[str] | frozenset[str], name: str) -> None:
    unknown = sorted(set(rec) - set(allowed))
    if unknown:
        raise MessageRejected(f"record {name!r} holds unknown keys {clipped(unknown, 120)}")


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def decoded(arr: Array, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """One array, checked against the ``dtype`` and ``shape`` it must have: as declared and
    in its size before its bytes are decoded (``.npy``: the data and a short header), as
    decoded after, and for finite values."""
    if str(arr.dtype) != str(dtype) or tuple(arr.shape) != tuple(shape):
        raise MessageRejected(
            f"array {name!r} is {clipped(arr.dtype, 20)}{clipped(list(arr.shape), 60)}, "
            f"expected {dtype}{list(shape)}"
        )
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if not want <= len(arr.data) <= want + _NPY_HEADER:
        raise MessageRejected(f"array {name!r} carries {len(arr.data):,} bytes for {want:,}")
    try:
        value = arr.numpy()
    except Exception as exc:  # Flower's decoder (numpy.load, no pickles) on hostile bytes
        raise MessageRejected(f"array {name!r} does not decode ({clipped(exc, 80)})") from None
    if value.dtype != dtype or value.shape != tuple(shape):
        raise MessageRejected(f"array {name!r} decodes to {value.dtype}{list(value.shape)}")
    if not np.isfinite(value).all():
        raise MessageRejected(f"array {name!r} holds non-finite values")
    return value


_NPY_HEADER = 4_096  # numpy pads a .npy header to a multiple of 64 bytes; real ones are 128


# A virtual institution's name, as simulation takes it from the data (it names folders).
INSTITUTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_INSTITUTIONS = 100_000


def institution_names(value: object) -> tuple[str, ...]:
    """A JSON list of institution names (simulation: the names a natural split gives each
    partition), each a plain name usable as a folder; "" for none. MessageRejected else."""
    if value in ("", None):
        return ()
    try:
        names = json.loads(text(value, "institution-names", 64 * MAX_INSTITUTIONS))
    except ValueError:
        raise MessageRejected("institution-names is not a JSON list") from None
    if not isinstance(names, list) or len(names) > MAX_INSTITUTIONS:
        raise MessageRejected("institution-names is not a list of at most 100,000 names")
    for name in names:
        if not isinstance(name, str) or not INSTITUTION_NAME.fullmatch(name):
            raise MessageRejected(f"institution name {_shown(name)} is not a plain name")
    if len(set(names)) != len(names):
        raise MessageRejected("institution-names repeats a name")
    return tuple(names)
