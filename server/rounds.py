"""One round's exchanges with the clients: backbone offer and shipping, training (with
validation and aggregation), evaluation.

Every exchange waits at most the plan's ``round_timeout``; a client that has not answered by
then, or whose node went offline, is dropped from the rest of the round and a
``client_dropped`` ledger record (with the stage) says so.

Every reply is parsed once, here, by its codec (:mod:`common.messages`,
:mod:`common.train_reply`). A reply that does not parse, a refusal without a readable reason
included, is an ``update_rejected`` record (``evaluation_rejected`` for an evaluation) with the
reason and one log line, and the round goes on: no reply can raise out of a round.

Identity: where institutions are registered (``plan.node_names``, deployment) an institution
is its node's registered name, never the name a reply gives; a reply naming another is
rejected, and a node that is not registered is never sampled (``node_refused``). In
simulation and insecure trials (no registration) the name a report gives is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ferry.common.evaluation_statistics import pool_statistics
from ferry.common.messages import (
    EvaluationReply,
    MessageRejected,
    Refusal,
    RoundRequest,
    TrainRequest,
    clipped,
)
from ferry.common.metrics import metrics_from_statistics
from ferry.common.train_reply import ModelUpdate, PrivacyReply, TrainExpectation
from ferry.server.aggregation import (
    AggregationPolicy,
    TooFewUpdates,
    capped_statistics,
    capped_weights,
)
from ferry.server.client_reports import ledger_trained, update_client_summary
from ferry.server.exchange import Traffic, array_record, exchange, waiting_note
from ferry.server.plan import FederationPlan, FederationState


def _problem(reply: Message, *records: str) -> str | None:
    """Why a backbone reply is unusable (an error, a refusal, missing records), or None."""
    if reply.has_error():
        return f"client error: {clipped(reply.error.reason, 300)}"
    if "refusal" in reply.content:
        try:
            return f"refused: {Refusal.from_content(reply.content).reason}"
        except MessageRejected as exc:
            return f"refused unreadably ({exc})"
    missing = [r for r in records if r not in reply.content]
    return f"reply lacks {missing}" if missing else None


def round_request(plan: FederationPlan, rnd: int) -> RoundRequest:
    """What every institution is asked in round ``rnd`` (:class:`RoundRequest`)."""
    where = (str(plan.client_state_root or ""), str(plan.client_cache_root or ""))
    simulated = (*where, plan.institution_names)  # the virtual institutions' roots and names
    return RoundRequest(
        plan.cfg, rnd, plan.artifact.sha256, plan.num_classes, plan.run_id, *simulated
    )


def _run_record(plan: FederationPlan, rnd: int, **extra) -> ConfigRecord:
    return ConfigRecord(round_request(plan, rnd).to_record(**extra))


def institution_name(plan: FederationPlan, state: FederationState, node: int) -> str | None:
    """The node's registered name, else (no registration) the name its reports gave."""
    return plan.node_names.get(node) or state.institutions.get(node)


def registered_nodes(plan: FederationPlan, node_ids: Iterable[int], rnd: int) -> list[int]:
    """The nodes that may take part in round ``rnd``: where institutions are registered, only
    theirs (a key registered in the SuperLink's database but no longer in the server's
    configuration is not one); each other node gets a ``node_refused`` record and a log line."""
    node_ids = sorted(node_ids)
    if not plan.node_names:
        return node_ids
    for node in (n for n in node_ids if n not in plan.node_names):
        reason = "not a registered institution of this run"
        plan.ledger.append(
            "node_refused", run_id=plan.run_id, round=rnd, node_id=str(node), reason=reason
        )
        plan.log(f"  node {node} refused in round {rnd}: {reason}")
    return [n for n in node_ids if n in plan.node_names]


def _messages(nodes: Iterable[int], content: RecordDict, kind: str, rnd: int) -> list[Message]:
    return [Message(content, dst_node_id=n, message_type=kind, group_id=str(rnd)) for n in nodes]


def _exchange(
    grid: Grid,
    plan: FederationPlan,
    state: FederationState,
    messages: list[Message],
    rnd: int,
    stage: str,
    traffic: Traffic,
) -> list[tuple[int, Message]]:
    """One exchange; stragglers and unreachable nodes are dropped from the round, in the
    ledger (``client_dropped``) and the log."""

    note = waiting_note(plan.log, rnd, stage)
    result = exchange(grid, messages, traffic, plan.round_timeout, note)
    lost = {
        n: f"no reply within the round timeout ({plan.round_timeout:g}s)" for n in result.stragglers
    }
    lost.update({n: f"unavailable: {clipped(why, 300)}" for n, why in result.unavailable.items()})
    for node, reason in lost.items():
        state.dropped[node] = reason
        inst = institution_name(plan, state, node)
        _client_event(
            plan,
            "client_dropped",
            rnd,
            node,
            inst,
            f"dropped from round {rnd} ({stage}: {reason})",
            stage=stage,
            reason=reason,
        )
    return result.replies


