"""The server's round loop over a Flower Grid: ship the backbone, train, aggregate, evaluate.

Per round: sample clients; offer the backbone hash to sampled clients not yet known to hold
it and ship it (arrays + manifest + sha256) only to those that say they lack it; send the
head arrays and run config; validate replies; aggregate (FedAvg); evaluate on every client
holding the backbone; append a ``metrics.jsonl`` line and print one live line. At the end
``summary.json`` holds final metrics, per-client privacy, bytes per round and wall time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import FerryError
from common.heads import build_head
from common.privacy import UNIT_OF_PRIVACY
from common.serialization import BackboneArtifact
from server.aggregation import aggregate
from server.client_reports import ledger_trained, update_client_summary
from server.ledger import Ledger
from server.outputs import append_metrics, build_summary, write_summary
from server.validation import check_metrics, check_update


@dataclass
class FederationPlan:
    """Everything the round loop needs beyond the run config."""

    cfg: RunConfig
    artifact: BackboneArtifact
    num_classes: int
    out: Path
    client_state_root: Path
    client_cache_root: Path
    run_id: str = ""
    round_timeout: float | None = None
    log: Callable[[str], None] = print
    ledger: Ledger | None = None  # opened by run_federation in ``out``


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
class FederationState:
    arrays: dict[str, np.ndarray]
    holders: set[int] = field(default_factory=set)
    institutions: dict[int, str] = field(default_factory=dict)  # node id -> institution
    exhausted: dict[int, str] = field(default_factory=dict)  # node id -> why not selected
    clients: dict[str, dict] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


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


def _send(
    grid: Grid, plan: FederationPlan, messages: list[Message], traffic: Traffic
) -> list[Message]:
    if not messages:
        return []
    traffic.sent += sum(payload_bytes(m.content) for m in messages)
    sizes = [array_bytes(m.content) for m in messages]
    traffic.sent_arrays += sum(sizes)
    traffic.largest_message_arrays = max(traffic.largest_message_arrays, *sizes)
    replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout))
    traffic.received += sum(payload_bytes(r.content) for r in replies if r.has_content())
    traffic.received_arrays += sum(array_bytes(r.content) for r in replies if r.has_content())
    return replies


def _problem(reply: Message, *records: str) -> str | None:
    """Why a reply is unusable (an error, a refusal, missing records), or None."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    if "refusal" in reply.content:
        return f"refused: {reply.content['refusal']['reason']}"
    missing = [r for r in records if r not in reply.content]
    return f"reply lacks {missing}" if missing else None


def _run_record(plan: FederationPlan, rnd: int, **extra) -> ConfigRecord:
    return ConfigRecord(
        {
            **plan.cfg.to_record(),
            "round": rnd,
            "backbone-sha256": plan.artifact.sha256,
            "num-classes": plan.num_classes,
            "run-id": plan.run_id,
            "state-root": str(plan.client_state_root),
            "cache-root": str(plan.client_cache_root),
            **extra,
        }
    )


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
    offer = _run_record(plan, rnd, sha256=plan.artifact.sha256)
    messages = [
        Message(
            RecordDict({"run": offer}),
            dst_node_id=n,
            message_type="query.backbone_offer",
            group_id=str(rnd),
        )
        for n in unknown
    ]
    replies = _send(grid, plan, messages, traffic)
    need = []
    for reply in replies:
        node = reply.metadata.src_node_id
        problem = _problem(reply, "reply")
        if problem:
            plan.log(f"  node {node}: backbone offer failed ({problem})")
        elif reply.content["reply"]["has"]:
            state.holders.add(node)
        else:
            need.append(node)
    if not need:
        return
    backbone = array_record(plan.artifact.tensors)
    ship_cfg = _run_record(
        plan, rnd, sha256=plan.artifact.sha256, manifest=json.dumps(plan.artifact.manifest)
    )
    messages = [
        Message(
            RecordDict({"backbone": backbone, "run": ship_cfg}),
            dst_node_id=n,
            message_type="query.backbone_ship",
            group_id=str(rnd),
        )
        for n in need
    ]
    before = traffic.sent_arrays
    replies = _send(grid, plan, messages, traffic)
    traffic.backbone_sent += traffic.sent_arrays - before
    for reply in replies:
        node = reply.metadata.src_node_id
        problem = _problem(reply, "reply")
        if problem:
            plan.log(f"  node {node}: backbone not stored ({problem})")
        else:
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


