"""The institution's own record of its privacy spend (its accountant history).

``<state_dir>/privacy_state.json`` lists every mechanism segment this institution ran, in every
round of every run, and is rewritten atomically (temp file, fsync, rename) *before* the
client releases the update of that round (write-ahead): a lost reply can only over-count.
Cumulative epsilon is always computed from the whole history, so restarts and new runs never
reset it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import FerryError
from common.privacy.accounting import MechanismSegment, epsilon_for_history

STATE_FILE = "privacy_state.json"


@dataclass
class PrivacyState:
    path: Path
    institution: str
    entries: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, state_dir: str | os.PathLike, institution: str) -> PrivacyState:
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FerryError(
                f"state directory {state_dir} cannot be created ({exc.strerror}): "
                "give a writable --state-dir"
            ) from None
        path = state_dir / STATE_FILE
        if not path.exists():
            return cls(path, institution)
        try:
            data = json.loads(path.read_text())
            entries = list(data["entries"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FerryError(
                f"privacy state {path} is unreadable ({exc}); it is the only record of this "
                "institution's spend: restore it from backup rather than deleting it"
            ) from None
        return cls(path, data.get("institution", institution), entries)

    @property
    def history(self) -> list[MechanismSegment]:
        return [
            MechanismSegment(e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries
        ]

    def rounds(self) -> int:
        return len(self.entries)

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        return epsilon_for_history(self.history, delta, accountant)

    def record(self, segment: MechanismSegment, **context: object) -> None:
        """Append one round's segment and persist it durably before anything is released."""
        self.entries.append({**segment.as_dict(), **context})
        payload = json.dumps({"institution": self.institution, "entries": self.entries}, indent=1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            self.entries.pop()
            raise FerryError(
                f"cannot write privacy state {self.path} ({exc.strerror}): the round is not "
                "released; give a writable --state-dir"
            ) from None
