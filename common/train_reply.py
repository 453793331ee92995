"""The ``train`` reply's codec (see :mod:`common.messages` for the contract all codecs keep).

Wire form: ``trainable`` (ArrayRecord: the trained arrays), ``metrics`` (MetricRecord: exactly
``num-examples``, the training-set size n; nothing else computed on the training split is
released) and ``privacy`` (ConfigRecord: ``signed-report`` and ``signature``, the
institution's signed report, :mod:`common.privacy.report`). The signed report is the one
source of every privacy number the server keeps: there is no unsigned copy to disagree
with it.

Parsed against a :class:`TrainExpectation` (what the server asked, the current global
arrays, the node's registered name), in two parts, because the spend a well-formed report
describes is real even when the update beside it is unusable:

* :class:`PrivacyReply`: the report is well formed, in range and describes the mechanism
  the round asked for (run, round, clipping norm, delta, batch size, epochs, sigma when
  fixed, q and steps as Opacus derives them from n, the DpEvent of exactly those numbers),
  and it names the node's registered institution;
* :class:`ModelUpdate`: the arrays have the global arrays' keys, dtypes, shapes and only
  finite values, and n is the report's example count, at most :data:`MAX_EXAMPLES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ferry.common.message_fields import (
    MAX_EXAMPLES,
    MAX_KEYS,
    MessageRejected,
    array_record,
    clipped,
    count,
    decoded,
    number,
    only_keys,
    record,
    text,
)
from ferry.common.messages import MAX_ROUND, TRAINABLE, RoundRequest
from ferry.common.privacy import UNIT_OF_PRIVACY
from ferry.common.privacy.accounting import ACCOUNTANTS, MechanismSegment
from ferry.common.privacy.dp_events import event_to_json, segment_event
from ferry.common.privacy.report import (
    NON_PRIVATE_EVENT,
    REPLY_BODY,
    REPLY_SIGNATURE,
    PrivacyReport,
    ReportError,
    SignedReport,
)
from ferry.common.training_defaults import batch_size_for, trainable_size

MAX_NOISE = 1e6  # as RunConfig.validate bounds a given sigma
BUDGET_LEFT = "budget-left-for-another-round"  # the report's extra: may it be asked again


@dataclass(frozen=True)
class TrainExpectation:
    """What a train reply must agree with: the request it answers, the global arrays it
    updates, and the registered name of the node it comes from (None where nodes are not
    registered: simulation and insecure trials keep self-reported names)."""

    request: RoundRequest
    arrays: dict[str, np.ndarray]
    institution: str | None = None


@dataclass(frozen=True)
class PrivacyReply:
    """The signed privacy report of a train reply, and its parsed body."""

    signed: SignedReport
    report: PrivacyReport

    @property
    def budget_left(self) -> bool:
        """False when the institution says its budget allows no further round."""
        return self.report.extra.get(BUDGET_LEFT) is not False

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({REPLY_BODY: self.signed.body, REPLY_SIGNATURE: self.signed.signature})

    @classmethod
    def of(cls, signed: dict) -> PrivacyReply:
        """An institution's own reply part, from :func:`client.receipts.sign_and_keep`."""
        return cls.from_record(signed)

    @classmethod
    def from_record(cls, rec: dict) -> PrivacyReply:
        """Parse (types and sizes only; :meth:`from_content` checks it against the round)."""
        only_keys(rec, {REPLY_BODY, REPLY_SIGNATURE}, "privacy")
        body = text(rec.get(REPLY_BODY), "the signed report", 64_000)
        signature = text(rec.get(REPLY_SIGNATURE), "the report's signature", 1_024)
        try:
            report = PrivacyReport.from_body(body)
        except ReportError as exc:
            raise MessageRejected(f"privacy report: {clipped(exc, 200)}") from None
        return cls(SignedReport(body, signature), report)

    @classmethod
    def from_content(cls, content: RecordDict, expected: TrainExpectation) -> PrivacyReply:
        privacy = cls.from_record(dict(record(content, "privacy", ConfigRecord)))
        _check_report(privacy.report, expected)
        return privacy