def sample_nodes(node_ids: list[int], fraction: float, rng: np.random.Generator) -> list[int]:
    k = max(1, math.ceil(fraction * len(node_ids)))
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
    """Send the head to ``nodes``, log every reply in the ledger, aggregate the usable ones."""
    head = array_record(state.arrays)
    run = _run_record(plan, rnd)
    messages = [
        Message(
            RecordDict({"head": head, "run": run}),
            dst_node_id=n,
            message_type="train",
            group_id=str(rnd),
        )
        for n in nodes
        if n in state.holders
    ]
    updates, rejected, participants, refused = [], {}, [], {}
    train_loss, train_n = 0.0, 0
    for reply in _send(grid, plan, messages, traffic):
        node = reply.metadata.src_node_id
        inst = state.institutions.get(node)
        if not reply.has_error() and "refusal" in reply.content:
            refusal = reply.content["refusal"]
            kind, reason = str(refusal.get("kind", "error")), str(refusal["reason"])
            plan.ledger.append(
                "client_refused",
                run_id=plan.run_id,
                round=rnd,
                institution=inst,
                node_id=str(node),
                reason=reason,
                kind=kind,
            )
            refused[str(node)] = reason
            plan.log(f"  {inst or f'node {node}'} refused: {reason}")
            if kind == "budget":
                state.exhausted[node] = reason
            continue
        problem = _problem(reply, "head", "metrics", "privacy")
        if not problem:
            report = dict(reply.content["privacy"])
            metrics = dict(reply.content["metrics"])
            examples = int(metrics.get("num-examples", 0) or 0)
            # The client spent privacy whether or not its update is usable: log it first.
            ledger_trained(plan.ledger, plan.run_id, rnd, node, report, examples)
            inst = update_client_summary(state.clients, node, report, examples)
            state.institutions[node] = inst
            if report.get("budget-left-for-another-round") is False:
                state.exhausted[node] = f"budget spent (ε={report.get('epsilon', 0):.3f})"
                plan.log(f"  {inst} has spent its budget: not selected again")
            arrays = {k: v.numpy() for k, v in reply.content["head"].items()}
            problem = check_update(state.arrays, arrays) or check_metrics(metrics)
        if problem:
            plan.ledger.append(
                "update_rejected",
                run_id=plan.run_id,
                round=rnd,
                institution=inst,
                node_id=str(node),
                reason=problem,
            )
            rejected[str(node)] = problem
            plan.log(f"  {inst or f'node {node}'}: update rejected ({problem})")
            continue
        updates.append((arrays, float(examples)))
        participants.append(inst)
        train_loss += float(metrics["train-loss"]) * examples
        train_n += examples
    if updates:
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
        "rejected": rejected,
        "refused": refused,
        "train_loss": train_loss / max(train_n, 1),
    }


