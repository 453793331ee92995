"""The run options every command that reads a :class:`~common.config.RunConfig` shares: one
``--flag`` per RunConfig field (help text below), and the config a command runs with (a TOML
``--config FILE`` overridden by the options given, validated once, here at the edge)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from ferry.common.config import RunConfig, read_toml
from ferry.common.errors import FerryError

# The run options that say where data comes from and how it is read (`ferry pretrain`).
DATA_OPTIONS = (
    "scenario",
    "data",
    "label_column",
    "categorical",
    "task",
    "date_column",
    "value_columns",
    "window",
    "horizon",
    "smiles_column",
    "skip_unreadable",
)


# The run options `ferry tune` takes (--clients and --epsilon are its own: a K and an ε list).
TUNE_OPTIONS = DATA_OPTIONS + (
    "classes",
    "base_rates",
    "delta",
    "max_grad_norm",
    "partition",
    "partition_column",
    "alpha",
    "examples",
    "test_fraction",
    "seed",
)


# The choices `--help` lists without importing them (torch, pandas): tests/test_cli_help.py
# checks them against the registries.
SCENARIOS = ("bank-credit", "bank-stocks", "drug-activity", "hospital-imaging", "hospital-tabular")
BACKBONES = (
    "convnext_tiny",
    "efficientnet_b0",
    "efficientnet_lite0",
    "ferry-cnn",
    "mobilenet_v3_large",
    "molecule-mlp",
    "resnet18",
    "resnet50",
    "series-cnn",
    "series-gru",
    "tabular-mlp",
    "vit_b_16",
)

# One line of help per RunConfig field (each command shows its own default after it, unless
# the line says it).
HELP = {
    "scenario": f"scenario preset: {', '.join(SCENARIOS)}",
    "data": "your data file or folder (format per scenario); default: the scenario's "
    "synthetic data",
    "clients": "number of virtual institutions",
    "rounds": "federated rounds (default: DP-aware, see --batch-size)",
    "fraction_train": "fraction of clients sampled per round",
    "epsilon": "target ε per institution for the whole run",
    "delta": "δ (must be below 1/n for every institution)",
    "noise_multiplier": "σ; default: derived per institution from --epsilon/--delta",
    "max_grad_norm": "per-example clipping norm C",
    "non_private": "allow σ = 0 and mark the run non-private (no DP guarantee)",
    "budget_epsilon": "each virtual institution's own ε budget (default: --epsilon)",
    "budget_delta": "each virtual institution's own δ budget (default: --delta)",
    "min_clients": "end the run when fewer institutions with budget left remain",
    "aggregation": "how updates are combined: fedavg, trimmed-mean, median or krum (each "
    "with bounded influence; the robust ones need --min-clients 3, or 5 for krum)",
    "weight_cap": "no institution weighs more than this many times the median claimed "
    "example count (training and evaluation)",
    "max_update_norm": "L2 bound on each update's change; 0 = adaptive, twice the round's "
    "median change norm",
    "local_epochs": "local epochs per round (default: DP-aware, see --batch-size)",
    "batch_size": "expected (Poisson) batch size (default: each institution's from its n; "
    "left out, this, --local-epochs, --rounds and --lr come from `ferry tune` on public "
    "data, else from a DP-aware rule; the values used are printed and recorded)",
    "lr": "SGD learning rate of the trained part (default: DP-aware, see --batch-size)",
    "head": "trainable head: linear or mlp",
    "trainable": "what institutions train: head, lora, conv-adapter or last-block",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA scaling alpha (the update is scaled by alpha / r)",
    "lora_targets": "comma-separated Linear layer name patterns for LoRA (default: the backbone's)",
    "adapter_dim": "bottleneck width of conv adapters",
    "clipping": "per-example clipping: flat, or ghost (Opacus ghost clipping, less memory)",
    "backbone": f"backbone: {', '.join(BACKBONES)}, or your own as package.module:builder "
    "(default: the scenario's)",
    "label_column": "tabular / molecule data: the column to predict",
    "categorical": "tabular data: comma-separated columns to treat as categories",
    "task": "auto, classification or regression (auto: from the label column)",
    "classes": "the public class list, comma-separated in class-id order; every record's "
    "label is mapped by it (default: the scenario's built-in classes, or those in --data)",
    "base_rates": "each class's public frequency, comma-separated in class-id order (e.g. "
    "0.92,0.08): clipped gradients are weighted by min(rates)/rate so the rare class is "
    "predicted; same mechanism and ε (default: the preset's rates with its built-in data; "
    "off = none)",
    "test_from": "price series: the public held-out cutoff date YYYY-MM-DD (default: the "
    "latest --test-fraction of the dates in --data)",
    "date_column": "price series: the date column",
    "value_columns": "price series: comma-separated price columns (default: all numeric)",
    "window": "price series: days of past returns per example",
    "horizon": "price series: predict the return over the next N days",
    "smiles_column": "molecules: the SMILES column",
    "skip_unreadable": "skip unreadable images / invalid molecules (and report how many)",
    "partition": "how to split data among virtual institutions: iid, dirichlet, quantity, "
    "natural (default: the scenario's)",
    "partition_column": "natural split: the column naming each example's institution",
    "weights": "pretrained backbone (a `ferry pretrain` output), or 'random'",
    "alpha": "Dirichlet label-skew concentration (smaller = more non-IID)",
    "examples": "synthetic examples in total",
    "test_fraction": "held-out fraction per institution, for federated evaluation",
    "seed": "random seed",
    "device": "where clients compute: auto (CUDA if visible), cpu, cuda, cuda:N",
    "max_physical_batch": "split Poisson batches into physical ones of this size (0 = off)",
    "cpus_per_client": "CPUs per virtual client (Ray); sets how many run at once",
    "gpus_per_client": "GPUs per virtual client (Ray), e.g. 0.25 = four share a GPU",
    "ray_address": "join an existing Ray cluster ('auto' or HOST:PORT)",
    "out": "output directory (default runs/sim-<time>)",
}


def add_run_options(p: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    """One option per RunConfig field (``only``: just those), each defaulting to None so that
    :func:`run_config` can tell what was given."""
    defaults = RunConfig()
    for f in fields(RunConfig):
        if only and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool":
            p.add_argument(flag, action="store_const", const=True, default=None, help=HELP[f.name])
        else:
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
                f.type, str
            )
            shown = default if default not in ("", None) else "-"
            text = HELP[f.name]
            p.add_argument(
                flag,
                type=kind,
                default=None,
                metavar=f.name.upper(),
                help=text if "default" in text else f"{text} (default: {shown})",
            )


def run_config(args: argparse.Namespace, only: tuple[str, ...] = ()) -> RunConfig:
    """The validated RunConfig of a command: ``--config`` FILE's values, overridden by the
    options given; ``only``: the options this command takes (a FILE setting others is refused)."""
    values: dict = {}
    if args.config:
        values.update(read_toml(Path(args.config)))
    if only:
        unknown = sorted(set(values) - set(only))
        if unknown:
            raise FerryError(
                f"{args.config} sets {', '.join(unknown)}, which pretraining does not use: "
                f"keep only {', '.join(only)}"
            )
    for f in fields(RunConfig):
        value = getattr(args, f.name, None) if not only or f.name in only else None
        if value is not None:
            values[f.name] = value
    return RunConfig.from_mapping(values).validate()
