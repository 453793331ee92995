"""``ferry simulate``: many virtual institutions on one machine (Flower Simulation Engine).

Everything that can be checked before Ray starts is checked first, by the server's planner
(:func:`server.simulation_plan.plan_simulation`: config, backbone, data, delta < 1/n for
every partition, output directory), so bad input fails in a second with one line instead of
inside a worker; then Ferry's ServerApp and ClientApp run under Flower's simulation engine.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ferry.client.app import app as ferry_client_app
from ferry.common.backbones.own_module import register_saved_module
from ferry.common.backbones.registry import is_import_path, trust_code
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.scenarios import get_scenario
from ferry.server.app import build_server_app
from ferry.server.federation import FederationPlan
from ferry.server.metric_sinks import check_log_to, sink_for
from ferry.server.outputs import FINAL_METRICS
from ferry.server.run_report import REPORT_FILE, write_report
from ferry.server.simulation_plan import plan_simulation
from ferry.simulations.local_baseline import check_baseline, local_baseline


def _trained_part(cfg: RunConfig) -> str:
    if cfg.trainable == "head":
        return f"{cfg.head} head"
    if cfg.trainable == "lora":
        return f"LoRA r={cfg.lora_rank} + {cfg.head} head"
    return f"{cfg.trainable} + {cfg.head} head"


@dataclass(frozen=True)
class WorkerApp:
    """A ClientApp for the researcher's own Ray workers, carrying what the driver set up: the
    backbone import path the researcher named (trusted in each worker as in the driver:
    :mod:`common.backbones.registry`) and the researcher's own module, saved beside its
    artifact (``(folder, sha256)``: :func:`common.backbones.own_module.register_saved_module`)."""

    app: object
    trusted: tuple[str, ...] = ()
    own_module: tuple[str, str] | None = None

    def __call__(self, message, context):
        for path in self.trusted:
            trust_code(path)
        if self.own_module is not None:
            register_saved_module(*self.own_module)
        return self.app(message=message, context=context)


def backend_config(cfg: RunConfig) -> dict:
    """Flower's Ray backend settings: resources per virtual client, and the cluster."""
    init_args: dict = {"logging_level": "ERROR", "log_to_driver": False}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    return {
        "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": cfg.gpus_per_client},
        "init_args": init_args,
    }


def run_on_ray(plan: FederationPlan, client_app) -> None:
    """Run ``plan``'s federation to its end under Flower's Simulation Engine (Ray): Ferry's
    ServerApp, ``client_app`` on each of ``plan.cfg.clients`` virtual SuperNodes. The one
    step of :func:`simulate` that needs Ray (tests whose point is not Ray replace it)."""
    from flwr.simulation import run_simulation  # Ray: heavy, loaded only when one runs

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    run_simulation(
        server_app=build_server_app(plan),
        client_app=client_app,
        num_supernodes=plan.cfg.clients,
        backend_config=backend_config(plan.cfg),
    )


def simulate(
    cfg: RunConfig,
    log=print,
    client_app=None,
    own_module: tuple[str, str] | None = None,
    baseline: str = "",
    log_to: str = "",
) -> dict:
    """Run a simulation to the end; return its summary (also in ``<out>/summary.json``).

    ``client_app`` replaces Ferry's ClientApp (benchmarks use a no-op one). A backbone named
    by import path is trusted here and in every worker: the researcher named it.
    ``own_module``: the saved module of ``ferry.simulate(backbone=nn.Module)``.
    ``baseline`` "local": then each institution alone (:mod:`simulations.local_baseline`).
    ``log_to`` ``tensorboard:DIR``: every round's metrics there too (:mod:`server.metric_sinks`)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    check_baseline(baseline, cfg)
    if log_to:
        check_log_to(log_to)
    trusted = (cfg.backbone,) if is_import_path(cfg.backbone) else ()
    for path in trusted:
        trust_code(path)
    plan = plan_simulation(cfg, log=log)
    cfg = plan.cfg
    check_baseline(baseline, cfg)  # the task is known now
    plan.round_sinks = (sink_for(log_to),) if log_to else ()
    pre = plan.artifact.manifest.get("pretraining", {})
    privacy = (
        "NON-PRIVATE run (no DP guarantee)"
        if cfg.non_private
        else f"target ε={cfg.epsilon:g}, δ={cfg.delta:g} per institution "
        "(unit: one example; PRV accountant)"
    )
    log(
        f"Ferry simulation: {cfg.clients} virtual {get_scenario(cfg.scenario).institution}s, "
        f"{cfg.rounds} rounds, {privacy}\n"
        f"backbone {plan.artifact.manifest['architecture']} {plan.artifact.sha256[:12]} "
        f"({pre.get('kind', '?')}), trains {_trained_part(cfg)}, outputs in {plan.out}/"
    )
    app = ferry_client_app if client_app is None else client_app
    if trusted or own_module:
        app = WorkerApp(app, trusted, own_module)
    run_on_ray(plan, app)
    summary_path = plan.out / "summary.json"
    if not summary_path.exists():
        raise FerryError(f"the simulation ended without a summary; see {plan.out}/metrics.jsonl")
    summary = json.loads(summary_path.read_text())
    final = summary["final"]
    max_eps = summary["privacy"]["max_epsilon"]  # a number, or "inf" for a non-private run
    max_eps = f"{max_eps:.3f}" if isinstance(max_eps, int | float) else max_eps
    headline = "  ".join(
        f"{k.replace('_', ' ')} {v:.3f}"
        for k, v in final.items()
        if k in FINAL_METRICS
        and k not in ("loss", "eval_examples", "roc_auc_bin_error")
        and isinstance(v, float)
    )
    log(
        f"done in {summary['wall_time_s']:.0f}s: federated {headline or 'no evaluation'} "
        f"after {final['round']} rounds, max ε {max_eps}\n"
        f"outputs: {plan.out}/metrics.jsonl, {plan.out}/summary.json"
        + (f", {plan.out}/report.html" if (plan.out / REPORT_FILE).exists() else "")
    )
    if baseline:
        rounds = [json.loads(x) for x in (plan.out / "metrics.jsonl").read_text().splitlines()]
        local_baseline(plan, summary, rounds, log)
        try:
            write_report(plan.out)  # with the baseline column
        except Exception as exc:  # summary.json holds the baseline; only the page is missing
            log(f"report.html not redrawn ({type(exc).__name__}: {exc}): `ferry report {plan.out}`")
    return summary
