"""Where Ferry keeps things by default: ``$FERRY_HOME`` (default ``~/.cache/ferry``)."""

from __future__ import annotations

import os
from pathlib import Path


def ferry_home() -> Path:
    return Path(os.environ.get("FERRY_HOME") or Path.home() / ".cache" / "ferry")
