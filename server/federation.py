"""The server's round loop over a Flower Grid: ship the backbone, train, aggregate, evaluate.

Per round: sample online clients that still have budget (where institutions are registered,
only their nodes: :func:`server.rounds.registered_nodes`); offer the backbone hash to sampled
clients not yet known to hold it and ship it (arrays + manifest + sha256) only to those that
say they lack it; send the head arrays and run config; parse every reply with its codec
(:mod:`common.messages`); aggregate with bounded influence (:mod:`server.aggregation`)
if at least ``min_clients`` usable updates came back; evaluate on every online client holding
the backbone; append a ``metrics.jsonl`` line, print one live line and write the checkpoint
(:mod:`server.checkpoint`). At the end ``summary.json`` holds final metrics, per-client
privacy, bytes per round and wall time.

Fault tolerance: a client dropped from a round (see :mod:`server.rounds`) sits the next
round out, so that a client that is gone costs one round timeout, not one per round until
Flower notices it is offline. A dropped client may still have trained and spent privacy on
that round: its own state counts it, and the ``client_rounds`` of its next ``client_trained``
record shows the gap. With ``resume`` the loop continues after the last checkpointed round;
a round that crashed mid-way is run again, and the ledger records of the crashed attempt
stay (that spend was real).
"""

from __future__ import annotations

import time
from collections.abc import Collection

import numpy as np
from flwr.serverapp import Grid

from ferry.common.errors import FerryError
from ferry.common.messages import run_record
from ferry.common.model import initial_trainable_arrays, out_dim
from ferry.common.privacy.statement import privacy_statement
from ferry.common.training_defaults import training_record
from ferry.server.checkpoint import (
    Checkpoint,
    check_ledger_prefix,
    check_same_run,
    load_checkpoint,
    restore_metrics,
    save_checkpoint,
)
from ferry.server.exchange import Traffic
from ferry.server.final_model import write_final_model
from ferry.server.ledger import Ledger
from ferry.server.outputs import append_metrics, build_summary, write_summary
from ferry.server.plan import FederationPlan, FederationState
from ferry.server.rounds import (
    ensure_backbone,
    evaluate_round,
    institution_name,
    registered_nodes,
    sample_nodes,
    train_round,
)
from ferry.server.run_report import write_report

__all__ = ["FederationPlan", "FederationState", "run_federation", "wait_for_nodes"]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


_SHOWN = (
    ("accuracy", "acc"),
    ("balanced_accuracy", "bal-acc"),
    ("roc_auc", "auc"),
    ("rmse", "rmse"),
    ("mae", "mae"),
    ("directional_accuracy", "dir-acc"),
    ("loss", "loss"),
)


def _headline(evaluated: dict) -> str:
    """The round's federated evaluation metrics that exist for this task, for the log."""
    shown = [(label, evaluated.get(key)) for key, label in _SHOWN]
    return (
        "  ".join(f"{label} {v:.3f}" for label, v in shown if isinstance(v, float) and v == v)
        or "no evaluation"
    )


