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
"""

from __future__ import annotations

from ferry.common.privacy.accounting import MechanismSegment


def segment_event(segment: MechanismSegment):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            segment.sample_rate, dp_accounting.GaussianDpEvent(segment.noise_multiplier)
        ),
        segment.steps,
    )


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
