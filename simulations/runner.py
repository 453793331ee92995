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

from ferry.common.backbones.registry import backbone_spec
from ferry.common.config import RunConfig
from ferry.common.data.datasets import DataSpec, load_dataset, partition_sizes
from ferry.common.errors import FerryError
from ferry.common.model import initial_trainable_arrays, out_dim
from ferry.common.paths import ferry_home
from ferry.common.scenarios import get_scenario, with_base_rates, with_scenario_defaults
from ferry.common.training_defaults import check_feasible, trainable_size
from ferry.server.backbone_source import choose_training, resolve_backbone
from ferry.server.federation import FederationPlan
from ferry.server.outputs import FINAL_METRICS, prepare_out_dir


def plan_simulation(
    settings: dict | RunConfig, num_clients: int | None = None, log=print
) -> FederationPlan:
    cfg = settings if isinstance(settings, RunConfig) else RunConfig.from_mapping(settings)
    if num_clients is not None:
        cfg = dataclasses.replace(cfg, clients=num_clients)
    cfg = with_scenario_defaults(cfg.validate())
    if not cfg.ray_address and (cfg.gpus_per_client > 0 or cfg.device.startswith("cuda")):
        import torch

        if not torch.cuda.is_available():
            raise FerryError(
                "GPUs were asked for (--gpus-per-client / --device cuda) but this machine has "
                "no visible CUDA GPU: use --device auto or cpu and --gpus-per-client 0"
            )
    modality = backbone_spec(cfg.backbone).modality
    spec = DataSpec.from_run(cfg, cfg.clients, backbone_spec(cfg.backbone).input_shape)
    dataset = None
    if modality != "image":  # a random-init table/series backbone takes the data's layout
        dataset = load_dataset(spec)
    artifact = resolve_backbone(
        cfg.backbone,
        cfg.weights,
        cfg.seed,
        cfg.scenario,
        None if dataset is None else tuple(dataset.x.shape[1:]),
    )
    spec = DataSpec.from_run(cfg, cfg.clients, tuple(artifact.manifest["input_shape"]))
    dataset = load_dataset(spec)
    if dataset.modality != modality:
        raise FerryError(
            f"backbone {cfg.backbone} takes {modality} data but the {cfg.scenario} data is "
            f"{dataset.modality}: leave --backbone out to use the scenario's, or pick a "
            f"{dataset.modality} backbone"
        )
    want = tuple(artifact.manifest["input_shape"])
    if modality != "image" and tuple(dataset.x.shape[1:]) != want:
        raise FerryError(
            f"the {cfg.scenario} data has layout {tuple(dataset.x.shape[1:])} but backbone "
            f"{artifact.sha256[:12]} was pretrained on layout {want}: pretrain on data with the "
            f"same columns (`ferry pretrain --scenario {cfg.scenario} --data ...`) or pass "
            "--weights random"
        )
    # The task as found in the data travels to every client with the run config.
    cfg = dataclasses.replace(cfg, task=dataset.task)
    num_classes = dataset.num_classes
    cfg = with_base_rates(cfg, num_classes)  # the preset's public rates; count checked
    initial = initial_trainable_arrays(artifact, cfg, out_dim(cfg.task, num_classes))
    sizes = partition_sizes(spec)
    smallest = min(sizes)
    if cfg.task == "classification" and num_classes < 2:
        raise FerryError(
            f"{cfg.data or 'the data'} holds a single class: classification needs at least two"
        )
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
    cfg, source = choose_training(cfg, artifact, log)
    check_feasible(cfg, sizes, trainable_size(initial))
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
        training_source=source,
    )


def _trained_part(cfg: RunConfig) -> str:
    if cfg.trainable == "head":
        return f"{cfg.head} head"
    if cfg.trainable == "lora":
        return f"LoRA r={cfg.lora_rank} + {cfg.head} head"
    return f"{cfg.trainable} + {cfg.head} head"


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
        f"({pre.get('kind', '?')}), trains {_trained_part(cfg)}, outputs in {plan.out}/"
    )
    from ferry.server.app import build_server_app
    from flwr.simulation import run_simulation

    if client_app is None:
        from ferry.client.app import app as client_app

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
    )
    return summary