def _check_report(r: PrivacyReport, expected: TrainExpectation) -> None:
    """Ranges, and agreement with what the round asked for (module docstring)."""
    req, run = expected.request, expected.request.run
    name = text(r.institution, "the report's institution")
    if expected.institution is not None and name != expected.institution:
        raise MessageRejected(
            f"the report names institution {clipped(name, 60)!r} but the node is registered as "
            f"{expected.institution!r}"
        )
    text(r.accountant_library, "accountant-library")
    for label, got, want in (
        ("run-id", r.run_id, req.run_id),
        ("round", r.round, req.round),
        ("unit", r.unit, UNIT_OF_PRIVACY),
        ("sampling", r.sampling, "poisson"),
        ("non-private", r.non_private, run.non_private),
        ("delta", r.delta, run.delta),
        ("max-grad-norm", r.max_grad_norm, run.max_grad_norm),
        ("local-epochs", r.local_epochs, run.local_epochs),
    ):
        if got != want:
            raise MessageRejected(
                f"the report's {label} {clipped(got, 60)!r} is not the round's {want!r}"
            )
    if r.accountant not in ACCOUNTANTS:
        raise MessageRejected(
            f"the report's accountant {clipped(r.accountant, 40)!r} is none of {ACCOUNTANTS}"
        )
    n = count(r.examples, "the report's examples", 1, MAX_EXAMPLES)
    # The run's batch, or the public rule's for this n and the arrays' size p.
    batch = batch_size_for(run, n, trainable_size(expected.arrays))
    if r.batch_size != batch:
        raise MessageRejected(
            f"the report's batch-size {clipped(r.batch_size, 60)!r} is not the round's {batch!r} "
            f"for its {n} examples"
        )
    # A non-private round spends nothing and is not counted in the institution's state.
    count(r.client_rounds, "the report's client rounds", 0 if r.non_private else 1, MAX_ROUND)
    for label, value, high in (
        ("budget-epsilon", r.budget_epsilon, math.inf),
        ("budget-delta", r.budget_delta, 1.0),
    ):
        if value is not None:
            number(value, f"the report's {label}", 0.0, high)
    for label, value in (("prev_report", r.prev_report), ("signer", r.signer)):
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise MessageRejected(f"the report's {label} is not a sha256 in hex")
    if len(r.extra) > MAX_KEYS or not isinstance(r.extra.get(BUDGET_LEFT, True), bool):
        raise MessageRejected(f"the report's extra values are not a few flags ({BUDGET_LEFT})")
    if r.non_private:
        if (r.noise_multiplier, r.sample_rate, r.steps, r.epsilon) != (0.0, 1.0, 0, None):
            raise MessageRejected(
                "a non-private report claims noise, sampling, steps or an epsilon"
            )
        if r.dp_event != NON_PRIVATE_EVENT:
            raise MessageRejected("a non-private report's dp_event is not NonPrivateDpEvent")
        return
    sigma = number(r.noise_multiplier, "the report's noise-multiplier", 0.0, MAX_NOISE)
    if sigma <= 0 or (not run.derive_noise and sigma != run.noise_multiplier):
        raise MessageRejected(f"the report's noise-multiplier {sigma!r} is not the round's")
    batches = max(1, math.ceil(n / batch))  # common.training_defaults.round_plan (Opacus)
    if not math.isclose(r.sample_rate, 1.0 / batches, rel_tol=1e-12):
        raise MessageRejected(
            f"the report's sample-rate {r.sample_rate!r} is not 1/ceil(n/B) = 1/{batches} for "
            f"its {n} examples"
        )
    if r.steps != run.local_epochs * batches:
        raise MessageRejected(
            f"the report's steps {r.steps!r} are not epochs x ceil(n/B) = "
            f"{run.local_epochs * batches}"
        )
    if r.epsilon is None or r.epsilon < 0:
        raise MessageRejected(f"the report's epsilon {r.epsilon!r} is not a spend")
    event = event_to_json(segment_event(MechanismSegment(sigma, r.sample_rate, r.steps)))
    if r.dp_event != event:
        raise MessageRejected(
            "the report's dp_event is not the mechanism of its sigma, q and steps"
        )


@dataclass(frozen=True)
class ModelUpdate:
    """The trained arrays and the training example count n of a train reply."""

    arrays: dict[str, np.ndarray]
    num_examples: int

    def to_content(self) -> dict:
        return {
            TRAINABLE: array_record(self.arrays),
            "metrics": MetricRecord({"num-examples": self.num_examples}),
        }

    @classmethod
    def from_content(
        cls, content: RecordDict, expected: TrainExpectation, examples: int
    ) -> ModelUpdate:
        """Checked against the global arrays and the report's ``examples``."""
        metrics = record(content, "metrics", MetricRecord)
        only_keys(metrics, {"num-examples"}, "metrics")
        n = count(metrics.get("num-examples"), "num-examples", 1, MAX_EXAMPLES)
        if n != examples:
            raise MessageRejected(f"num-examples {n:,} is not the report's {examples:,}")
        trained = record(content, TRAINABLE, ArrayRecord)
        if set(trained) != set(expected.arrays):
            raise MessageRejected(
                f"array keys {clipped(sorted(trained), 120)} differ from {sorted(expected.arrays)}"
            )
        arrays = {k: decoded(trained[k], k, g.dtype, g.shape) for k, g in expected.arrays.items()}
        return cls(arrays, n)


@dataclass(frozen=True)
class TrainReply:
    """A whole train reply (what an institution builds; the server parses its two parts in
    turn, :mod:`server.rounds`)."""

    update: ModelUpdate
    privacy: PrivacyReply

    def to_content(self) -> RecordDict:
        return RecordDict({**self.update.to_content(), "privacy": self.privacy.to_record()})

    @classmethod
    def from_content(cls, content: RecordDict, expected: TrainExpectation) -> TrainReply:
        privacy = PrivacyReply.from_content(content, expected)
        return cls(ModelUpdate.from_content(content, expected, privacy.report.examples), privacy)