def evaluate_round(
    grid: Grid, plan: FederationPlan, state: FederationState, rnd: int, traffic: Traffic
) -> dict:
    head = array_record(state.arrays)
    run = _run_record(plan, rnd)
    messages = [
        Message(
            RecordDict({"head": head, "run": run}),
            dst_node_id=n,
            message_type="evaluate",
            group_id=str(rnd),
        )
        for n in sorted(state.holders)
    ]
    loss = correct = n_total = 0.0
    for reply in _send(grid, plan, messages, traffic):
        if _problem(reply, "metrics"):
            continue
        m = reply.content["metrics"]
        n = float(m["num-examples"])
        loss += float(m["loss"]) * n
        correct += float(m["accuracy"]) * n
        n_total += n
    if not n_total:
        return {"accuracy": float("nan"), "loss": float("nan"), "eval_examples": 0}
    return {"accuracy": correct / n_total, "loss": loss / n_total, "eval_examples": int(n_total)}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def wait_for_nodes(grid: Grid, wanted: int, log, timeout: float = 300.0) -> list[int]:
    """Node ids once ``wanted`` clients are connected (or those present at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not node_ids:
        raise FerryError(f"no clients connected within {timeout:.0f}s")
    if len(node_ids) < wanted:
        log(f"only {len(node_ids)} of {wanted} clients connected; continuing with them")
    return node_ids


def run_federation(grid: Grid, plan: FederationPlan) -> dict:
    """Run the rounds; return (and write) the summary. Every event goes to the ledger."""
    cfg = plan.cfg
    started = time.perf_counter()
    plan.ledger = plan.ledger or Ledger(plan.out)
    plan.ledger.append(
        "run_started",
        run_id=plan.run_id,
        config=cfg.to_record(),
        backbone_sha256=plan.artifact.sha256,
        privacy={"unit": UNIT_OF_PRIVACY, "accountant": "prv", "delta": cfg.delta},
    )
    node_ids = wait_for_nodes(grid, plan.cfg.clients, plan.log)
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, int(plan.artifact.manifest["feature_dim"]), plan.num_classes)
    state = FederationState({k: v.detach().numpy().copy() for k, v in head.state_dict().items()})
    rng = np.random.default_rng(cfg.seed)
    end_reason = f"all {cfg.rounds} rounds completed"
    for rnd in range(1, cfg.rounds + 1):
        eligible = [n for n in node_ids if n not in state.exhausted]
        if len(eligible) < cfg.min_clients:
            end_reason = (
                f"stopped before round {rnd}: {len(eligible)} institution(s) with budget left, "
                f"fewer than --min-clients {cfg.min_clients}"
            )
            plan.log(end_reason)
            break
        t0 = time.perf_counter()
        traffic = Traffic()
        nodes = sample_nodes(eligible, cfg.fraction_train, rng)
        ensure_backbone(grid, plan, state, nodes, rnd, traffic)
        trained = train_round(grid, plan, state, nodes, rnd, traffic)
        if not trained["participants"]:
            problems = {**trained["rejected"], **trained["refused"]}
            if problems and all(n in state.exhausted for n in map(int, problems)):
                end_reason = f"stopped in round {rnd}: every sampled institution's budget is spent"
                plan.log(end_reason)
                break
            reasons = "; ".join(sorted(set(problems.values()))) or "no replies"
            plan.ledger.append(
                "run_finished",
                run_id=plan.run_id,
                rounds_completed=len(state.rounds),
                reason=f"failed in round {rnd}: {reasons}",
            )
            raise FerryError(f"round {rnd}: no client returned a usable update ({reasons})")
        evaluated = evaluate_round(grid, plan, state, rnd, traffic)
        eps = [c["epsilon"] for c in state.clients.values()]
        record = {
            "round": rnd,
            **evaluated,
            **trained,
            "sampled": len(nodes),
            "max_epsilon": max(eps) if eps else 0.0,
            "bytes": traffic.as_dict(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        state.rounds.append(record)
        append_metrics(plan.out, record)
        backbone = (
            f" (backbone {_fmt_bytes(traffic.backbone_sent)})" if traffic.backbone_sent else ""
        )
        plan.log(
            f"round {rnd}/{cfg.rounds}  acc {evaluated['accuracy']:.3f}"
            f"  loss {evaluated['loss']:.3f}"
            f"  max ε {record['max_epsilon']:.2f}  clients {trained['participants']}/{len(nodes)}"
            f"  sent {_fmt_bytes(traffic.sent)}{backbone}  received {_fmt_bytes(traffic.received)}"
            f"  {record['seconds']:.1f}s"
        )
    plan.ledger.append(
        "run_finished", run_id=plan.run_id, rounds_completed=len(state.rounds), reason=end_reason
    )
    summary = build_summary(plan, state, end_reason, time.perf_counter() - started)
    write_summary(plan.out, summary)
    return summary
