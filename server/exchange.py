"""One message exchange with a set of clients, with byte counts and stragglers.

:func:`exchange` sends one message per node and waits at most the round timeout. It is
``Grid.send_and_receive`` with a finer poll (:data:`POLL_SECONDS` instead of Flower's 3 s,
which would add up to 3 s to every exchange of every round). Every reply is matched to the
node it answers through the message it replies to, not its sender: an error the SuperLink
writes for an unreachable node comes from the SuperLink itself. Nodes with no reply by then
are *stragglers*; nodes whose reply is a transport error (node offline, reply lost) are
*unavailable*. Both are dropped from the rest of the round by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

# Errors that mean "the node or its reply is gone", as opposed to the ClientApp failing.
TRANSPORT_ERRORS = {
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
}


POLL_SECONDS = 0.5
PROGRESS_SECONDS = 5.0  # while replies are awaited, say how many came at most this often


@dataclass
class Traffic:
    """Bytes one round moved. ``*_arrays`` count model arrays only (backbone or head);
    ``sent``/``received`` add the config and metrics records around them."""

    sent: int = 0
    received: int = 0
    sent_arrays: int = 0
    received_arrays: int = 0
    backbone_sent: int = 0
    backbones_shipped: int = 0
    largest_message_arrays: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Exchange:
    """The outcome of one exchange: ``replies`` as (node, message), and who did not answer."""

    replies: list[tuple[int, Message]] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)  # no reply within the timeout
    unavailable: dict[int, str] = field(default_factory=dict)  # node -> transport error


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def array_bytes(content: RecordDict) -> int:
    """Bytes of raw array data (no headers) in a message's ArrayRecords."""
    return sum(
        int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        for rec in content.values()
        if isinstance(rec, ArrayRecord)
        for arr in rec.values()
    )


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: array data, plus keys and values of config/metrics.

    (Flower's ConfigRecord.count_bytes rejects empty strings, hence our own count.)
    """
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += int(rec.count_bytes())
            continue
        for key, value in rec.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(len(v) if isinstance(v, str | bytes) else 8 for v in values)
    return total


def exchange(
    grid: Grid,
    messages: list[Message],
    traffic: Traffic,
    timeout: float | None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Exchange:
    """Send ``messages`` (one per node), collect replies for at most ``timeout`` seconds;
    ``progress(replied, sent, seconds)`` every :data:`PROGRESS_SECONDS` while waiting."""
    result = Exchange()
    if not messages:
        return result
    started = time.monotonic()  # progress counts from here: a long push is waiting too
    traffic.sent += sum(payload_bytes(m.content) for m in messages)
    sizes = [array_bytes(m.content) for m in messages]
    traffic.sent_arrays += sum(sizes)
    traffic.largest_message_arrays = max(traffic.largest_message_arrays, *sizes)
    pushed = {i for i in grid.push_messages(messages) if i}
    # The grid stamps each message with its id when pushing it.
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for message_id, node in node_of.items():
        if message_id not in pushed:
            result.unavailable[node] = "the SuperLink did not accept the message"
    replies = _pull(grid, pushed, timeout, progress, started)
    answered = set(result.unavailable)
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error() and reply.error.code in TRANSPORT_ERRORS:
            result.unavailable[node] = str(reply.error.reason)
            continue
        if reply.has_content():
            traffic.received += payload_bytes(reply.content)
            traffic.received_arrays += array_bytes(reply.content)
        result.replies.append((node, reply))
    result.stragglers = [
        m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered
    ]
    return result


def waiting_note(log, rnd: int, stage: str) -> Callable[[int, int, float], None]:
    """The ``progress`` of one exchange as a log line: how many of the institutions answered."""

    def note(replied: int, sent: int, seconds: float) -> None:
        what = {"train": "trained", "evaluate": "evaluated"}.get(stage, "answered")
        first = " (round 1 includes extracting features and deriving σ)"
        log(
            f"  round {rnd} {stage}: {replied}/{sent} institutions {what} after {seconds:.0f}s"
            + (first if rnd == 1 and stage == "train" else "")
        )

    return note


def _pull(
    grid: Grid,
    pending: set[str],
    timeout: float | None,
    progress: Callable[[int, int, float], None] | None = None,
    sent_at: float | None = None,
) -> list[Message]:
    """Replies to the ``pending`` message ids, until all came or ``timeout`` passed;
    ``progress`` counts seconds from ``sent_at`` (when the push began; default: now)."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    sent_at = started if sent_at is None else sent_at
    next_note = sent_at + PROGRESS_SECONDS
    total = len(pending)
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending = pending - {m.metadata.reply_to_message_id for m in got}
        now = time.monotonic()
        if not pending or (deadline is not None and now >= deadline):
            break
        if progress is not None and now >= next_note:
            progress(total - len(pending), total, now - sent_at)
            next_note = now + PROGRESS_SECONDS
        time.sleep(POLL_SECONDS)
    return replies
