"""One round's exchanges with the clients: backbone offer and shipping, training (with
validation and aggregation), evaluation.

Every exchange waits at most the plan's ``round_timeout``; a client that has not answered by
then, or whose node went offline, is dropped from the rest of the round and a
``client_dropped`` ledger record (with the stage) says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.metrics import metrics_from_statistics, pool_statistics, statistics_from_record
from server.aggregation import aggregate
from server.client_reports import ledger_trained, update_client_summary
from server.exchange import Traffic, array_record, exchange
from server.plan import FederationPlan, FederationState
from server.validation import check_metrics, check_update


def _problem(reply: Message, *records: str) -> str | None:
    """Why a reply is unusable (an error, a refusal, missing records), or None."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    if "refusal" in reply.content:
        return f"refused: {reply.content['refusal']['reason']}"
    missing = [r for r in records if r not in reply.content]
    return f"reply lacks {missing}" if missing else None


def _run_record(plan: FederationPlan, rnd: int, **extra) -> ConfigRecord:
    roots = {
        k: str(v)
        for k, v in (("state-root", plan.client_state_root), ("cache-root", plan.client_cache_root))
        if v is not None
    }
    return ConfigRecord(
        {
            **plan.cfg.to_record(),
            "round": rnd,
            "backbone-sha256": plan.artifact.sha256,
            "num-classes": plan.num_classes,
            "run-id": plan.run_id,
            **roots,
            **extra,
        }
    )


def institution_name(plan: FederationPlan, state: FederationState, node: int) -> str | None:
    return state.institutions.get(node) or plan.node_names.get(node)


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
    result = exchange(grid, messages, traffic, plan.round_timeout)
    lost = {
        n: f"no reply within the round timeout ({plan.round_timeout:g}s)" for n in result.stragglers
    }
    lost.update({n: f"unavailable: {why}" for n, why in result.unavailable.items()})
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
        elif reply.content["reply"]["has"]:
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
    """Send the head to ``nodes``, log every reply in the ledger, aggregate the usable ones
    if there are at least ``min_clients`` of them (``round_aggregated``; else nothing is
    aggregated and ``aggregated`` is False)."""
    content = RecordDict({"head": array_record(state.arrays), "run": _run_record(plan, rnd)})
    messages = _messages([n for n in nodes if n in state.holders], content, "train", rnd)
    updates, rejected, participants, refused = [], {}, [], {}
    for node, reply in _exchange(grid, plan, state, messages, rnd, "train", traffic):
        inst = institution_name(plan, state, node)
        if not reply.has_error() and "refusal" in reply.content:
            refusal = reply.content["refusal"]
            kind, reason = str(refusal.get("kind", "error")), str(refusal["reason"])
            _client_event(
                plan,
                "client_refused",
                rnd,
                node,
                inst,
                f"refused: {reason}",
                reason=reason,
                kind=kind,
            )
            refused[str(node)] = reason
            if kind == "budget":
                state.exhausted[node] = reason
            continue
        problem = _problem(reply, "head", "metrics", "privacy")
        if not problem:
            report = dict(reply.content["privacy"])
            metrics = dict(reply.content["metrics"])
            # A hostile count (inf, NaN, a string) is 0 here and rejects the update below; it
            # must never stop the round.
            examples = 0 if check_metrics(metrics) else int(metrics["num-examples"])
            # The client spent privacy whether or not its update is usable: log it first.
            ledger_trained(plan.ledger, plan.run_id, rnd, node, report, examples)
            inst = update_client_summary(state.clients, node, report, examples)
            state.institutions[node] = inst
            if report.get("budget-left-for-another-round") is False:
                state.exhausted[node] = f"budget spent (ε={report.get('epsilon', 0):.3f})"
                if rnd < plan.cfg.rounds:  # after the last round it is no news
                    plan.log(f"  {inst} has spent its budget: not selected again")
            arrays = {k: v.numpy() for k, v in reply.content["head"].items()}
            problem = check_update(state.arrays, arrays) or check_metrics(metrics)
        if problem:
            _client_event(
                plan,
                "update_rejected",
                rnd,
                node,
                inst,
                f"update rejected ({problem})",
                reason=problem,
            )
            rejected[str(node)] = problem
            continue
        updates.append((arrays, float(examples)))
        participants.append(inst)
    aggregated = len(updates) >= plan.cfg.min_clients
    if aggregated:
        state.arrays = aggregate("fedavg", updates)
        plan.ledger.append(
            "round_aggregated",
            run_id=plan.run_id,
            round=rnd,
            participants=participants,
            payload_bytes={"sent": traffic.sent, "received": traffic.received},
        )
    return {
        "participants": len(updates),
        "aggregated": aggregated,
        "rejected": rejected,
        "refused": refused,
        "dropped": {str(n): why for n, why in state.dropped.items()},
    }


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
    (:mod:`common.metrics`); the federation's metrics are those of the pooled statistics, as
    if computed on the pooled held-out set, and ``per_institution`` holds each institution's
    own. A reply whose statistics do not add up is left out, and the log says why."""
    online = set(state.holders if online is None else online)
    nodes = sorted(n for n in state.holders if n in online and n not in state.dropped)
    content = RecordDict({"head": array_record(state.arrays), "run": _run_record(plan, rnd)})
    task = "regression" if plan.cfg.task == "regression" else "classification"
    parts, per_institution = [], {}
    messages = _messages(nodes, content, "evaluate", rnd)
    for node, reply in _exchange(grid, plan, state, messages, rnd, "evaluate", traffic):
        if _problem(reply, "metrics"):
            continue
        inst = institution_name(plan, state, node) or f"node {node}"
        try:
            stats = statistics_from_record(dict(reply.content["metrics"]), task, plan.num_classes)
        except ValueError as exc:
            plan.log(f"  {inst} evaluation left out ({exc})")
            continue
        parts.append(stats)
        per_institution[inst] = {
            **_underscored(metrics_from_statistics(stats)),
            "eval_examples": stats.num_examples,
        }
    pooled = pool_statistics(parts)
    if pooled is None or not pooled.num_examples:
        return {"loss": float("nan"), "eval_examples": 0, "per_institution": per_institution}
    return {
        **_underscored(metrics_from_statistics(pooled)),
        "eval_examples": pooled.num_examples,
        "per_institution": per_institution,
    }


def _underscored(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("-", "_"): v for k, v in metrics.items()}
