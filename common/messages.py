"""Every message between the server and an institution: one typed object and one codec each.

A message crosses a process boundary here, and only here, as a frozen dataclass:

* :class:`RoundRequest` / :class:`TrainRequest`: server -> institution, the run's settings
  for one round and the global trainable arrays (``train`` and ``evaluate`` messages);
* :class:`~common.train_reply.TrainReply`: institution -> server, the trained arrays, the
  example count and the signed privacy report (:mod:`common.train_reply`);
* :class:`EvaluationReply`: institution -> server, the sufficient statistics of its held-out
  split (:mod:`common.metrics`);
* :class:`Refusal`: institution -> server, why it did not do what it was asked.

The sender builds the object and calls ``to_record``/``to_content``; the receiver calls
``from_record``/``from_content``, which checks types, ranges (finite numbers, non-negative
and bounded counts, known enum values) and sizes (text lengths, key counts, array count,
shapes, dtypes and bytes) and raises one :class:`MessageRejected` naming the first problem.
Nothing reads a message's raw records anywhere else. On the server a rejected reply is a
ledger record and the round goes on; on an institution a rejected request is a refusal that
spends nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.metrics import (
    AUC_BINS,
    ClassificationStatistics,
    EvaluationStatistics,
    RegressionStatistics,
    statistics_from_record,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

MAX_TEXT = 256  # an institution's name, a run id, an accountant, a hash
MAX_REASON = 2_000  # a refusal's reason
MAX_KEYS = 200  # keys in one record
MAX_EXAMPLES = 10**9  # examples one institution may claim, in training or evaluation
MAX_ROUND = 1_000_000_000
MAX_CLASSES = 100_000
MAX_ARRAYS = 10_000  # arrays in one request (a trainable last block has a few dozen)
MAX_REQUEST_BYTES = 4 * 2**30  # array bytes in one request
REFUSAL_KINDS = ("error", "budget", "data", "mechanism")


class MessageRejected(FerryError, ValueError):
    """A message that does not parse as its type; the text names the first problem. A
    :class:`~common.errors.FerryError` too, so that an institution answers a rejected
    request with a refusal like any other bad input."""


# ------------------------------------------------------------------------- field checks


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


# ------------------------------------------------------------------ server -> institution


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of one institution in one round: the run's settings, the round,
    the backbone, the class count; in simulation also where the virtual institutions keep
    their state and caches (the researcher's machine)."""

    run: RunConfig
    round: int
    backbone_sha256: str
    num_classes: int
    run_id: str = ""
    state_root: str = ""
    cache_root: str = ""

    @property
    def task(self) -> str:
        return "regression" if self.run.task == "regression" else "classification"

    def validate(self) -> RoundRequest:
        """Return self, or refuse (:class:`MessageRejected`, one line) a request any of whose
        server-chosen values is out of range: the whole run config, the round and the class
        count. Checked where the message arrives, before any accounting, reservation or
        training, so a hostile value is a refusal that spends nothing, never a traceback."""
        try:
            self.run.validate()
        except MessageRejected:
            raise
        except FerryError as exc:
            raise MessageRejected(str(exc)) from None
        if not 0 <= self.round <= MAX_ROUND:
            raise MessageRejected(f"round {self.round!r} is invalid: use 0 to {MAX_ROUND:,}")
        if self.task == "classification" and not 2 <= self.num_classes <= MAX_CLASSES:
            raise MessageRejected(
                f"num-classes {self.num_classes!r} is invalid: a classification task has 2 to "
                f"{MAX_CLASSES:,} classes"
            )
        return self

    def to_record(self, **extra: object) -> dict:
        """The ``run`` record (a Flower ConfigRecord's values); ``extra`` adds the keys of a
        backbone message (``sha256``, ``manifest``)."""
        roots = {"state-root": self.state_root, "cache-root": self.cache_root}
        return {
            **self.run.to_record(),
            "round": self.round,
            "backbone-sha256": self.backbone_sha256,
            "num-classes": self.num_classes,
            "run-id": self.run_id,
            **{k: v for k, v in roots.items() if v},
            **extra,
        }

    @classmethod
    def from_record(cls, rec: dict) -> RoundRequest:
        """The server's ``run`` record as a validated request (every value checked once,
        here, before anything else runs), or :class:`MessageRejected`."""
        if len(rec) > MAX_KEYS:
            raise MessageRejected(f"the run record holds {len(rec):,} keys, over {MAX_KEYS}")
        known = {f.name.replace("_", "-") for f in fields(RunConfig)}
        try:
            run = RunConfig.from_mapping({k: v for k, v in rec.items() if k in known})
            req = cls(
                run,
                count(rec.get("round", 0), "round", 0, MAX_ROUND),
                text(rec.get("backbone-sha256"), "backbone-sha256"),
                count(rec.get("num-classes"), "num-classes", 0, MAX_CLASSES),
                text(rec.get("run-id", ""), "run-id", empty=True),
                text(rec.get("state-root", ""), "state-root", 4096, empty=True),
                text(rec.get("cache-root", ""), "cache-root", 4096, empty=True),
            )
        except MessageRejected as exc:
            raise MessageRejected(f"the server's message is malformed ({exc})") from None
        except (FerryError, TypeError, ValueError, OverflowError) as exc:
            raise MessageRejected(
                f"the server's message is malformed ({clipped(exc, 300)})"
            ) from None
        return req.validate()


