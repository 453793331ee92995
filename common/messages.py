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
shapes, dtypes and bytes: :mod:`common.message_fields`) and raises one
:class:`MessageRejected` naming the first problem. Nothing reads a message's raw records
anywhere else. On the server a rejected reply is a ledger record and the round goes on; on
an institution a rejected request is a refusal that spends nothing.

One name per concept, on the wire and in the ledger: the trainable arrays (a head, LoRA
adapters, conv adapters or a last block) travel in the record :data:`TRAINABLE` both ways;
the run's target ε is :data:`TARGET_EPSILON` in the run record (:func:`run_record`; the
ledger's ``run_started`` keeps the same record), an institution's spent ε is
``epsilon_spent`` and its budget ε ``budget_epsilon`` in the ledger
(:mod:`server.client_reports`). Records written before the rename (``epsilon`` for the
target, ``epsilon_reported`` for the spend) are still read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.evaluation_statistics import (
    AUC_BINS,
    ClassificationStatistics,
    EvaluationStatistics,
    RegressionStatistics,
    statistics_from_record,
)
from ferry.common.message_fields import (
    MAX_EXAMPLES,
    MAX_KEYS,
    MAX_REASON,
    MessageRejected,
    array_record,
    clipped,
    count,
    decoded,
    institution_names,
    one_line,
    only_keys,
    record,
    text,
)

MAX_ROUND = 1_000_000_000
MAX_CLASSES = 100_000
MAX_ARRAYS = 10_000  # arrays in one request (a trainable last block has a few dozen)
MAX_REQUEST_BYTES = 4 * 2**30  # array bytes in one request
REFUSAL_KINDS = ("error", "budget", "data", "mechanism")
TRAINABLE = "trainable"  # the record holding the trainable arrays, in requests and replies
TARGET_EPSILON = "target-epsilon"  # the run's target ε in the run record
_OLD_TARGET_EPSILON = "epsilon"  # its name before the rename (RunConfig's own key)


# ------------------------------------------------------------------ server -> institution


def run_record(cfg: RunConfig) -> dict:
    """The run's settings as they travel and as the ledger keeps them: ``cfg``'s dashed
    record with the target ε under :data:`TARGET_EPSILON` (``epsilon`` would read as a
    spend beside the privacy reports)."""
    rec = cfg.to_record()
    if _OLD_TARGET_EPSILON in rec:
        rec[TARGET_EPSILON] = rec.pop(_OLD_TARGET_EPSILON)
    return rec


def run_config_of(rec: dict) -> RunConfig:
    """The :class:`RunConfig` of a run record (:func:`run_record`, or one written before the
    rename, whose target ε is ``epsilon``); keys that are no setting are left out."""
    known = {f.name.replace("_", "-") for f in fields(RunConfig)}
    settings = {k: v for k, v in rec.items() if k in known}
    if TARGET_EPSILON in rec:
        if _OLD_TARGET_EPSILON in settings:
            raise MessageRejected(
                f"the run record names its target ε twice ({TARGET_EPSILON} and epsilon)"
            )
        settings[_OLD_TARGET_EPSILON] = rec[TARGET_EPSILON]
    return RunConfig.from_mapping(settings)


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
    # Simulation: each partition's institution name, from the data's natural split.
    institution_names: tuple[str, ...] = ()

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
        if self.institution_names:
            roots["institution-names"] = json.dumps(list(self.institution_names))
        return {
            **run_record(self.run),
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
        try:
            run = run_config_of(rec)
            req = cls(
                run,
                count(rec.get("round", 0), "round", 0, MAX_ROUND),
                text(rec.get("backbone-sha256"), "backbone-sha256"),
                count(rec.get("num-classes"), "num-classes", 0, MAX_CLASSES),
                text(rec.get("run-id", ""), "run-id", empty=True),
                text(rec.get("state-root", ""), "state-root", 4096, empty=True),
                text(rec.get("cache-root", ""), "cache-root", 4096, empty=True),
                institution_names(rec.get("institution-names", "")),
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
            {TRAINABLE: array_record(self.arrays), "run": ConfigRecord(self.request.to_record())}
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        request = RoundRequest.from_record(dict(record(content, "run", ConfigRecord)))
        trainable = content.get(TRAINABLE)
        if not isinstance(trainable, ArrayRecord) or len(trainable) > MAX_ARRAYS:
            raise MessageRejected(
                f"the server's message lacks its {TRAINABLE} arrays (at most {MAX_ARRAYS})"
            )
        arrays, total = {}, 0
        for key, arr in trainable.items():
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