def wait_for_nodes(
    grid: Grid,
    wanted: int,
    log,
    timeout: float = 300.0,
    minimum: int = 1,
    registered: Collection[int] = (),
) -> list[int]:
    """Node ids once ``wanted`` clients are connected (or those present at ``timeout``, if
    at least ``minimum``); with ``registered`` ids, only those count."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(n for n in grid.get_node_ids() if not registered or n in registered)
        if len(node_ids) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(node_ids) < max(minimum, 1):
        raise FerryError(
            f"only {len(node_ids)} client(s) connected within {timeout:.0f}s; "
            f"the run needs at least {max(minimum, 1)}"
        )
    if len(node_ids) < wanted:
        log(f"only {len(node_ids)} of {wanted} clients connected; continuing with them")
    return node_ids


def _fresh(plan: FederationPlan) -> tuple[FederationState, np.random.Generator, int]:
    cfg = plan.cfg
    plan.ledger.append(
        "run_started",
        run_id=plan.run_id,
        config=run_record(cfg),
        training=training_record(cfg, plan.training_source),
        backbone_sha256=plan.artifact.sha256,
        privacy=privacy_statement(cfg.delta, accountant="prv", non_private=cfg.non_private),
    )
    arrays = initial_trainable_arrays(plan.artifact, cfg, out_dim(cfg.task, plan.num_classes))
    return FederationState(arrays), np.random.default_rng(cfg.seed), 1


def _resumed(plan: FederationPlan) -> tuple[FederationState, np.random.Generator, int]:
    ckpt = load_checkpoint(plan.out)
    check_ledger_prefix(plan.out, ckpt)
    check_same_run(plan.out, ckpt, plan.cfg.to_record(), plan.artifact.sha256)
    state = FederationState(
        ckpt.arrays,
        holders=set(ckpt.holders),
        institutions=dict(ckpt.institutions),
        exhausted=dict(ckpt.exhausted),
        clients=dict(ckpt.clients),
        rounds=list(ckpt.rounds),
    )
    rng = np.random.default_rng()
    rng.bit_generator.state = ckpt.rng
    restore_metrics(plan.out, ckpt.rounds)  # a crashed round's line, if any, goes
    plan.ledger.append(
        "run_resumed",
        run_id=plan.run_id,
        after_round=ckpt.round,
        records_after_checkpoint=plan.ledger.seq - ckpt.ledger_seq,
    )
    plan.log(f"resuming {plan.run_id} after round {ckpt.round} of {plan.cfg.rounds}")
    return state, rng, ckpt.round + 1


def _checkpoint(plan: FederationPlan, state: FederationState, rng, rnd: int) -> None:
    save_checkpoint(
        plan.out,
        Checkpoint(
            run_id=plan.run_id,
            backbone_sha256=plan.artifact.sha256,
            config=plan.cfg.to_record(),
            round=rnd,
            arrays=state.arrays,
            rng=rng.bit_generator.state,
            holders=sorted(state.holders),
            institutions=state.institutions,
            exhausted=state.exhausted,
            clients=state.clients,
            rounds=state.rounds,
            ledger_seq=plan.ledger.seq,
            ledger_prev=plan.ledger.prev,
        ),
    )


def _fail(plan: FederationPlan, state: FederationState, rnd: int, trained: dict) -> None:
    problems = {**trained["rejected"], **trained["refused"], **trained["dropped"]}
    reasons = "; ".join(sorted(set(problems.values()))) or "no replies"
    why = (
        f"round {rnd}: {trained['failed']}"
        if "failed" in trained
        else f"round {rnd}: {trained['participants']} usable update(s), fewer than "
        f"--min-clients {plan.cfg.min_clients} ({reasons})"
    )
    plan.ledger.append("round_failed", run_id=plan.run_id, round=rnd, reason=why)
    plan.ledger.append(
        "run_finished",
        run_id=plan.run_id,
        rounds_completed=len(state.rounds),
        reason=f"failed in {why}",
    )
    raise FerryError(f"{why}; the checkpoint of round {rnd - 1} allows a resume")


def run_federation(grid: Grid, plan: FederationPlan) -> dict:
    """Run the rounds; return (and write) the summary. Every event goes to the ledger."""
    cfg = plan.cfg
    started = time.perf_counter()
    plan.ledger = plan.ledger or Ledger(plan.out)
    state, rng, first = _resumed(plan) if plan.resume else _fresh(plan)
    wait_for_nodes(
        grid, cfg.clients, plan.log, plan.connect_timeout, cfg.min_clients, plan.node_names
    )
    end_reason = f"all {cfg.rounds} rounds completed"
    for rnd in range(first, cfg.rounds + 1):
        online = registered_nodes(plan, grid.get_node_ids(), rnd)
        # A client dropped last round (gone, or too slow) sits this round out rather than
        # costing it another timeout, unless the round needs it to reach --min-clients.
        suspended, state.dropped = state.dropped, {}
        eligible = [n for n in online if n not in state.exhausted]
        if len([n for n in eligible if n not in suspended]) >= cfg.min_clients:
            eligible = [n for n in eligible if n not in suspended]
            online = [n for n in online if n not in suspended]
            for node in sorted(set(suspended) & set(state.holders)):
                plan.log(f"  {institution_name(plan, state, node) or node} sits out round {rnd}")
        if len(eligible) < cfg.min_clients:
            end_reason = (
                f"stopped before round {rnd}: {len(eligible)} institution(s) online with budget "
                f"left, fewer than --min-clients {cfg.min_clients}"
            )
            plan.log(end_reason)
            break
        t0 = time.perf_counter()
        traffic = Traffic()
        state.dropped = {}
        nodes = sample_nodes(eligible, cfg.fraction_train, rng, cfg.min_clients)
        ensure_backbone(grid, plan, state, nodes, rnd, traffic)
        trained = train_round(grid, plan, state, nodes, rnd, traffic)
        if not trained["aggregated"]:
            failed = {**trained["rejected"], **trained["refused"]}
            if failed and all(int(n) in state.exhausted for n in failed):
                end_reason = f"stopped in round {rnd}: the sampled institutions' budgets are spent"
                plan.log(end_reason)
                break
            _fail(plan, state, rnd, trained)
        evaluated = evaluate_round(grid, plan, state, rnd, traffic, online)
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
        _checkpoint(plan, state, rng, rnd)
        for sink in plan.round_sinks:  # extra copies of the record: a failure costs only them
            try:
                sink(record)
            except Exception as exc:
                plan.log(
                    f"  round {rnd}: metrics not logged to a sink ({type(exc).__name__}: {exc})"
                )
        backbone = (
            f" (backbone {_fmt_bytes(traffic.backbone_sent)})" if traffic.backbone_sent else ""
        )
        plan.log(
            f"round {rnd}/{cfg.rounds}  {_headline(evaluated)}"
            f"  max ε {record['max_epsilon']:.2f}  clients {trained['participants']}/{len(nodes)}"
            f"  sent {_fmt_bytes(traffic.sent)}{backbone}  received {_fmt_bytes(traffic.received)}"
            f"  {record['seconds']:.1f}s"
        )
    plan.ledger.append(
        "run_finished", run_id=plan.run_id, rounds_completed=len(state.rounds), reason=end_reason
    )
    summary = build_summary(plan, state, end_reason, time.perf_counter() - started)
    if plan.resume:
        summary["resumed"] = True
    write_final_model(plan, state, end_reason)  # before the summary: a summary means both
    write_summary(plan.out, summary)
    try:
        plan.log(f"report: {write_report(plan.out)}")
    except Exception as exc:  # the run's files are complete; only the page is missing
        plan.log(
            f"report.html not written ({type(exc).__name__}: {exc}); the run's files are "
            f"complete: redraw it with `ferry report {plan.out}`"
        )
    return summary
