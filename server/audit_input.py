"""``ferry audit``'s input: the ledger file a path names, read and its chain verified.

A path that is not a ledger (missing, or some other JSON Lines) is an :class:`AuditInputError`
(exit 2); a ledger whose chain or head does not verify is a report marked ``tampered`` (exit 1),
never an input error, so that deleting a ledger cannot turn a failed audit into a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.server.audit_report import AuditReport
from ferry.server.ledger import HEAD_FILE, LEDGER_FILE, LedgerError, read_ledger


class AuditInputError(FerryError):
    """The input is not a ledger the audit can read (exit code 2)."""


def ledger_file(path: Path) -> Path:
    """The ledger a path names (a run directory, or the file); AuditInputError if none."""
    if path.is_dir():
        path = path / LEDGER_FILE
    if not path.exists():
        if path.with_name(HEAD_FILE).exists() and path.name == LEDGER_FILE:
            return path  # the head says records existed: read_ledger's error is tampering
        raise AuditInputError(
            f"{path} does not exist: give a run directory holding {LEDGER_FILE}, or the file"
        )
    return path


def _not_a_ledger(path: Path) -> bool:
    """True when line 1 is a JSON object without the chain's fields (some other JSON Lines)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "seq" not in first and "prev" not in first


def read_verified(report: AuditReport, ledger: Path) -> list[dict] | None:
    """The verified chain's records, or None when the report says why there are none."""
    head = ledger.with_name(HEAD_FILE)
    try:
        contents = read_ledger(ledger)
    except LedgerError as exc:
        if head.exists() and not ledger.exists():
            report.tampered = f"{ledger.name} is missing but {HEAD_FILE} records a chain"
        elif head.exists() and ledger.is_file() and not ledger.stat().st_size:
            report.tampered = f"{ledger.name} is empty but {HEAD_FILE} records a chain"
        elif exc.tampered and not (exc.line == 1 and _not_a_ledger(ledger)):
            report.tampered = str(exc)
        else:
            raise AuditInputError(str(exc)) from None
        return None
    except (ValueError, AttributeError, OSError) as exc:  # read_ledger leaves a bad head raw
        report.tampered = f"{HEAD_FILE} is unreadable ({exc}): the last record cannot be verified"
        return None
    report.records, report.head_hash = len(contents.records), contents.head_hash
    if contents.head_behind:
        report.warnings.append(
            f"{HEAD_FILE} is one record behind line {report.records}: the server stopped "
            "between writing that record and updating the head (or the line was appended "
            "afterwards); the chain up to it verifies"
        )
    if contents.incomplete_tail is not None:
        report.warnings.append(
            f"line {report.records + 1} is incomplete (a crash mid-write?) and was ignored: "
            f"{contents.incomplete_tail[:60]!r}"
        )
    return contents.records
