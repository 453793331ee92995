"""Poisoning benchmark: 10 institutions, one hostile, federated accuracy per aggregation rule.

Every institution is a real virtual institution of ``ferry simulate`` (:mod:`client.runtime`:
its partition of the scenario's data, cached backbone features, DP-SGD at the run's ε with
its own privacy state and signed report). Each round the server sends the global head to all
of them, combines the updates with :func:`server.aggregation.aggregate_updates` (what
``server.rounds`` calls) and evaluates the new head on every institution's held-out split,
pooling the released statistics after :func:`server.aggregation.capped_statistics`.

The hostile institution trains honestly, then lies in what it sends: its change is
multiplied by ``scale`` (-1e3: sign-flipped and scaled), it claims ``claimed`` training
examples (1e12), and in evaluation it claims ``eval_claimed`` examples (1e9), all classified
correctly. The lies are applied to its reply after training, as a modified client would.

Arms, each a fresh run (own privacy states and ledger-free loop; features cached once):

* ``honest``: the same 10 institutions, nobody lying, default policy (bounded FedAvg);
* ``fedavg-unbounded``: FedAvg on claimed counts, no bound, evaluation counts as claimed (what
  the server did before bounded influence);
* ``fedavg`` (the default: weights capped at 2x the median claim, changes clipped to 2x the
  median change norm), ``trimmed-mean``, ``median``, ``krum``: under attack.

Figures: the accuracy of the final head on the honest institutions' pooled held-out sets
(what the honest institutions get), the federated accuracy the run reports (the hostile
institution's evaluation claim included, capped or not), and cost: the mean round time and
the mean time of the aggregation step, each as a ratio to bounded FedAvg in the same run, and
the aggregation step alone on ``large_parameters``-sized updates.

The loop is the bench's own, not ``server.federation``: there, the message codecs reject a
claim above ``common.messages.MAX_EXAMPLES`` or one that disagrees with the signed report
before aggregation; here the lies reach the rule, which is what is measured.

Run: ``python -m simulations.bench.poison_bench [--quick]``; a full run writes its table to
``BENCHMARKS.md`` (:data:`HEADING`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.client import institution_settings, runtime
from ferry.common.config import RunConfig
from ferry.common.evaluation_statistics import (
    EvaluationStatistics,
    pool_statistics,
    statistics_from_record,
)
from ferry.common.messages import RoundRequest
from ferry.common.metrics import metrics_from_statistics
from ferry.common.model import initial_trainable_arrays, out_dim
from ferry.server.aggregation import (
    AggregationPolicy,
    aggregate_updates,
    capped_statistics,
    change_norm,
)
from ferry.server.simulation_plan import plan_simulation
from ferry.simulations.bench.report import record_section

HEADING = "## Poisoning: one hostile institution of 10, per aggregation rule"
UNBOUNDED = AggregationPolicy(weight_cap=math.inf, max_update_norm=math.inf)
RULES = ("fedavg", "trimmed-mean", "median", "krum")


@dataclass(frozen=True)
class PoisonSizes:
    """How big a poisoning run is and what the hostile institution does."""

    institutions: int = 10
    rounds: int = 5
    examples: int = 4000
    scenario: str = "hospital-imaging"
    epsilon: float = 3.0
    noise_multiplier: float | None = None  # None: derived per institution from epsilon
    weights: str = "random"  # the backbone: a `ferry pretrain` output, or random init
    scale: float = -1e3  # the hostile change: its own change times this
    claimed: float = 1e12  # training examples the hostile institution claims
    eval_claimed: int = 10**9  # held-out examples it claims, all classified correctly
    seed: int = 0
    large_parameters: int = 1_000_000  # the aggregation step alone on updates this size
    repeats: int = 3  # timings of the aggregation step alone


QUICK = PoisonSizes(
    institutions=5,
    rounds=2,
    examples=300,
    epsilon=100.0,  # seconds, not accuracy: a fixed σ, and a budget it cannot exhaust
    noise_multiplier=1.0,
    large_parameters=20_000,
    repeats=1,
)


def _run_config(sizes: PoisonSizes, rule: str, out: Path) -> RunConfig:
    return RunConfig(
        scenario=sizes.scenario,
        clients=sizes.institutions,
        rounds=sizes.rounds,
        examples=sizes.examples,
        epsilon=sizes.epsilon,
        noise_multiplier=sizes.noise_multiplier,
        weights=sizes.weights,
        min_clients=5 if sizes.institutions >= 5 else sizes.institutions,
        aggregation=rule,
        seed=sizes.seed,
        out=str(out),
    )


def _lie_in_training(current: dict, head: dict, scale: float) -> dict:
    return {
        k: (current[k].astype(np.float64) + scale * (head[k] - current[k])).astype(head[k].dtype)
        for k in head
    }


def _perfect_claim(stats: EvaluationStatistics, claimed: int) -> EvaluationStatistics:
    """Statistics claiming ``claimed`` held-out examples, every one classified correctly."""
    k = stats.confusion.shape[0]
    diagonal = np.full(k, claimed // k)
    diagonal[0] += claimed - diagonal.sum()
    return statistics_from_record(
        {"num-examples": int(claimed), "confusion": np.diag(diagonal).ravel().tolist()},
        "classification",
        k,
    )


def run_arm(
    sizes: PoisonSizes, name: str, policy: AggregationPolicy, hostile: bool, work: Path
) -> dict:
    """One run: ``sizes.rounds`` rounds of all institutions; the last one lies if ``hostile``."""
    out = work / name
    plan = plan_simulation(_run_config(sizes, policy.rule, out), log=lambda _: None)
    n = sizes.institutions
    arrays = initial_trainable_arrays(
        plan.artifact, plan.cfg, out_dim(plan.cfg.task, plan.num_classes)
    )
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    liar = n - 1 if hostile else None
    round_times, aggregation_times, history = [], [], []
    settings = None
    for rnd in range(1, sizes.rounds + 1):
        req = RoundRequest(
            plan.cfg,
            rnd,
            plan.artifact.sha256,
            plan.num_classes,
            plan.run_id or out.name,
            str(plan.client_state_root),
            str(plan.client_cache_root),
        )
        record = req.to_record()
        if settings is None:
            settings = [
                institution_settings.settings_for_simulation(node, record) for node in nodes
            ]
            for s in settings:
                if not runtime.has_backbone(s, plan.artifact.sha256):
                    runtime.store_backbone(
                        s, plan.artifact.manifest, plan.artifact.tensors, plan.artifact.sha256
                    )
        start = time.perf_counter()
        updates = []
        for i, s in enumerate(settings):
            head, metrics, _report = runtime.train_round(s, req, arrays)
            count = float(metrics["num-examples"])
            if i == liar:
                head, count = _lie_in_training(arrays, head, sizes.scale), sizes.claimed
            updates.append((s.institution, head, count))
        began = time.perf_counter()
        result = aggregate_updates(arrays, updates, policy)
        aggregation_times.append(time.perf_counter() - began)
        step = change_norm([result.arrays[k] - arrays[k].astype(np.float64) for k in arrays])
        arrays = result.arrays
        parts = {}
        for s in settings:
            stats = statistics_from_record(
                runtime.evaluate_round(s, req, arrays), req.task, plan.num_classes
            )
            parts[s.institution] = stats
        # The honest institutions: all but the last, in every arm (the last lies under attack).
        honest = [parts[s.institution] for s in settings[:-1]]
        if liar is not None:
            parts[settings[liar].institution] = _perfect_claim(
                parts[settings[liar].institution], sizes.eval_claimed
            )
        reported = pool_statistics(list(capped_statistics(parts, policy.weight_cap).values()))
        round_times.append(time.perf_counter() - start)
        history.append(
            {
                "round": rnd,
                "honest_accuracy": metrics_from_statistics(pool_statistics(honest))["accuracy"],
                "reported_accuracy": metrics_from_statistics(reported)["accuracy"],
                "step_norm": step,
                "norm_bound": result.norm_bound,
                "clipped": sorted(result.clipped),
                "weights": result.weights,
                "hostile_weight": result.weights.get(settings[liar].institution)
                if liar is not None
                else None,
            }
        )
    last = history[-1]
    return {
        "arm": name,
        "rule": policy.rule,
        "hostile": hostile,
        "honest_accuracy": last["honest_accuracy"],
        "reported_accuracy": last["reported_accuracy"],
        # Rounds 2+: round 1 also derives each institution's noise (and, in the first arm,
        # extracts every institution's features once).
        "round_s": float(np.mean(round_times[1:] or round_times)),
        "aggregation_ms": 1e3 * float(np.mean(aggregation_times)),
        "history": history,
    }


def time_aggregation(sizes: PoisonSizes) -> dict[str, float]:
    """Milliseconds of one aggregation step per rule, ``institutions`` updates of
    ``large_parameters`` float32 values (one hostile, scaled), best of ``repeats``."""
    rng = np.random.default_rng(0)
    current = {"w": rng.normal(size=sizes.large_parameters).astype(np.float32)}
    step = rng.normal(size=sizes.large_parameters) * 1e-3
    updates = [
        (f"i{i}", {"w": (current["w"] + step + rng.normal(size=step.shape) * 1e-4)}, 100.0)
        for i in range(sizes.institutions - 1)
    ]
    updates.append(("hostile", {"w": current["w"] + sizes.scale * step}, sizes.claimed))
    updates = [(n, {k: v.astype(np.float32) for k, v in a.items()}, c) for n, a, c in updates]
    out = {}
    for rule in RULES:
        policy = AggregationPolicy(rule=rule)
        best = math.inf
        for _ in range(sizes.repeats):
            began = time.perf_counter()
            aggregate_updates(current, updates, policy)
            best = min(best, time.perf_counter() - began)
        out[rule] = 1e3 * best
    began = time.perf_counter()
    aggregate_updates(current, updates, UNBOUNDED)
    out["fedavg-unbounded"] = 1e3 * (time.perf_counter() - began)
    return out


POLICIES = {"fedavg-unbounded": UNBOUNDED, **{r: AggregationPolicy(rule=r) for r in RULES}}


def run(sizes: PoisonSizes = PoisonSizes(), work: Path | None = None, log=print) -> dict:
    """Every rule without and with the hostile institution, then the aggregation step alone;
    results as a JSON-ready dict."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    results = []
    with tempfile.TemporaryDirectory(prefix="ferry-poison-") as tmp:
        work = Path(work or tmp)
        os.environ.setdefault("FERRY_HOME", str(work / "ferry-home"))
        for label, policy in POLICIES.items():
            for hostile in (False, True):
                name = f"{label}-{'hostile' if hostile else 'honest'}"
                log(f"poison bench: {name}...")
                r = {"label": label, **run_arm(sizes, name, policy, hostile, work)}
                results.append(r)
                log(
                    f"  honest accuracy {r['honest_accuracy']:.3f}, reported "
                    f"{r['reported_accuracy']:.3f}, round {r['round_s']:.2f}s"
                )
    cost = {
        label: {
            key: float(np.mean([r[key] for r in results if r["label"] == label]))
            for key in ("round_s", "aggregation_ms")
        }
        for label in POLICIES
    }
    for c in cost.values():
        c["round_ratio"] = c["round_s"] / cost["fedavg"]["round_s"]
        c["aggregation_ratio"] = c["aggregation_ms"] / cost["fedavg"]["aggregation_ms"]
    return {
        "sizes": dataclasses.asdict(sizes),
        "arms": results,
        "cost": cost,
        "large_aggregation_ms": time_aggregation(sizes),
    }


