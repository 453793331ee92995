"""The ServerApp's simulation path: a :class:`FederationPlan` for virtual institutions.

``ferry simulate`` (:mod:`simulations.runner`) and ``flwr run .`` (:mod:`server.app`, a run
config without ``mode = "deployment"``) plan a simulated federation here: the run config
names the scenario's built-in data or ``--data``, which this process reads to check what can
be checked before Ray starts (config, backbone, data, delta < 1/n for every partition, output
directory), so bad input fails in a second with one line instead of inside a worker. A
deployment's plan is :mod:`server.deployment`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ferry.common.backbones.registry import backbone_spec
from ferry.common.config import RunConfig
from ferry.common.data.datasets import DataSpec, load_dataset, partition_sizes
from ferry.common.data.partition import natural_groups
from ferry.common.errors import FerryError
from ferry.common.message_fields import INSTITUTION_NAME
from ferry.common.model import initial_trainable_arrays, out_dim
from ferry.common.paths import ferry_home
from ferry.common.scenarios import with_base_rates, with_scenario_defaults
from ferry.common.training_defaults import check_feasible, trainable_size
from ferry.server.aggregation import rule_named
from ferry.server.backbone_source import choose_training, resolve_backbone
from ferry.server.federation import FederationPlan
from ferry.server.outputs import prepare_out_dir


def plan_simulation(
    settings: dict | RunConfig, num_clients: int | None = None, log=print
) -> FederationPlan:
    """The round loop's plan for ``settings`` (a RunConfig, or ``flwr run``'s run config),
    with ``num_clients`` virtual institutions when given; every check before Ray starts."""
    cfg = settings if isinstance(settings, RunConfig) else RunConfig.from_mapping(settings)
    if num_clients is not None:
        cfg = dataclasses.replace(cfg, clients=num_clients)
    cfg = with_scenario_defaults(cfg.validate())
    rule_named(cfg.aggregation)  # an own rule (package.module:function) must import
    if not cfg.ray_address and (cfg.gpus_per_client > 0 or cfg.device.startswith("cuda")):
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
        class_names=tuple(dataset.classes) if cfg.task == "classification" else (),
        institution_names=_group_names(spec, dataset, log),
    )


def _group_names(spec: DataSpec, dataset, log) -> tuple[str, ...]:
    """A natural split's group values, in partition order, as the institutions' names, when
    each is a plain name (one usable as a folder); () otherwise (the scenario's names)."""
    if spec.partition != "natural" or dataset.groups is None:
        return ()
    names = tuple(natural_groups(dataset.groups))
    if all(INSTITUTION_NAME.fullmatch(n) for n in names):
        return names
    log("institutions named by partition number: a group value is not a plain name")
    return ()