@dataclass(frozen=True)
class TrainRequest:
    """A ``train`` or ``evaluate`` message: the round's request and the global trainable
    arrays (the institution checks that they fit its model before it reserves any spend)."""

    request: RoundRequest
    arrays: dict[str, np.ndarray]

    def to_content(self) -> RecordDict:
        return RecordDict(
            {"head": array_record(self.arrays), "run": ConfigRecord(self.request.to_record())}
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        request = RoundRequest.from_record(dict(record(content, "run", ConfigRecord)))
        head = content.get("head")
        if not isinstance(head, ArrayRecord) or len(head) > MAX_ARRAYS:
            raise MessageRejected(
                f"the server's message lacks a head of at most {MAX_ARRAYS} arrays"
            )
        arrays, total = {}, 0
        for key, arr in head.items():
            text(key, "array name")
            dtype = np.dtype(str(arr.dtype)) if str(arr.dtype) in _FLOATS else None
            if dtype is None or len(arr.shape) > 8:
                raise MessageRejected(
                    f"array {key!r} is {clipped(arr.dtype, 20)}, not a float array"
                )
            total += len(arr.data)
            if total > MAX_REQUEST_BYTES:
                raise MessageRejected(f"the arrays exceed {MAX_REQUEST_BYTES:,} bytes")
            arrays[key] = decoded(arr, key, dtype, tuple(int(s) for s in arr.shape))
        return cls(request, arrays)


_FLOATS = ("float16", "float32", "float64")


# ------------------------------------------------------------------ institution -> server


@dataclass(frozen=True)
class Refusal:
    """An institution's refusal of a message: why (one line; in a deployed institution it
    never quotes its data) and what kind (``budget``: its budget is spent, it is not asked
    again)."""

    reason: str
    kind: str = "error"

    def to_content(self) -> RecordDict:
        return RecordDict({"refusal": ConfigRecord({"reason": self.reason, "kind": self.kind})})

    @classmethod
    def of(cls, exc: Exception) -> Refusal:
        """The refusal an institution sends for ``exc`` (its text clipped to fit)."""
        kind = getattr(exc, "kind", "error")
        return cls(clipped(exc), kind if kind in REFUSAL_KINDS else "error")

    @classmethod
    def from_content(cls, content: RecordDict) -> Refusal:
        rec = record(content, "refusal", ConfigRecord)
        only_keys(rec, {"reason", "kind"}, "refusal")
        reason = one_line(text(rec.get("reason"), "the refusal's reason", MAX_REASON))
        kind = text(rec.get("kind", "error"), "the refusal's kind", 40)
        if kind not in REFUSAL_KINDS:
            raise MessageRejected(f"the refusal's kind {kind!r} is none of {REFUSAL_KINDS}")
        return cls(reason, kind)


_STATISTICS_KEYS = {
    "classification": frozenset(
        {"num-examples", "confusion", "score-bins", "score-histogram", "log-loss-sum"}
    ),
    "regression": frozenset(
        {
            "num-examples",
            "squared-error-sum",
            "absolute-error-sum",
            "target-sum",
            "target-squared-sum",
            "direction-moved",
            "direction-correct",
        }
    ),
}


@dataclass(frozen=True)
class EvaluationReply:
    """An ``evaluate`` reply: the sufficient statistics of the institution's held-out split
    (:mod:`common.metrics`), at most :data:`MAX_EXAMPLES` examples."""

    statistics: EvaluationStatistics

    def to_content(self) -> RecordDict:
        return RecordDict({"metrics": MetricRecord(self.statistics.to_record())})

    @classmethod
    def from_content(cls, content: RecordDict, task: str, num_classes: int) -> EvaluationReply:
        return cls.from_record(dict(record(content, "metrics", MetricRecord)), task, num_classes)

    @classmethod
    def from_record(cls, rec: dict, task: str, num_classes: int) -> EvaluationReply:
        only_keys(rec, _STATISTICS_KEYS[task], "metrics")
        count(rec.get("num-examples"), "num-examples")
        for key, value in rec.items():
            # Bounded before any sum: counts that overflow int64 would wrap around.
            if isinstance(value, list) and any(
                isinstance(v, int) and not 0 <= v <= MAX_EXAMPLES for v in value
            ):
                raise MessageRejected(f"{key} holds a count outside [0, {MAX_EXAMPLES:,}]")
        try:
            stats = statistics_from_record(rec, task, num_classes)
        except ValueError as exc:
            raise MessageRejected(clipped(exc, 300)) from None
        _check_sums(stats)
        if isinstance(stats, ClassificationStatistics):
            _check_scored(stats)
        return cls(stats)


def _check_scored(stats: ClassificationStatistics) -> None:
    """Every Ferry institution releases its score histogram on :data:`AUC_BINS` bins and
    its log loss (finite logits give both): the pool has them only if every part has them
    alike, so one that left them out or chose other bins took the federation's AUC and loss
    away for everyone."""
    if stats.score_histogram is None or stats.log_loss_sum is None:
        raise MessageRejected("the classification statistics lack the score histogram or loss")
    if stats.score_histogram.shape[2] != AUC_BINS:
        raise MessageRejected(
            f"score-bins {stats.score_histogram.shape[2]} is not the run's {AUC_BINS}"
        )


MAX_MEAN = 1e100  # a mean square or loss per example: beyond it no data, only overflow


def _check_sums(stats: EvaluationStatistics) -> None:
    """The released sums are means of at most :data:`MAX_MEAN` per example and consistent
    (Cauchy-Schwarz: ``|sum x| <= sqrt(n sum x^2)``). Finite is not enough: a target sum
    of 1e200 overflowed squaring it in the metrics and ended the run, and sums near the
    float maximum overflow once pooled or scaled to a capped count."""
    n = stats.num_examples
    if isinstance(stats, RegressionStatistics):
        pairs = (
            ("absolute-error-sum", stats.absolute_error_sum, stats.squared_error_sum),
            ("target-sum", stats.target_sum, stats.target_squared_sum),
        )
        for name, total, squares in pairs:
            if not squares <= n * MAX_MEAN:
                raise MessageRejected(f"{name}'s squares exceed {MAX_MEAN:g} per example")
            if abs(total) > math.sqrt(n * squares) * (1 + 1e-6) + 1e-9:
                raise MessageRejected(f"|{name}| exceeds sqrt(n x its sum of squares)")
    elif stats.log_loss_sum is not None and not stats.log_loss_sum <= n * MAX_MEAN:
        raise MessageRejected(f"log-loss-sum exceeds {MAX_MEAN:g} per example")
