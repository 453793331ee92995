"""The institution's own record of its privacy spend (its accountant history).

``<state_dir>/privacy_state.json`` lists every mechanism segment this institution ran, in every
round of every run; ``privacy_state.json.bak`` is a second, identical copy. Cumulative epsilon
is always computed from the whole history, so restarts and new runs never reset it. This file
is the ground truth of the institution's spend, so:

- **It names its institution** and refuses to be read as anyone else's: a state copied from
  another institution is an error naming both, never a fresh budget.
- **It is hash-chained**: every entry carries ``prev``, the sha256 of the previous entry (the
  first, of ``ferry-privacy-state`` and the institution's name), so an edited, reordered or
  relabelled entry makes the copy unreadable.
- **It is never silently recreated.** Only a directory with neither copy, and no sign that a
  state existed, is a fresh budget: a receipt chain (``receipts.jsonl``) recording a private
  round, or a report-signing key without receipts, means both copies were lost (one
  ``rm privacy_state.json*``), which is a refusal naming what the receipts record.
  One copy missing, emptied, unreadable, truncated or different from the other is a refusal
  that names the exact fix (e.g. ``cp privacy_state.json.bak privacy_state.json``), with one
  exception that a crash produces: one copy equal to the other plus exactly one more entry is
  taken (the longer only over-counts) and the shorter is repaired.
- **It is locked**: :meth:`PrivacyState.locked` holds an exclusive ``fcntl.flock`` on
  ``privacy_state.lock`` while the history is re-read, checked and extended
  (:func:`client.budget_guard.reserve_round`), so concurrent rounds never lose a spend.

Write order of :meth:`PrivacyState.record` (each copy: a uniquely named temp file, written,
fsynced, renamed over the copy, then the directory fsynced: :mod:`common.atomic_files`), and
why every crash is safe:

1. crash before the main copy's rename: both copies hold the old history; the round was not
   reserved, so it never trains (stray ``*.tmp`` files are ignored);
2. crash between the two renames: the main copy is the backup plus the new entry; the next
   open takes the longer (over-counts at worst: the round may never have trained) and repairs
   the backup;
3. crash after both: the round is reserved; whether or not it trained or replied, its spend
   is counted (write-ahead: a lost reply can only over-count).

Not covered: whoever can write the institution's own disk can rewrite both copies
consistently (e.g. drop the last entries of both); the copies guard against loss and
mistakes, not against the institution itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.common.privacy.report import RECEIPTS_FILE, read_receipts
from ferry.common.private_files import open_private, private_dir, write_private

STATE_FILE = "privacy_state.json"
BACKUP_FILE = STATE_FILE + ".bak"
LOCK_FILE = "privacy_state.lock"
SIGNING_KEY_FILE = "report-signing.key"  # client.receipts.LOCAL_KEY (made on the first report)
FORMAT = 2


@dataclass
class PrivacyState:
    path: Path
    institution: str
    entries: list[dict] = field(default_factory=list)
    _held: bool = field(default=False, repr=False, compare=False)

    @property
    def backup(self) -> Path:
        return self.path.with_name(BACKUP_FILE)

    @classmethod
    def open(cls, state_dir: str | os.PathLike, institution: str) -> PrivacyState:
        """The verified state of ``institution`` (empty only if neither copy exists)."""
        with cls.locked(state_dir, institution) as state:
            return state

    @classmethod
    @contextlib.contextmanager
    def locked(cls, state_dir: str | os.PathLike, institution: str) -> Iterator[PrivacyState]:
        """Hold the exclusive lock; the state is (re-)read from disk under it, and
        :meth:`record` inside the block extends exactly what is on disk."""
        state_dir = Path(state_dir)
        try:
            private_dir(state_dir)
            fd = open_private(state_dir / LOCK_FILE, os.O_RDWR)
        except OSError as exc:
            raise FerryError(
                f"state directory {state_dir} cannot be used ({exc.strerror}): "
                "give a writable --state-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = _load(state_dir / STATE_FILE, institution)
            state._held = True
            try:
                yield state
            finally:
                state._held = False
        finally:
            os.close(fd)  # releases the flock

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
        """Append one round's segment and persist both copies durably before anything is
        released. Outside :meth:`locked`, takes the lock and extends what is on disk."""
        if not self._held:
            with PrivacyState.locked(self.path.parent, self.institution) as fresh:
                fresh.record(segment, **context)
            self.entries = fresh.entries
            return
        self.entries.append({**segment.as_dict(), **context})
        try:
            _write_both(self)
        except (OSError, ValueError) as exc:
            self.entries.pop()
            raise FerryError(
                f"cannot write privacy state {self.path} ({getattr(exc, 'strerror', exc)}): the "
                "round is not released; give a writable --state-dir"
            ) from None


def _genesis(state: PrivacyState) -> str:
    return hashlib.sha256(f"ferry-privacy-state\n{state.institution}".encode()).hexdigest()


def _entry_hash(entry: dict) -> str:
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _payload(state: PrivacyState) -> str:
    prev = _genesis(state)
    for entry in state.entries:  # (re)chains entries written before the chain existed
        entry["prev"] = prev
        prev = _entry_hash(entry)
    data = {"format": FORMAT, "institution": state.institution, "entries": state.entries}
    return json.dumps(data, indent=1)


def _write_both(state: PrivacyState) -> None:
    """Main copy first, then the backup (see the module docstring for why)."""
    payload = _payload(state)
    for target in (state.path, state.backup):
        _install(target, payload)


def _install(target: Path, payload: str) -> None:
    """One copy, durably (0600 from its first byte; the tests crash here)."""
    write_private(target, payload.encode())


@dataclass
class _Copy:
    """One copy as read: ``problem`` is None (usable), "missing", "empty", or why unusable."""

    path: Path
    problem: str | None
    state: PrivacyState | None = None
    legacy: bool = False

    def describe(self) -> str:
        assert self.state is not None
        n = self.state.rounds()
        if not n:
            return "no rounds"
        last = self.state.entries[-1]
        return f"{n} rounds (last: run {last.get('run', '?')!r} round {last.get('round', '?')})"


def _read(path: Path, main: Path) -> _Copy:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _Copy(path, "missing")
    except OSError as exc:
        return _Copy(path, f"unreadable ({exc.strerror})")
    if not text.strip():
        return _Copy(path, "empty")
    try:
        data = json.loads(text)
        institution = data["institution"]
        entries = list(data["entries"])
        for e in entries:
            MechanismSegment(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        if not isinstance(institution, str):
            raise TypeError("institution is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        return _Copy(path, f"unreadable ({type(exc).__name__}: {exc})")
    state = PrivacyState(main, institution, entries)
    legacy = "format" not in data and not any("prev" in e for e in entries)
    if not legacy:
        prev = _genesis(state)
        for i, e in enumerate(entries):
            if e.get("prev") != prev:
                return _Copy(path, f"damaged (the hash chain breaks at entry {i + 1})")
            try:
                prev = _entry_hash(e)
            except ValueError:
                return _Copy(path, f"damaged (entry {i + 1} holds a non-finite number)")
    return _Copy(path, None, state, legacy)


def _load(path: Path, institution: str) -> PrivacyState:
    """Read and reconcile both copies under the lock (see the module docstring)."""
    main, backup = _read(path, path), _read(path.with_name(BACKUP_FILE), path)
    for copy in (main, backup):
        if copy.state is not None and copy.state.institution != institution:
            raise FerryError(
                f"privacy state {copy.path} belongs to institution "
                f"{copy.state.institution!r}, not {institution!r}: point --state-dir at "
                f"{institution}'s own state directory (never copy another institution's state)"
            )
    if main.problem == backup.problem == "missing":
        _refuse_if_state_existed(path.parent)
        return PrivacyState(path, institution)
    if main.state is not None and backup.state is not None:
        a, b = main.state.entries, backup.state.entries
        if a == b:
            return main.state
        longer, shorter = (main, backup) if len(a) > len(b) else (backup, main)
        if len(longer.state.entries) == len(shorter.state.entries) + 1 and (
            longer.state.entries[:-1] == shorter.state.entries
        ):
            return _repaired(longer.state)  # a crash between the two writes
        raise FerryError(
            f"privacy state {main.path} ({main.describe()}) and its backup {backup.path} "
            f"({backup.describe()}) disagree: keep the copy with every round you ran (if it "
            f"is the longer one: `cp {longer.path} {shorter.path}`), never delete both"
        )
    if main.legacy and backup.problem == "missing":
        return main.state  # written before backups existed; the next record adds one
    good, bad = (main, backup) if main.state is not None else (backup, main)
    if good.state is None:
        raise FerryError(
            f"privacy state {main.path} is {main.problem} and its backup {backup.path} is "
            f"{backup.problem}: restore them from your own backups; they are the only record "
            "of this institution's spend, and a fresh budget is never started over them"
        )
    if bad.problem == "missing" and good.state.rounds() == 1:
        return _repaired(good.state)  # a crash between the two writes of the first round
    raise FerryError(
        f"privacy state {bad.path} is {bad.problem} but {good.path} records "
        f"{good.describe()}: restore it with `cp {good.path} {bad.path}` "
        "(a fresh budget is never started over a lost state)"
    )


def _refuse_if_state_existed(state_dir: Path) -> None:
    """Both copies are missing: refuse if the directory shows a state existed (its receipt
    chain records a private round, is unreadable, or a signing key has no receipts)."""
    receipts = state_dir / RECEIPTS_FILE
    try:
        data = receipts.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise FerryError(
            f"{receipts} is unreadable ({exc.strerror}) and no privacy state exists: restore "
            "the state directory from your backups"
        ) from None
    fix = (
        f"restore {STATE_FILE} and {BACKUP_FILE} in {state_dir} from your own backups (they "
        "are the only record of this institution's spend); a fresh budget is never started "
        "over a lost state"
    )
    if data.strip():
        found, problems = read_receipts(data)
        private = [r for r in found if not _receipt_non_private(r.body)]
        if private or problems:
            last = _receipt_where(private[-1].body) if private else "unreadable"
            raise FerryError(
                f"privacy state {state_dir / STATE_FILE} and its backup are both missing, but "
                f"{receipts} records {len(private)} private rounds (last: {last}): {fix}"
            )
    elif (state_dir / SIGNING_KEY_FILE).exists():
        raise FerryError(
            f"privacy state {state_dir / STATE_FILE} and its backup are both missing, but "
            f"{state_dir / SIGNING_KEY_FILE} shows this institution reported rounds: {fix}"
        )


def _receipt_body(body: str) -> dict:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _receipt_non_private(body: str) -> bool:
    return _receipt_body(body).get("non_private") is True


def _receipt_where(body: str) -> str:
    data = _receipt_body(body)
    return f"run {data.get('run_id', '?')!r} round {data.get('round', '?')}"


def _repaired(state: PrivacyState) -> PrivacyState:
    try:
        _write_both(state)
    except OSError as exc:
        raise FerryError(
            f"cannot repair privacy state {state.path} ({exc.strerror}): give a writable "
            "--state-dir"
        ) from None
    return state