def render(results: dict, command: str) -> str:
    s = results["sizes"]
    large = results["large_aggregation_ms"]
    lines = [
        f"`{command}`: {s['institutions']} institutions ({s['scenario']}, "
        f"{s['examples']} synthetic examples, Dirichlet label skew, "
        f"{'random-init' if s['weights'] == 'random' else 'pretrained'} backbone, DP-SGD at ε = "
        f"{s['epsilon']:g}), {s['rounds']} rounds, each rule run twice: all honest, and with "
        f"one hostile institution that sends its change x{s['scale']:g}, claims "
        f"{s['claimed']:.0e} training examples and {s['eval_claimed']:.0e} held-out examples "
        "all correct. Accuracy after the last round on the honest institutions' pooled held-out "
        "sets (the same institutions in both runs); *reported*: the federated accuracy the run "
        "computes, the hostile claim included. Cost: mean round time (every institution "
        "training in one process; rounds 2+) and mean aggregation step, as a ratio to bounded "
        f"FedAvg; the step alone on {s['institutions']} updates of "
        f"{s['large_parameters']:,} parameters.",
        "",
        "| rule | accuracy, all honest | accuracy, one hostile | reported, one hostile | "
        "round s (ratio) | aggregation ms (ratio) | aggregation ms, "
        f"{s['large_parameters']:,} params |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, c in results["cost"].items():
        arms = {r["hostile"]: r for r in results["arms"] if r["label"] == label}
        name = {"fedavg-unbounded": "FedAvg, unbounded (main before)"}.get(label, label)
        if label == "fedavg":
            name = "fedavg (default: bounded)"
        lines.append(
            f"| {name} | {arms[False]['honest_accuracy']:.3f} | "
            f"{arms[True]['honest_accuracy']:.3f} | {arms[True]['reported_accuracy']:.3f} | "
            f"{c['round_s']:.2f} ({c['round_ratio']:.2f}x) | {c['aggregation_ms']:.2f} "
            f"({c['aggregation_ratio']:.2f}x) | {large[label]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds; no table)")
    p.add_argument(
        "--weights",
        default="random",
        help="the backbone: a `ferry pretrain` output directory (default: random init)",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--markdown", default=None, help="where the table goes (default: BENCHMARKS.md)")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    sizes = dataclasses.replace(QUICK if args.quick else PoisonSizes(), weights=args.weights)
    results = run(sizes)
    command = "python -m simulations.bench.poison_bench" + (" --quick" if args.quick else "")
    if args.weights != "random":
        command = f"ferry pretrain --out WEIGHTS && {command} --weights WEIGHTS"
    table = render(results, command)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    record_section(args.markdown, args.quick, HEADING, table, load)


if __name__ == "__main__":
    main()
