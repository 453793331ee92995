"""What the server does with clients' privacy reports: ledger records, per-client summary,
and the budget policy (institutions whose budget is spent are not selected again)."""

from __future__ import annotations

import math

from common.privacy.accounting import MechanismSegment
from common.privacy.dp_events import event_to_json, segment_event
from common.privacy.report import REPLY_BODY, REPLY_SIGNATURE
from server.ledger import Ledger


def _num(value: object, default: float | None = None) -> float | None:
    """A finite float, or ``default`` for a missing or malformed value (ledger JSON holds no
    NaN or infinity)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def ledger_trained(
    ledger: Ledger, run_id: str, rnd: int, node: int, report: dict, examples: int
) -> dict:
    """Append a ``client_trained`` record describing the mechanism the client ran.

    ``signed_report`` holds the institution's signed report exactly as it arrived (body text
    and signature, :mod:`common.privacy.report`), or None when the reply carried none; it is
    what ``ferry audit`` checks and replays. The other fields are the server's unsigned copy
    (for summaries); where they contradict the signed report, the audit flags it."""
    body, signature = report.get(REPLY_BODY), report.get(REPLY_SIGNATURE)
    signed = (
        {"body": body, "signature": signature}
        if isinstance(body, str) and isinstance(signature, str)
        else None
    )
    sigma, q, steps = (
        _num(report.get("noise-multiplier"), 0.0),
        _num(report.get("sample-rate"), 1.0),
        int(_num(report.get("steps"), 0)),
    )
    private = not report.get("non-private", False) and sigma > 0
    return ledger.append(
        "client_trained",
        run_id=run_id,
        round=rnd,
        institution=str(report.get("institution", node)),
        node_id=str(node),
        dp_event=event_to_json(segment_event(MechanismSegment(sigma, q, steps)))
        if private
        else {"module_name": "dp_accounting.dp_event", "class_name": "NonPrivateDpEvent"},
        sampling=str(report.get("sampling", "unknown")),
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=_num(report.get("max-grad-norm")),
        delta=_num(report.get("delta")),
        accountant=str(report.get("accountant", "")),
        accountant_library=str(report.get("accountant-library", "")),
        epsilon_reported=_num(report.get("epsilon")) if private else None,
        client_rounds=int(_num(report.get("rounds"), 0)),
        budget_epsilon=_num(report["budget-epsilon"]) if "budget-epsilon" in report else None,
        budget_delta=_num(report["budget-delta"]) if "budget-delta" in report else None,
        examples=examples,
        signed_report=signed,
    )


def update_client_summary(clients: dict, node: int, report: dict, examples: int) -> str:
    """Fold one round's report into ``summary.json``'s per-institution entry."""
    inst = str(report.get("institution", node))
    client = clients.setdefault(inst, {"node_id": node, "rounds": 0, "steps": 0})
    client.update(
        rounds=client["rounds"] + 1,
        examples=examples,
        epsilon=_num(report.get("epsilon"), math.inf),
        delta=_num(report.get("delta")),
        noise_multiplier=_num(report.get("noise-multiplier"), 0.0),
        sample_rate=_num(report.get("sample-rate"), 1.0),
        max_grad_norm=_num(report.get("max-grad-norm")),
        steps=client["steps"] + int(_num(report.get("steps"), 0)),
        accountant=str(report.get("accountant", "")),
        client_reported_rounds=int(_num(report.get("rounds"), 0)),
        budget_epsilon=_num(report.get("budget-epsilon")) if "budget-epsilon" in report else None,
    )
    return inst
