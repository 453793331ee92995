"""What the server does with clients' privacy reports: ledger records, per-client summary,
and the budget policy (institutions whose budget is spent are not selected again).

Both take a parsed :class:`~common.train_reply.PrivacyReply` (checked where it arrived,
:mod:`server.rounds`) and the institution's name as the server knows it: the node's
registered name in deployment, never one a reply chose for itself."""

from __future__ import annotations

import math

from ferry.common.train_reply import PrivacyReply
from ferry.server.ledger import Ledger


def ledger_trained(
    ledger: Ledger, run_id: str, rnd: int, node: int, institution: str, privacy: PrivacyReply
) -> dict:
    """Append a ``client_trained`` record describing the mechanism the client ran.

    ``signed_report`` holds the institution's signed report exactly as it arrived (body text
    and signature, :mod:`common.privacy.report`); it is what ``ferry audit`` checks and
    replays. The other fields are the values of that body, as the server parsed them: the
    spent ε is ``epsilon_spent`` (records before the rename: ``epsilon_reported``), the
    budget ε ``budget_epsilon``; the run's target ε is in ``run_started``'s config."""
    r = privacy.report
    return ledger.append(
        "client_trained",
        run_id=run_id,
        round=rnd,
        institution=institution,
        node_id=str(node),
        dp_event=r.dp_event,
        sampling=r.sampling,
        noise_multiplier=r.noise_multiplier,
        sample_rate=r.sample_rate,
        steps=r.steps,
        max_grad_norm=r.max_grad_norm,
        delta=r.delta,
        accountant=r.accountant,
        accountant_library=r.accountant_library,
        epsilon_spent=None if r.non_private else r.epsilon,
        client_rounds=r.client_rounds,
        budget_epsilon=r.budget_epsilon,
        budget_delta=r.budget_delta,
        examples=r.examples,
        signed_report=privacy.signed.to_json(),
    )


def update_client_summary(
    clients: dict, node: int, institution: str, privacy: PrivacyReply
) -> None:
    """Fold one round's report into ``summary.json``'s entry for ``institution``."""
    r = privacy.report
    client = clients.setdefault(institution, {"node_id": node, "rounds": 0, "steps": 0})
    client.update(
        rounds=client["rounds"] + 1,
        examples=r.examples,
        epsilon=math.inf if r.epsilon is None else r.epsilon,
        delta=r.delta,
        noise_multiplier=r.noise_multiplier,
        sample_rate=r.sample_rate,
        max_grad_norm=r.max_grad_norm,
        steps=client["steps"] + r.steps,
        accountant=r.accountant,
        client_reported_rounds=r.client_rounds,
        budget_epsilon=r.budget_epsilon,
    )
