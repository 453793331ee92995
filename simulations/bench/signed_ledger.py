"""The audit benchmark's ledger (:mod:`simulations.bench.audit_bench`): a realistic federation
of institutions of very different sizes, what honest clients report for it, their reports
signed as a client signs them, and the ledger written through the server's own code.

Each institution's round is planned as a client plans it (:func:`common.training_defaults.round_plan`),
its noise multiplier derived as ``client.runtime.noise_for`` derives it, and its reported
epsilons computed as ``PrivacyState.epsilon`` computes them (PRV, or RDP for a quick run; cached
per distinct history, computed in worker processes). Each round's report is the dict of
``client.runtime.train_round``, signed by :func:`client.receipts.sign_and_keep` in the
institution's state directory ``OUT/clients/NAME``; each ``client_trained`` record goes through
the server's :func:`server.client_reports.ledger_trained` into a real
:class:`server.ledger.Ledger`.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import write_atomic

BATCH = 64
EPOCHS = 1
RUN_ID = "bench-audit"
DELTA = 1e-5
BUDGETS = (2.0, 4.0, 8.0)


@dataclass(frozen=True)
class InstitutionPlan:
    institution: str
    examples: int
    sample_rate: float
    steps_per_round: int
    budget_epsilon: float


def plan_institutions(count: int, seed: int = 7) -> list[InstitutionPlan]:
    """Institutions of log-normal sizes (median ~4,000 examples), each round planned as the
    client plans it (one epoch at batch 64): distinct q and steps for most of them."""
    from ferry.common.training_defaults import round_plan

    rng = np.random.default_rng(seed)
    sizes = np.clip(np.exp(rng.normal(math.log(4000), 1.1, count)), 400, 150_000).astype(int)
    plans = []
    for i, n in enumerate(sizes):
        q, steps = round_plan(int(n), BATCH, EPOCHS)
        plans.append(
            InstitutionPlan(
                institution=f"inst-{i:03d}",
                examples=int(n),
                sample_rate=q,
                steps_per_round=steps,
                budget_epsilon=float(rng.choice(BUDGETS)),
            )
        )
    return plans


def _cache_key(plan: InstitutionPlan, rounds: int, accountant: str) -> str:
    from importlib.metadata import version

    return (
        f"q={plan.sample_rate!r}|steps={plan.steps_per_round}|rounds={rounds}|"
        f"eps={plan.budget_epsilon!r}|delta={DELTA!r}|opacus={version('opacus')}|"
        f"accountant={accountant}"
    )


def honest_history(plan: InstitutionPlan, rounds: int, accountant: str = "prv") -> dict:
    """Noise multiplier and the cumulative epsilon after each round, as a client computes
    them (``noise_for`` for sigma, ``PrivacyState.epsilon`` for the reports) with
    ``accountant``: "prv" as Ferry's clients do, or "rdp", an honest but looser client whose
    numbers take milliseconds instead of 10 to 60 s."""
    from ferry.common.privacy.accounting import (
        MechanismSegment,
        epsilon_for_history,
        noise_multiplier_for_target,
    )

    q, k = plan.sample_rate, plan.steps_per_round
    sigma = noise_multiplier_for_target(plan.budget_epsilon, DELTA, q, k * rounds, accountant)
    history: list[MechanismSegment] = []
    epsilons = []
    for _ in range(rounds):
        history.append(MechanismSegment(sigma, q, k))
        epsilons.append(epsilon_for_history(history, DELTA, accountant))
    return {"sigma": sigma, "epsilons": epsilons, "accountant": accountant}


def honest_histories(
    plans: list[InstitutionPlan],
    rounds: int,
    cache_path: Path,
    workers: int,
    accountant: str = "prv",
) -> list[dict]:
    cache: dict[str, dict] = {}
    if cache_path.exists():
        cache = json.loads(cache_path.read_text())
    todo = {
        _cache_key(p, rounds, accountant): p
        for p in plans
        if _cache_key(p, rounds, accountant) not in cache
    }
    if todo:
        print(
            f"computing honest {accountant.upper()} epsilons for {len(todo)} histories on {workers} processes"
        )
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # spawn: the workers import torch (Opacus); no fork of a process holding its threads.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(honest_history, p, rounds, accountant): key for key, p in todo.items()
            }
            for done, future in enumerate(as_completed(futures), start=1):
                cache[futures[future]] = future.result()
                if done % 10 == 0 or done == len(todo):
                    write_atomic(cache_path, json.dumps(cache))
                    print(f"  {done}/{len(todo)} ({time.perf_counter() - started:.0f} s)")
    return [cache[_cache_key(p, rounds, accountant)] for p in plans]


def client_report(plan: InstitutionPlan, h: dict, rnd: int) -> dict:
    """Round ``rnd``'s privacy report dict as ``client.runtime.train_round`` builds it, before
    signing (the same keys and values, less the client's ``budget-left-for-another-round``
    hint, an extra field the audit does not read)."""
    from importlib.metadata import version

    from ferry.common.privacy import UNIT_OF_PRIVACY
    from ferry.common.privacy.accounting import MechanismSegment
    from ferry.common.privacy.dp_events import event_to_json, segment_event

    seg = MechanismSegment(h["sigma"], plan.sample_rate, plan.steps_per_round)
    return {
        "run-id": RUN_ID,
        "round": rnd,
        "institution": plan.institution,
        "unit": UNIT_OF_PRIVACY,
        "examples": plan.examples,
        "batch-size": BATCH,
        "local-epochs": EPOCHS,
        "delta": DELTA,
        "max-grad-norm": 1.0,
        "non-private": False,
        "accountant": h.get("accountant", "prv"),
        "accountant-library": f"opacus {version('opacus')}",
        "sampling": "poisson",
        "budget-epsilon": plan.budget_epsilon,
        "budget-delta": DELTA,
        "noise-multiplier": seg.noise_multiplier,
        "sample-rate": seg.sample_rate,
        "steps": seg.steps,
        "dp-event": event_to_json(segment_event(seg)),
        "epsilon": h["epsilons"][rnd - 1],
        "rounds": rnd,
    }


def sign_institution(state_dir: str, plan: InstitutionPlan, h: dict, rounds: int) -> dict:
    """Every round's report of one institution, signed and kept in its receipt chain by
    :func:`client.receipts.sign_and_keep` (its key in ``state_dir``, made once and reused).
    Returns ``{"reports": [report dict with the signed report, ...], "seconds": signing}``."""
    from ferry.client.receipts import sign_and_keep
    from ferry.common.privacy.report import RECEIPTS_FILE

    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECEIPTS_FILE).unlink(missing_ok=True)  # a fresh ledger: a fresh chain
    reports = [client_report(plan, h, rnd) for rnd in range(1, rounds + 1)]
    started = time.perf_counter()
    for report in reports:
        report.update(sign_and_keep(directory, plan.institution, report))
    return {"reports": reports, "seconds": time.perf_counter() - started}


def sign_reports(
    out: Path, plans: list[InstitutionPlan], honest: list[dict], rounds: int, workers: int
) -> tuple[list[list[dict]], float]:
    """Every institution's signed reports (state directories under ``out/clients``), signed
    in ``workers`` processes, one institution per task as real institutions sign in parallel;
    also the total seconds spent inside ``sign_and_keep``."""
    from ferry.server.audit_signatures import CLIENT_STATE_DIR

    root = out / CLIENT_STATE_DIR
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(sign_institution, str(root / p.institution), p, h, rounds)
            for p, h in zip(plans, honest, strict=True)
        ]
        results = [f.result() for f in futures]
    return [r["reports"] for r in results], sum(r["seconds"] for r in results)


def write_ledger(
    out: Path, plans: list[InstitutionPlan], signed: list[list[dict]], rounds: int
) -> int:
    """A fresh ``out/ledger.jsonl`` for the whole run, as the server writes it: each
    ``client_trained`` record through the server's own ``ledger_trained``, carrying the
    institution's signed report verbatim."""
    from ferry.common.privacy.report import REPLY_BODY, REPLY_SIGNATURE
    from ferry.common.privacy.statement import privacy_statement
    from ferry.common.train_reply import PrivacyReply
    from ferry.server.client_reports import ledger_trained
    from ferry.server.ledger import HEAD_FILE, LEDGER_FILE, Ledger

    out.mkdir(parents=True, exist_ok=True)
    for name in (LEDGER_FILE, HEAD_FILE):
        (out / name).unlink(missing_ok=True)
    ledger = Ledger(out)
    sha = "ab" * 32
    ledger.append(
        "run_started",
        run_id=RUN_ID,
        config={"rounds": rounds, "delta": DELTA, "batch_size": BATCH, "local_epochs": EPOCHS},
        backbone_sha256=sha,
        privacy=privacy_statement(DELTA, accountant="prv"),
    )
    for rnd in range(1, rounds + 1):
        for node, (plan, reports) in enumerate(zip(plans, signed, strict=True)):
            if rnd == 1:
                ledger.append(
                    "backbone_shipped",
                    run_id=RUN_ID,
                    round=rnd,
                    node_id=str(node),
                    backbone_sha256=sha,
                    bytes=1_200_000,
                )
            report = reports[rnd - 1]
            privacy = PrivacyReply.of({k: report[k] for k in (REPLY_BODY, REPLY_SIGNATURE)})
            ledger_trained(ledger, RUN_ID, rnd, node, plan.institution, privacy)
        ledger.append(
            "round_aggregated",
            run_id=RUN_ID,
            round=rnd,
            participants=[p.institution for p in plans],
            payload_bytes=2_600 * len(plans),
        )
    ledger.append("run_finished", run_id=RUN_ID, rounds_completed=rounds, reason="completed")
    return ledger.seq
