"""DpEvents as JSON: the ledger's description of a mechanism, in ``dp-accounting``'s terms.

A record's ``dp_event`` is the nested form of ``DpEvent.to_named_tuple()``: each level is an
object with ``module_name``, ``class_name`` and the event's own fields. Ferry's per-round
client mechanism reads, e.g.::

    {"module_name": "dp_accounting.dp_event", "class_name": "SelfComposedDpEvent", "count": 10,
     "event": {"module_name": "dp_accounting.dp_event", "class_name": "PoissonSampledDpEvent",
               "sampling_probability": 0.1,
               "event": {"module_name": "dp_accounting.dp_event",
                         "class_name": "GaussianDpEvent", "noise_multiplier": 1.2}}}

Contract (as in ``dp_accounting/dp_event.py``): fields are never removed and their meaning
never changes, so every ledger ever written stays replayable.

This module is the one place a mechanism becomes a DpEvent (:func:`segment_event`, and
:func:`history_event` for a whole history) and a DpEvent becomes a mechanism again
(:func:`event_mechanism`): the client's signed report, the ledger, the server's check of a
report (:mod:`common.train_reply`) and the audit's replay and RDP cross-check all go through
it, so what the client spends and what the auditor replays cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from ferry.common.privacy.accounting import MechanismSegment


def segment_event(segment: MechanismSegment):
    """One segment as a DpEvent: ``steps`` x PoissonSampled(``sample_rate``, Gaussian(sigma))."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            segment.sample_rate, dp_accounting.GaussianDpEvent(segment.noise_multiplier)
        ),
        segment.steps,
    )


def history_event(history: Iterable[MechanismSegment]):
    """A whole history as one DpEvent: the composition of its segments' events."""
    import dp_accounting

    return dp_accounting.ComposedDpEvent([segment_event(s) for s in history])


def event_mechanism(event) -> tuple[MechanismSegment | None, str, bool]:
    """(segment, shape, poisson) of a DpEvent. ``segment``: the one :func:`segment_event`
    builds it from (nested self-compositions multiplied out); for NonPrivateDpEvent a segment
    of no noise and no steps; None for any other mechanism. ``shape`` names the event for
    findings, e.g. ``"PoissonSampled(Gaussian) x10"``; ``poisson``: it is Ferry's
    PoissonSampled(Gaussian) mechanism."""
    from dp_accounting import dp_event as dpe

    count = 1
    while isinstance(event, dpe.SelfComposedDpEvent):
        count, event = count * int(event.count), event.event
    inner = type(getattr(event, "event", None)).__name__.removesuffix("DpEvent")
    shape = (
        type(event).__name__.removesuffix("DpEvent")
        + (f"({inner})" if inner != "NoneType" else "")
        + f" x{count}"
    )
    if isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(
        event.event, dpe.GaussianDpEvent
    ):
        seg = MechanismSegment(
            float(event.event.noise_multiplier), float(event.sampling_probability), count
        )
        return seg, shape, True
    if isinstance(event, dpe.NonPrivateDpEvent):  # no parameters: nothing to contradict
        return MechanismSegment(0.0, 1.0, 0), shape, False
    return None, shape, False


def event_to_json(event) -> dict:
    """A DpEvent as nested plain dicts (JSON-ready)."""

    def convert(value):
        if hasattr(value, "_asdict"):
            return {k: convert(v) for k, v in value._asdict().items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    return convert(event.to_named_tuple())


def event_from_json(data: dict):
    """The DpEvent a JSON description stands for (only ``dp_accounting.dp_event`` classes)."""
    from dp_accounting import dp_event

    def convert(value):
        if isinstance(value, dict) and "class_name" in value:
            if value.get("module_name", "dp_accounting.dp_event") != "dp_accounting.dp_event":
                raise ValueError(f"unknown DpEvent module {value.get('module_name')!r}")
            cls = getattr(dp_event, str(value["class_name"]), None)
            if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
                raise ValueError(f"unknown DpEvent class {value['class_name']!r}")
            fields = {
                k: convert(v) for k, v in value.items() if k not in ("module_name", "class_name")
            }
            try:
                return cls(**fields)
            except TypeError as exc:
                raise ValueError(f"bad fields for {value['class_name']}: {exc}") from None
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return convert(data)
