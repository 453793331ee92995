"""The privacy ledger's hash chain: any edit, deletion or reorder of one line is detected and
named; a crash mid-write is survivable; reopening continues the chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.server.ledger import HEAD_FILE, LEDGER_FILE, Ledger, LedgerError, encode, read_ledger

RECORDS = 5


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    ledger = Ledger(tmp_path)
    ledger.append("run_started", run_id="run-a", config={}, backbone_sha256="ab" * 32)
    for rnd in range(1, RECORDS):
        ledger.append(
            "client_trained",
            run_id="run-a",
            round=rnd,
            institution="hospital-000",
            epsilon_reported=0.5 * rnd,
        )
    return tmp_path


def _lines(directory: Path) -> list[bytes]:
    return (directory / LEDGER_FILE).read_bytes().splitlines()


def _write(directory: Path, lines: list[bytes]) -> None:
    (directory / LEDGER_FILE).write_bytes(b"".join(line + b"\n" for line in lines))


def _edit(lines: list[bytes], i: int) -> list[bytes]:
    record = json.loads(lines[i])
    record["tampered_with"] = True  # still a well-formed record with its own seq and prev
    return [*lines[:i], encode(record), *lines[i + 1 :]]


def _delete(lines: list[bytes], i: int) -> list[bytes]:
    return [*lines[:i], *lines[i + 1 :]]


def _reorder(lines: list[bytes], i: int) -> list[bytes]:
    j = i + 1 if i + 1 < len(lines) else i - 1  # swap with a neighbour
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


POSITIONS = {"first": 0, "middle": RECORDS // 2, "last": RECORDS - 1}


# (operation, position) -> the 1-based line the error must name
EXPECTED_LINE = {
    ("edit", "first"): 2,  # line 2's prev no longer matches line 1
    ("edit", "middle"): 4,
    ("edit", "last"): 5,  # caught by ledger.head
    ("delete", "first"): 1,  # line 1 now holds seq 1
    ("delete", "middle"): 3,
    ("delete", "last"): 4,  # the chain ends one record before ledger.head says
    ("reorder", "first"): 1,
    ("reorder", "middle"): 3,
    ("reorder", "last"): 4,  # swapped with line 4
}


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("operation", ["edit", "delete", "reorder"])
def test_changing_any_one_line_is_detected_and_the_error_names_the_line(
    ledger_dir: Path, operation: str, where: str
) -> None:
    read_ledger(ledger_dir / LEDGER_FILE)  # intact before
    change = {"edit": _edit, "delete": _delete, "reorder": _reorder}[operation]
    _write(ledger_dir, change(_lines(ledger_dir), POSITIONS[where]))
    with pytest.raises(LedgerError) as info:
        read_ledger(ledger_dir / LEDGER_FILE)
    line = EXPECTED_LINE[(operation, where)]
    assert info.value.tampered
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}:")
    assert "\n" not in str(info.value)


def test_deleting_a_line_and_renumbering_the_rest_is_still_detected(ledger_dir: Path) -> None:
    lines = _delete(_lines(ledger_dir), 2)
    renumbered = []
    for seq, line in enumerate(lines):
        record = json.loads(line)
        record["seq"] = seq
        renumbered.append(encode(record))
    _write(ledger_dir, renumbered)
    (ledger_dir / HEAD_FILE).unlink()  # the forger also removes the head
    with pytest.raises(LedgerError, match="^line 3: prev hash does not match line 2") as info:
        read_ledger(ledger_dir / LEDGER_FILE)
    assert info.value.tampered and info.value.line == 3


def test_incomplete_last_line_is_reported_not_fatal(ledger_dir: Path) -> None:
    with open(ledger_dir / LEDGER_FILE, "ab") as f:
        f.write(b'{"event":"client_trained","institution":"hosp')  # crash mid-write
    contents = read_ledger(ledger_dir / LEDGER_FILE)
    assert len(contents.records) == RECORDS
    assert contents.incomplete_tail is not None
    assert contents.incomplete_tail.startswith('{"event":"client_trained"')


def test_reopening_a_ledger_continues_the_chain(ledger_dir: Path) -> None:
    before = read_ledger(ledger_dir / LEDGER_FILE)
    record = Ledger(ledger_dir).append("run_finished", run_id="run-a", rounds_completed=4)
    assert record["seq"] == RECORDS
    assert record["prev"] == before.head_hash
    after = read_ledger(ledger_dir / LEDGER_FILE)
    assert [r["seq"] for r in after.records] == list(range(RECORDS + 1))
    assert json.loads((ledger_dir / HEAD_FILE).read_text())["seq"] == RECORDS


def test_reopening_after_a_crash_truncates_the_incomplete_tail_and_continues(
    ledger_dir: Path,
) -> None:
    with open(ledger_dir / LEDGER_FILE, "ab") as f:
        f.write(b'{"event":"client_tra')
    Ledger(ledger_dir).append("run_finished", run_id="run-a", rounds_completed=4)
    contents = read_ledger(ledger_dir / LEDGER_FILE)
    assert contents.incomplete_tail is None
    assert [r["event"] for r in contents.records][-2:] == ["client_trained", "run_finished"]
    assert [r["seq"] for r in contents.records] == list(range(RECORDS + 1))


# --- Crash windows and removal, found in review -------------------------------------------


def _two_records(tmp_path):
    from ferry.server.ledger import Ledger

    ledger = Ledger(tmp_path)
    ledger.append("run_started", run_id="r")
    ledger.append("round_aggregated", run_id="r", round=1, participants=[])
    return tmp_path / "ledger.jsonl", tmp_path / "ledger.head"


def test_unreadable_head_is_tampering_not_a_traceback(tmp_path):
    from ferry.server.ledger import LedgerError, read_ledger

    path, head = _two_records(tmp_path)
    head.write_text("not json")
    with pytest.raises(LedgerError) as err:
        read_ledger(path)
    assert err.value.tampered and "unreadable" in str(err.value)


def test_emptied_ledger_with_a_head_is_tampering_and_not_restarted(tmp_path):
    from ferry.server.ledger import Ledger, LedgerError, read_ledger

    path, head = _two_records(tmp_path)
    before = head.read_text()
    path.write_bytes(b"")
    with pytest.raises(LedgerError) as err:
        read_ledger(path)
    assert err.value.tampered
    with pytest.raises(LedgerError):
        Ledger(tmp_path)
    assert head.read_text() == before  # the evidence is kept


def test_head_one_behind_after_a_crash_is_accepted_and_repaired(tmp_path):
    import json

    from ferry.server.ledger import Ledger, read_ledger

    path, head = _two_records(tmp_path)
    stale = {"seq": 0, "sha256": read_ledger(path).records[1]["prev"]}
    head.write_text(json.dumps(stale))  # the crash: line 2 written, head not yet updated
    contents = read_ledger(path)
    assert contents.head_behind and len(contents.records) == 2
    ledger = Ledger(tmp_path)  # the server restarts
    assert json.loads(head.read_text())["seq"] == 1
    ledger.append("run_finished", run_id="r", rounds_completed=1, reason="done")
    assert not read_ledger(path).head_behind


def test_crash_during_the_first_append_does_not_block_startup(tmp_path):
    from ferry.server.ledger import Ledger, read_ledger

    (tmp_path / "ledger.jsonl").write_bytes(b'{"event":"run_sta')
    Ledger(tmp_path).append("run_started", run_id="r")
    assert [r["event"] for r in read_ledger(tmp_path / "ledger.jsonl").records] == ["run_started"]