def _client_event(
    plan: FederationPlan,
    event: str,
    rnd: int,
    node: int,
    inst: str | None,
    line: str,
    **fields: object,
) -> None:
    """One ledger record about one client in one round, and one log line saying it."""
    plan.ledger.append(
        event, run_id=plan.run_id, round=rnd, institution=inst, node_id=str(node), **fields
    )
    plan.log(f"  {inst or f'node {node}'} {line}")


def ensure_backbone(
    grid: Grid,
    plan: FederationPlan,
    state: FederationState,
    nodes: Iterable[int],
    rnd: int,
    traffic: Traffic,
) -> None:
    """First contact: ship the backbone to sampled nodes that do not hold its hash."""
    unknown = [n for n in nodes if n not in state.holders]
    offer = RecordDict({"run": _run_record(plan, rnd, sha256=plan.artifact.sha256)})
    need = []
    messages = _messages(unknown, offer, "query.backbone_offer", rnd)
    for node, reply in _exchange(grid, plan, state, messages, rnd, "backbone offer", traffic):
        problem = _problem(reply, "reply")
        if problem:
            plan.log(f"  node {node}: backbone offer failed ({problem})")
        elif reply.content["reply"].get("has") is True:
            state.holders.add(node)
        else:
            need.append(node)
    if not need:
        return
    ship_cfg = _run_record(
        plan, rnd, sha256=plan.artifact.sha256, manifest=json.dumps(plan.artifact.manifest)
    )
    content = RecordDict({"backbone": array_record(plan.artifact.tensors), "run": ship_cfg})
    before = traffic.sent_arrays
    mb, sha = plan.artifact.nbytes / 1e6, plan.artifact.sha256[:12]
    plan.log(f"  round {rnd}: shipping the backbone ({mb:.1f} MB, {sha}) to {len(need)} node(s)")
    messages = _messages(need, content, "query.backbone_ship", rnd)
    replies = _exchange(grid, plan, state, messages, rnd, "backbone shipping", traffic)
    traffic.backbone_sent += traffic.sent_arrays - before
    for node, reply in replies:
        problem = _problem(reply, "reply")
        if problem:
            plan.log(f"  node {node}: backbone not stored ({problem})")
            continue
        state.holders.add(node)
        traffic.backbones_shipped += 1
        plan.ledger.append(
            "backbone_shipped",
            run_id=plan.run_id,
            round=rnd,
            node_id=str(node),
            backbone_sha256=plan.artifact.sha256,
            bytes=plan.artifact.nbytes,
        )


def sample_nodes(
    node_ids: list[int], fraction: float, rng: np.random.Generator, at_least: int = 1
) -> list[int]:
    k = min(len(node_ids), max(at_least, math.ceil(fraction * len(node_ids))))
    # Sample positions, not ids: node ids are 64-bit and numpy would turn them into floats.
    return sorted(node_ids[i] for i in rng.choice(len(node_ids), size=k, replace=False))


def train_round(
    grid: Grid,
    plan: FederationPlan,
    state: FederationState,
    nodes: list[int],
    rnd: int,
    traffic: Traffic,
) -> dict:
    """Send the trainable arrays to ``nodes``, log every reply in the ledger, aggregate the
    usable ones with the plan's :class:`~server.aggregation.RoundAggregation` (by default
    :func:`server.aggregation.aggregate_updates` under the run's policy) if there are at
    least ``min_clients`` of them and the rule has enough (``round_aggregated`` with the
    rule's weights, bound, clipped updates and any post-aggregation steps; else nothing is
    aggregated, ``aggregated`` is False and ``failed`` says why)."""
    request = round_request(plan, rnd)
    content = TrainRequest(request, state.arrays).to_content()
    messages = _messages([n for n in nodes if n in state.holders], content, "train", rnd)
    updates, rejected, refused = [], {}, {}
    for node, reply in _exchange(grid, plan, state, messages, rnd, "train", traffic):
        expected = TrainExpectation(request, state.arrays, plan.node_names.get(node))
        try:
            update = _trained(plan, state, node, reply, expected, updates, refused)
        except MessageRejected as exc:
            inst = institution_name(plan, state, node)
            reason = str(exc)
            _client_event(
                plan,
                "update_rejected",
                rnd,
                node,
                inst,
                f"update rejected ({reason})",
                stage="train",
                reason=reason,
            )
            rejected[str(node)] = reason
            continue
        if update is not None:
            updates.append(update)
    aggregated, failed = len(updates) >= plan.cfg.min_clients, None
    if aggregated:
        try:
            result = plan.aggregation(state.arrays, updates, rnd)
        except TooFewUpdates as exc:
            aggregated, failed = False, str(exc)
            plan.log(f"  round {rnd}: {exc}")
        else:
            state.arrays = result.arrays
            for name, norm in result.clipped.items():
                plan.log(f"  {name}'s update clipped (norm {norm:.3g} > {result.norm_bound:.3g})")
            plan.ledger.append(
                "round_aggregated",
                run_id=plan.run_id,
                round=rnd,
                participants=[name for name, _, _ in updates],
                payload_bytes={"sent": traffic.sent, "received": traffic.received},
                **result.ledger_fields(),
            )
    return {
        "participants": len(updates),
        "aggregated": aggregated,
        "rejected": rejected,
        "refused": refused,
        "dropped": {str(n): why for n, why in state.dropped.items()},
        **({"failed": failed} if failed else {}),
    }


