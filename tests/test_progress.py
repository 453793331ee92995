"""Progress while a run works, through ``logging``; ``--quiet`` and ``--verbose``.

* Feature extraction (round 1's long step at an institution) says examples done, examples/s
  and the time left, at most every few seconds.
* While the server waits for replies it says how many came, every few seconds (round 1:
  backbone, features, σ), so a run with a large backbone is never silent for long.
* ``ferry simulate`` prints its lines through the ``ferry`` logger: ``--quiet`` hides them.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

import ferry.common.progress as progress
import ferry.server.exchange as exchange
from ferry.cli import main
from ferry.client.feature_cache import extract
from ferry.common.backbones import build_backbone


def test_feature_extraction_says_examples_done_rate_and_time_left(caplog, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    trunk = build_backbone("ferry-cnn").eval()
    x = np.random.default_rng(0).random((600, 1, 32, 32), dtype=np.float32)
    with caplog.at_level(logging.INFO, logger="ferry.progress"):
        extract(trunk, x, {"grayscale": True, "size": 32}, batch=100)
    lines = [r.getMessage() for r in caplog.records if r.name == "ferry.progress"]
    steps = [
        re.fullmatch(r"extracting features: (\d+)/600 \((\d+)/s, about (\d+)s left\)", m)
        for m in lines[:-1]
    ]
    assert len(steps) == 5 and all(steps), lines  # after batches 1-5 of 6
    assert [int(m.group(1)) for m in steps] == [100, 200, 300, 400, 500]
    assert re.fullmatch(r"extracting features: 600 done in \d+s", lines[-1])


class SlowGrid:
    """Replies to every message after ``delay`` seconds."""

    def __init__(self, delay: float):
        self.delay, self.pushed, self.started = delay, [], None

    def push_messages(self, messages):
        import time

        self.started = time.monotonic()
        self.pushed = [f"m{i}" for i in range(len(messages))]
        return self.pushed

    def pull_messages(self, ids):
        import time

        if time.monotonic() - self.started < self.delay:
            return []
        return [_Reply(i) for i in ids]


class _Reply:
    def __init__(self, message_id: str):
        self.metadata = type("M", (), {"reply_to_message_id": message_id})()


def test_the_server_says_how_many_replied_while_it_waits(monkeypatch):
    monkeypatch.setattr(exchange, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(exchange, "PROGRESS_SECONDS", 0.05)
    notes = []
    grid = SlowGrid(delay=0.4)
    grid.push_messages([1, 2, 3])
    replies = exchange._pull(grid, set(grid.pushed), 5.0, lambda *a: notes.append(a))
    assert len(replies) == 3
    assert len(notes) >= 4 and all(n[:2] == (0, 3) for n in notes)
    gaps = np.diff([n[2] for n in notes])
    assert gaps.max() < 0.2  # every PROGRESS_SECONDS (plus one poll), never silent long


@pytest.mark.slow
def test_quiet_hides_the_progress_lines_and_the_default_shows_them(tmp_path, without_ray, capsys):
    base = ["simulate", "--weights", "random", "--clients", "2", "--rounds", "1"]
    base += ["--examples", "200"]
    assert main([*base, "--out", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr().out
    assert "round 1/1" in loud and "done in" in loud and "report:" in loud
    assert main([*base, "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "quiet" / "summary.json").is_file()
