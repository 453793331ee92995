"""One place turns a mechanism into a DpEvent and back (common.privacy.dp_events).

The client's signed report, the ledger, the server's check of a report and the audit's replay
and RDP cross-check all read the event :func:`segment_event` builds, so the ε a client
accounts for and the ε an auditor replays describe the same mechanism.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.common.privacy.dp_events import (
    event_from_json,
    event_mechanism,
    event_to_json,
    history_event,
    segment_event,
)
from ferry.server import audit_replay

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5


SEGMENTS = [MechanismSegment(1.2, 0.1, 10), MechanismSegment(0.73, 0.0021, 480)]


@pytest.mark.parametrize("segment", [*SEGMENTS, MechanismSegment(3.0, 1.0, 1)])
def test_the_event_a_report_carries_reads_back_as_its_mechanism(segment):
    carried = json.loads(json.dumps(event_to_json(segment_event(segment))))  # as in a ledger
    want = (segment, f"PoissonSampled(Gaussian) x{segment.steps}", True)
    assert event_mechanism(event_from_json(carried)) == want
    assert audit_replay.mechanism(carried) == want


def test_a_non_private_report_carries_the_librarys_own_non_private_event():
    import dp_accounting

    from ferry.common.privacy.report import NON_PRIVATE_EVENT

    assert NON_PRIVATE_EVENT == event_to_json(dp_accounting.NonPrivateDpEvent())
    seg, shape, poisson = audit_replay.mechanism(NON_PRIVATE_EVENT)
    assert (seg.steps, shape, poisson) == (0, "NonPrivate x1", False)


def test_audit_replay_of_the_reported_events_matches_the_clients_own_accounting():
    # Three rounds as a client runs them; what it reports is one event per round.
    history = [MechanismSegment(1.1, 0.02, 150), MechanismSegment(0.9, 0.05, 60)] * 2
    reported = [audit_replay.mechanism(event_to_json(segment_event(s)))[0] for s in history]
    client = epsilon_for_history(history, DELTA)
    curve, _, rdp = audit_replay.replay(tuple(reported), (DELTA,) * len(reported))
    assert curve[-1] == pytest.approx(client, rel=0.01)
    assert curve[-1] <= rdp  # the RDP cross-check composes history_event: an upper bound
    assert audit_replay._rdp_epsilon(tuple(history), DELTA) == pytest.approx(rdp, rel=1e-9)


def test_a_history_event_composes_each_segments_event():
    history = [MechanismSegment(1.0, 0.1, 5), MechanismSegment(2.0, 0.2, 7)]
    assert history_event(history).events == [segment_event(s) for s in history]


def test_no_other_module_builds_a_dp_event():
    built = re.compile(r"\b(?:Gaussian|PoissonSampled|SelfComposed|Composed)DpEvent\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("common", "client", "server", "simulations", "ferry")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() != "common/privacy/dp_events.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if built.search(line)
    ]
    assert not offenders, "build DpEvents with common.privacy.dp_events: " + ", ".join(offenders)