def _trained(
    plan: FederationPlan,
    state: FederationState,
    node: int,
    reply: Message,
    expected: TrainExpectation,
    updates: list,
    refused: dict,
) -> tuple[str, dict[str, np.ndarray], float] | None:
    """One train reply, parsed and logged: (institution, arrays, examples) for aggregation,
    None for a refusal, or :class:`MessageRejected`. A well-formed privacy report is ledgered
    (``client_trained``) even when the update beside it is rejected: that spend is real."""
    rnd = expected.request.round
    if reply.has_error():
        raise MessageRejected(f"client error: {clipped(reply.error.reason, 300)}")
    if "refusal" in reply.content:
        try:
            refusal = Refusal.from_content(reply.content)
        except MessageRejected as exc:
            raise MessageRejected(f"unreadable refusal: {exc}") from None
        inst = institution_name(plan, state, node)
        _client_event(
            plan,
            "client_refused",
            rnd,
            node,
            inst,
            f"refused: {refusal.reason}",
            reason=refusal.reason,
            kind=refusal.kind,
        )
        refused[str(node)] = refusal.reason
        if refusal.kind == "budget":  # it is not asked again; nobody else is affected
            state.exhausted[node] = refusal.reason
        return None
    privacy = PrivacyReply.from_content(reply.content, expected)
    inst = expected.institution or privacy.report.institution
    if any(name == inst for name, _, _ in updates):
        raise MessageRejected(f"a second reply for institution {inst!r} in this round")
    ledger_trained(plan.ledger, plan.run_id, rnd, node, inst, privacy)
    update_client_summary(state.clients, node, inst, privacy)
    state.institutions[node] = inst
    if not privacy.budget_left:
        state.exhausted[node] = f"budget spent (ε={privacy.report.epsilon or 0:.3f})"
        if rnd < plan.cfg.rounds:  # after the last round it is no news
            plan.log(f"  {inst} has spent its budget: not selected again")
    update = ModelUpdate.from_content(reply.content, expected, privacy.report.examples)
    return inst, update.arrays, float(update.num_examples)


def evaluate_round(
    grid: Grid,
    plan: FederationPlan,
    state: FederationState,
    rnd: int,
    traffic: Traffic,
    online: Iterable[int] | None = None,
) -> dict:
    """Federated evaluation on every online holder not dropped from this round.

    Each institution releases the sufficient statistics of its held-out split
    (:mod:`common.metrics`); the federation's metrics are those of the pooled statistics,
    each institution's counted at most ``weight_cap`` x the median institution's count
    (:func:`server.aggregation.capped_statistics`: one claiming 1e9 examples cannot decide
    them), and ``per_institution`` holds each institution's own. A reply that does not parse
    is an ``evaluation_rejected`` record and a log line; a refusal is a log line."""
    online = set(state.holders if online is None else online)
    nodes = sorted(n for n in state.holders if n in online and n not in state.dropped)
    request = round_request(plan, rnd)
    content = TrainRequest(request, state.arrays).to_content()
    parts, per_institution = {}, {}
    messages = _messages(nodes, content, "evaluate", rnd)
    for node, reply in _exchange(grid, plan, state, messages, rnd, "evaluate", traffic):
        inst = institution_name(plan, state, node) or f"node {node}"
        try:
            if reply.has_error():
                raise MessageRejected(f"client error: {clipped(reply.error.reason, 300)}")
            if "refusal" in reply.content:
                plan.log(
                    f"  {inst} evaluation refused ({Refusal.from_content(reply.content).reason})"
                )
                continue
            stats = EvaluationReply.from_content(
                reply.content, request.task, plan.num_classes
            ).statistics
            if inst in parts:
                raise MessageRejected(f"a second evaluation for {inst!r} in this round")
        except MessageRejected as exc:
            reason = str(exc)
            _client_event(
                plan,
                "evaluation_rejected",
                rnd,
                node,
                inst,
                f"evaluation rejected ({reason})",
                stage="evaluate",
                reason=reason,
            )
            continue
        parts[inst] = stats
        per_institution[inst] = {
            **_underscored(metrics_from_statistics(stats)),
            "eval_examples": stats.num_examples,
        }
    cap = AggregationPolicy.from_config(plan.cfg).weight_cap
    pooled = pool_statistics(list(capped_statistics(parts, cap).values()))
    if pooled is None or not pooled.num_examples:
        return {"loss": float("nan"), "eval_examples": 0, "per_institution": per_institution}
    counted = {k: float(s.num_examples) for k, s in parts.items() if s.num_examples}
    return {
        **_underscored(metrics_from_statistics(pooled)),
        "eval_examples": round(sum(capped_weights(counted, cap).values())),
        "per_institution": per_institution,
    }


def _underscored(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("-", "_"): v for k, v in metrics.items()}
