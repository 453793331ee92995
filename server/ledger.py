"""The server's privacy ledger: append-only, hash-chained JSON Lines.

One record per event, one line per record, keys sorted, UTF-8. Every record holds

* ``seq``: 0, 1, 2, ... (its position);
* ``prev``: the sha256 (hex) of the previous record's line bytes (without the newline);
  ``"0" * 64`` for the first record;
* ``time`` (UTC, ISO 8601) and ``event``, plus the event's own fields.

The chain head (``seq`` and sha256 of the last line) is also written to ``ledger.head`` after
every append (atomically, :mod:`common.atomic_files`), so deleting or editing the *last*
line is detected too. Each append is flushed and fsynced before it returns; a crash
mid-write leaves at most one incomplete last line, which :func:`read_ledger` reports
(``incomplete_tail``) instead of failing.

Events (fields besides seq/prev/time/event):

``run_started``      run_id, config (the run record, :func:`common.messages.run_record`:
                     the run's target ε is ``target-epsilon``; ``epsilon`` in records
                     before the rename), backbone_sha256, privacy: the run's full privacy
                     statement (:func:`common.privacy.statement.privacy_statement`: unit,
                     mechanism, accountant, delta, what is covered, against whom, and the
                     releases not covered with what each reveals)
``backbone_shipped`` run_id, round, node_id, backbone_sha256, bytes
``client_trained``   run_id, round, institution, node_id, dp_event (see
                     :mod:`common.privacy.dp_events`), sampling ("poisson"), noise_multiplier,
                     sample_rate, steps, max_grad_norm, delta, accountant,
                     accountant_library, epsilon_spent (its cumulative spent ε;
                     ``epsilon_reported`` before the rename), client_rounds (the client's
                     cumulative count of rounds, this one included), budget_epsilon,
                     budget_delta, examples: the values parsed from the signed report below,
                     under the node's registered name (simulation: the report's name);
                     and signed_report: the institution's signed privacy report exactly as
                     its reply carried it (:mod:`common.privacy.report`), or null when the
                     reply held none. ``{"body": <canonical JSON text>, "signature":
                     <base64>}``: the body holds the report's fields (format, run_id, round,
                     institution, unit, non_private, dp_event, sampling, noise_multiplier,
                     sample_rate, steps, max_grad_norm, batch_size, local_epochs, examples,
                     delta, epsilon, accountant, accountant_library, client_rounds,
                     budget_epsilon, budget_delta, extra, prev_report: sha256 of the same
                     institution's previous report body, signer: sha256 of its public key);
                     the signature is ECDSA-SHA384 with the institution's key over a fixed
                     context string followed by the body's bytes. ``ferry audit`` verifies
                     it, replays only the signed numbers and flags any unsigned field that
                     contradicts them
``client_refused``   run_id, round, institution (or null), node_id, reason, kind
                     ("budget" when the institution's budget would be exceeded)
``update_rejected``  run_id, round, institution (or null), node_id, stage, reason: a train
                     reply that did not parse (:mod:`common.messages`,
                     :mod:`common.train_reply`: types, ranges, sizes, a report that
                     contradicts the round or names another institution than the node's
                     registered one); it was not aggregated, and the round went on
``evaluation_rejected`` run_id, round, institution (or null), node_id, stage, reason: an
                     evaluation reply that did not parse; left out of the pooled metrics
``node_refused``     run_id, round, node_id, reason: a node the grid reported whose key is
                     not among the run's registered institutions; never sampled
``round_aggregated`` run_id, round, participants (institution ids), payload_bytes, and the
                     bounded aggregation (:mod:`server.aggregation`): rule, weight_cap,
                     norm_bound (the bound on each update's change), weights (per
                     institution, after the cap), clipped ({institution: {norm}} for every
                     change clipped to the bound)
``client_dropped``   run_id, round, institution (or null), node_id, stage ("backbone offer",
                     "backbone shipping", "train", "evaluate"), reason: no reply within the
                     round timeout, or the node went offline. After a drop at "train" the
                     client may still have spent privacy; its next ``client_trained`` shows
                     that as a gap in ``client_rounds``
``round_failed``     run_id, round, reason (fewer usable updates than ``min_clients``; nothing
                     was aggregated)
``run_resumed``      run_id, after_round (the last checkpointed round; the next one is run
                     again), records_after_checkpoint (records of the crashed attempt, kept)
``run_finished``     run_id, rounds_completed, reason
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ferry.common.atomic_files import write_atomic

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "ledger.head"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class LedgerError(Exception):
    """The ledger cannot be read (``tampered`` False) or its chain is broken (True)."""

    def __init__(self, message: str, tampered: bool, line: int | None = None):
        super().__init__(message)
        self.tampered = tampered
        self.line = line


@dataclass
class LedgerContents:
    records: list[dict] = field(default_factory=list)
    incomplete_tail: str | None = None  # what a crash mid-write left, if anything
    head_hash: str = GENESIS
    head_behind: bool = False  # ledger.head lags the last record (crash before its update)


def read_ledger(path: str | os.PathLike, check_head: bool = True) -> LedgerContents:
    """Read and verify the chain. Raises :class:`LedgerError` naming the first bad line."""
    path = Path(path)
    head_path = path.with_name(HEAD_FILE)
    try:
        data = path.read_bytes()
    except OSError as exc:
        if check_head and head_path.exists():
            raise LedgerError(
                f"{path} is gone but {HEAD_FILE} records a chain: the ledger was removed",
                True,
                1,
            ) from None
        raise LedgerError(f"cannot read {path} ({exc.strerror})", tampered=False) from None
    if not data.strip():
        if check_head and head_path.exists():
            raise LedgerError(
                f"{path} is empty but {HEAD_FILE} records a chain: the ledger was emptied",
                True,
                1,
            )
        raise LedgerError(f"{path} is empty: no ledger records", tampered=False)
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    contents = LedgerContents()
    if tail:
        contents.incomplete_tail = tail[:200].decode(errors="replace")
    prev = before_last = GENESIS
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if number == 1:
                raise LedgerError(
                    f"{path} is not a ledger: line 1 is not JSON ({exc})", False, 1
                ) from None
            raise LedgerError(f"line {number} is not a JSON record ({exc})", True, number) from None
        if record.get("seq") != number - 1:
            raise LedgerError(
                f"line {number}: seq {record.get('seq')!r}, expected {number - 1} "
                "(a record was deleted, inserted or moved)",
                True,
                number,
            )
        if record.get("prev") != prev:
            raise LedgerError(
                f"line {number}: prev hash does not match line {number - 1} "
                "(line edited, deleted or reordered)",
                True,
                number,
            )
        before_last, prev = prev, line_hash(line)
        contents.records.append(record)
    if not contents.records:
        raise LedgerError(f"{path} holds no complete record", tampered=False)
    contents.head_hash = prev
    if check_head and head_path.exists():
        try:
            head = json.loads(head_path.read_text())
            if not isinstance(head, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise LedgerError(
                f"{HEAD_FILE} is unreadable ({exc}): the last record cannot be verified",
                True,
                len(lines),
            ) from None
        n = len(contents.records)
        # A crash between a record's fsync and the head's rename leaves the head one behind:
        # that is the last record being written, not an edit.
        contents.head_behind = head.get("seq") == n - 2 and head.get("sha256") == before_last
        if contents.head_behind:
            pass
        elif head.get("seq") != n - 1 or head.get("sha256") != prev:
            raise LedgerError(
                f"line {len(lines)}: the ledger's last record does not match {head_path.name} "
                f"(seq {head.get('seq')}): the last line was edited or records were removed",
                True,
                len(lines),
            )
    return contents


class Ledger:
    """Appends records to ``<out>/ledger.jsonl``; reopening continues the verified chain."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LEDGER_FILE
        self.head_path = self.path.with_name(HEAD_FILE)
        self.seq, self.prev = 0, GENESIS
        if self.path.exists() and b"\n" not in self.path.read_bytes():
            if not self.head_path.exists():
                self._truncate_tail()  # a crash during the very first append: start afresh
        if self.path.exists() and self.path.stat().st_size:
            contents = read_ledger(self.path)
            if contents.incomplete_tail is not None:
                self._truncate_tail()
            self.seq, self.prev = len(contents.records), contents.head_hash
            if contents.head_behind:
                self._write_head()
        elif self.head_path.exists():
            raise LedgerError(
                f"{self.path} is missing or empty but {HEAD_FILE} records a chain: "
                "refusing to start a new ledger over a removed one",
                True,
                1,
            )

    def _truncate_tail(self) -> None:
        data = self.path.read_bytes()
        with open(self.path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())

    def append(self, event: str, **fields: object) -> dict:
        record = {
            **fields,
            "seq": self.seq,
            "prev": self.prev,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        line = encode(record)
        with open(self.path, "ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.seq, self.prev = self.seq + 1, line_hash(line)
        self._write_head()
        return record

    def _write_head(self) -> None:
        write_atomic(self.head_path, json.dumps({"seq": self.seq - 1, "sha256": self.prev}))
