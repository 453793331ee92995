"""``ferry audit``'s result: per-institution findings, the verdict line and the JSON report.

:class:`AuditReport` is what :func:`server.audit.audit_ledger` fills in; :meth:`AuditReport.verdict`
and :meth:`AuditReport.to_json` are the two forms the command prints (the table and the plot are
:mod:`server.audit_render`'s). A verdict says what the audit could not see, so that a PASS never
claims more than it checked.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ferry.server.audit_checks import TOLERANCE, InstitutionAudit
from ferry.server.audit_replay import replay_description

# What a verdict says the audit could not see, so that a PASS never claims more than it checked.
SELF_CONSISTENT = (
    "signatures are self-consistent; the keys were found in the run directory written by the "
    "operator, so they do not show who signed: give --keys from the institutions for an "
    "independent check"
)
NO_RECEIPTS = (
    "a report dropped from the end of an institution's chain, or an institution left out "
    "entirely, is visible only with --receipts"
)


@dataclass
class AuditReport:
    ledger: Path
    records: int = 0
    head_hash: str = ""
    institutions: list[InstitutionAudit] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    tampered: str | None = None  # the one-line reason the chain is not trusted
    signatures: str = ""  # which keys verified the reports
    keyless: str | None = None  # why no signature could be verified at all
    keys_in_run: bool = False  # the keys came from the run directory, not from --keys
    not_checked: list[str] = field(default_factory=list)  # what only --receipts would show
    receipts_checked: list[str] = field(default_factory=list)  # institutions cross-checked
    tolerance: float = TOLERANCE

    @property
    def violations(self) -> Counter:
        return Counter(f for inst in self.institutions for f in inst.flags)

    @property
    def ok(self) -> bool:
        return self.tampered is None and self.keyless is None and not self.violations

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def verdict(self) -> str:
        if self.tampered:
            return f"FAIL: ledger chain broken: {self.tampered}"
        if self.keyless:
            return f"FAIL: {self.keyless}"
        n = len(self.institutions)
        if self.violations:
            bad = sum(1 for inst in self.institutions if inst.flags)
            kinds = ", ".join(f"{k} ({c})" for k, c in self.violations.most_common())
            return f"FAIL: {bad} of {n} institutions in violation: {kinds}"
        partial = sum(1 for inst in self.institutions if inst.partial)
        signed = "" if self.keys_in_run else "signatures verified with the given keys, "
        receipts = (
            f", receipts of {len(self.receipts_checked)} institution(s) match the ledger"
            if self.receipts_checked
            else ""
        )
        return (
            f"PASS: chain intact ({self.records} records), {signed}"
            f"{n} institutions replayed, no violation{receipts}"
            + (f" ({partial} partial: earlier history not in this ledger)" if partial else "")
            + "".join(f"; {c}" for c in self.caveats())
        )

    def caveats(self) -> list[str]:
        """What a PASS does not show: who signed (keys from the run), and what only the
        institutions' receipts would show."""
        return ([SELF_CONSISTENT] if self.keys_in_run else []) + [
            f"not checked: {n}" for n in self.not_checked
        ]

    def to_json(self) -> dict:
        def num(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None  # JSON has no inf/nan

        return {
            "ledger": str(self.ledger),
            "records": self.records,
            "chain": "broken" if self.tampered else "intact",
            "tampered": self.tampered,
            "signatures": self.signatures,
            "keys": "found in the run directory" if self.keys_in_run else "given (--keys)",
            "signature_check": SELF_CONSISTENT
            if self.keys_in_run
            else "independent: verified with the keys the auditor gave",
            "receipts_checked": self.receipts_checked,
            "not_checked": self.not_checked,
            "keyless": self.keyless,
            "events": dict(self.events),
            "replay": replay_description(),
            "tolerance": TOLERANCE,
            "warnings": self.warnings,
            "institutions": [
                {
                    "institution": i.institution,
                    "rounds": i.rounds,
                    "steps": i.steps,
                    "epsilon_reported": num(i.epsilon_reported),
                    "epsilon_replayed_pld": num(i.epsilon_replayed),
                    "epsilon_rdp": num(i.epsilon_rdp),
                    "budget_epsilon": i.budget_epsilon,
                    "budget_delta": i.budget_delta,
                    "delta": i.delta,
                    "partial": i.partial,
                    "status": i.status,
                    "flags": i.flags,
                    "details": i.details,
                    "pld_interval": num(i.pld_interval),
                }
                for i in self.institutions
            ],
            "violations": dict(self.violations),
            "verdict": self.verdict(),
            "exit_code": self.exit_code,
        }
