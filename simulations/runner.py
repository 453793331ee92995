"""``ferry simulate``: many virtual institutions on one machine (Flower Simulation Engine).

Everything that can be checked before Ray starts is checked here (config, backbone, data,
delta < 1/n for every partition, output directory), so bad input fails in a second with one
line instead of inside a worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from common.config import RunConfig
from common.data.datasets import DataSpec, load_dataset, partition_sizes
from common.errors import FerryError
from common.heads import build_head
from common.paths import ferry_home
from server.backbone_source import resolve_backbone
from server.federation import FederationPlan
from server.outputs import prepare_out_dir
from simulations.scenarios import get_scenario


def plan_simulation(
    settings: dict | RunConfig, num_clients: int | None = None, log=print
) -> FederationPlan:
    cfg = settings if isinstance(settings, RunConfig) else RunConfig.from_mapping(settings)
    if num_clients is not None:
        cfg = dataclasses.replace(cfg, clients=num_clients)
    cfg.validate()
    get_scenario(cfg.scenario)
    if not cfg.ray_address and (cfg.gpus_per_client > 0 or cfg.device.startswith("cuda")):
        import torch

        if not torch.cuda.is_available():
            raise FerryError(
                "GPUs were asked for (--gpus-per-client / --device cuda) but this machine has "
                "no visible CUDA GPU: use --device auto or cpu and --gpus-per-client 0"
            )
    artifact = resolve_backbone(cfg.backbone, cfg.weights, cfg.seed)
    spec = DataSpec(
        data=cfg.data,
        examples=cfg.examples,
        num_partitions=cfg.clients,
        alpha=cfg.alpha,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        input_shape=tuple(artifact.manifest["input_shape"]),
    )
    _, _, num_classes, _ = load_dataset(spec)
    build_head(cfg.head, int(artifact.manifest["feature_dim"]), num_classes)
    sizes = partition_sizes(spec)
    smallest = min(sizes)
    if smallest == 0:
        raise FerryError(
            f"a client got no training examples ({cfg.clients} clients, alpha {cfg.alpha}): "
            "use fewer --clients, more data or a larger --alpha"
        )
    if not cfg.non_private and cfg.delta >= 1.0 / smallest:
        raise FerryError(
            f"--delta {cfg.delta:g} is not below 1/n = {1.0 / smallest:.3g} for the smallest "
            f"client ({smallest} examples): use --delta below {1.0 / smallest:.1g}"
        )
    out = prepare_out_dir(cfg.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S"))
    cfg = dataclasses.replace(cfg, out=str(out))
    return FederationPlan(
        cfg=cfg,
        artifact=artifact,
        num_classes=num_classes,
        out=out,
        client_state_root=(out / "clients").resolve(),
        client_cache_root=(ferry_home() / "simulation-clients").resolve(),
        run_id=out.name,
        log=log,
    )


def backend_config(cfg: RunConfig) -> dict:
    """Flower's Ray backend settings: resources per virtual client, and the cluster."""
    init_args: dict = {"logging_level": "ERROR", "log_to_driver": False}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    return {
        "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": cfg.gpus_per_client},
        "init_args": init_args,
    }


def simulate(cfg: RunConfig, log=print, client_app=None) -> dict:
    """Run a simulation to the end; return its summary (also in ``<out>/summary.json``).

    ``client_app`` replaces Ferry's ClientApp (benchmarks use a no-op one)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    plan = plan_simulation(cfg, log=log)
    cfg = plan.cfg
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
        f"({pre.get('kind', '?')}), head {cfg.head}, outputs in {plan.out}/"
    )
    from flwr.simulation import run_simulation

    from server.app import build_server_app

    if client_app is None:
        from client.app import app as client_app

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    run_simulation(
        server_app=build_server_app(plan),
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_config=backend_config(cfg),
    )
    summary_path = plan.out / "summary.json"
    if not summary_path.exists():
        raise FerryError(f"the simulation ended without a summary; see {plan.out}/metrics.jsonl")
    summary = json.loads(summary_path.read_text())
    final = summary["final"]
    max_eps = summary["privacy"]["max_epsilon"]  # a number, or "inf" for a non-private run
    max_eps = f"{max_eps:.3f}" if isinstance(max_eps, int | float) else max_eps
    log(
        f"done in {summary['wall_time_s']:.0f}s: federated accuracy {final['accuracy']:.3f} "
        f"after {final['round']} rounds, max ε {max_eps}\n"
        f"outputs: {plan.out}/metrics.jsonl, {plan.out}/summary.json"
    )
    return summary
