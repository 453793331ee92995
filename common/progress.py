"""Progress of long steps, through Python ``logging`` (logger ``ferry.progress``).

The ``ferry`` command shows it on stdout (``--quiet`` hides it, ``--verbose`` adds debug
lines); a deployed institution's client writes it to its own log (stderr); elsewhere (a Ray
worker, a library user who configured nothing) it stays silent, as INFO records do.
"""

from __future__ import annotations

import logging
import time

LOG = logging.getLogger("ferry.progress")
EVERY_SECONDS = 5.0


class Progress:
    """``what``: n of ``total`` done, examples/s and the estimated time left, at most every
    :data:`EVERY_SECONDS` (the first line after that long, so short steps say nothing)."""

    def __init__(self, what: str, total: int, every: float | None = None):
        self.what, self.total = what, total
        self.every = EVERY_SECONDS if every is None else every
        self.started = time.monotonic()
        self.next_line = self.started + self.every
        self.spoke = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now < self.next_line or done >= self.total:
            return
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        LOG.info("%s: %d/%d (%.0f/s, about %.0fs left)", self.what, done, self.total, rate, left)
        self.next_line = now + self.every
        self.spoke = True

    def finish(self) -> None:
        if self.spoke:
            seconds = time.monotonic() - self.started
            LOG.info("%s: %d done in %.0fs", self.what, self.total, seconds)
