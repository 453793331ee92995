"""Trainable-part benchmark: per part, the DP step against the non-private step on the same tail,
the bytes that travel per round, and the parameters trained.

Each part runs on a backbone it applies to: ``ferry-cnn`` (1x32x32) for ``head``,
``last-block`` and ``conv-adapter``; the registry's ``vit_b_16`` at a small resolution for
``lora`` (its default targets: Q/V projections and MLP Linears of the last two blocks). Weights
are random: speed does not depend on them. The trunk runs once over the same images (the
cached split-point activations, as Ferry's client caches them); then every step reads a batch
of cached activations and runs the tail: forward, loss, backward, optimizer step. Non-private
SGD, Opacus flat clipping (per-example gradients) and Opacus ghost clipping, each set up by the
client's own :func:`client.dp_trainer.setup_round`, take turns step by step on identical copies
of the tail, so machine load drifts equally over all three; each
time is the median of the timed steps after warm-up, and ratios are within one run.

Run: ``python -m simulations.bench.trainable_bench [--quick]``; :func:`rows` returns the
measurements for BENCHMARKS.md (:mod:`simulations.bench.trainable_tables` formats them).

``--federated`` adds what each part buys at the same privacy budget: a ``ferry simulate`` run
per part (:func:`federated_rows`) at ε = 3 on the ``hospital-imaging`` synthetic scenario, the
three ``ferry-cnn`` parts on a trunk pretrained with ``ferry pretrain`` on the scenario's
source task, LoRA on ``vit_b_16`` at 32x32 with random weights (no ViT weights are on this
machine and pretraining an 86M-parameter ViT does not fit the budget, so its accuracy shows
only that it runs). Each row pairs the run's accuracy and traffic with the step-time ratio
measured here on the same tail (same backbone, input size, part and class count); the table
goes to ``BENCHMARKS.md`` (:data:`FEDERATED_HEADING`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ferry.client.dp_trainer import DPTrainConfig, setup_round, train_tail
from ferry.common.backbones import build_backbone
from ferry.common.backbones.registry import backbone_spec
from ferry.common.trainable import TrainableSpec, split_model, trainable_state
from ferry.simulations.bench.report import record_section
from ferry.simulations.bench.trainable_tables import FEDERATED_HEADING, render, render_federated

PARTS = (
    ("head", "ferry-cnn"),
    ("last-block", "ferry-cnn"),
    ("conv-adapter", "ferry-cnn"),
    ("lora", "vit_b_16"),
)
TARGET = {"head": 1.3, "lora": 1.3}  # DP step / non-private step
MODES = ("non-private", "flat", "ghost")


def _setup(tail: nn.Module, mode: str, batch: int):
    """(model, optimizer, criterion) for one mode, on its own copy of ``tail``, as Ferry's
    client sets up a round (:func:`client.dp_trainer.setup_round`: Opacus' engine with its
    clipping and secure-mode noise, or plain SGD); the steps are timed on these."""
    cfg = DPTrainConfig(
        noise_multiplier=0.0 if mode == "non-private" else 1.0,
        max_grad_norm=1.0,
        batch_size=batch,
        lr=0.1,
        non_private=mode == "non-private",
        clipping="ghost" if mode == "ghost" else "flat",
    )
    setup = setup_round(copy.deepcopy(tail), cfg, batch * 4)
    return setup.model, setup.optimizer, setup.criterion


def _step(setup, acts: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    model, optimizer, criterion = setup
    start = time.perf_counter()
    xb, yb = acts[idx], labels[idx]
    optimizer.zero_grad()
    loss = criterion(model(xb), yb)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def bench_part(
    kind: str,
    backbone_name: str,
    image_size: int,
    examples: int,
    batch: int,
    steps: int,
    warmup: int,
    classes: int = 10,
) -> dict:
    """One part on one backbone: step times per mode, bytes and parameters that travel."""
    spec = backbone_spec(backbone_name)
    shape = (spec.input_shape[0], image_size, image_size)
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, shape).eval()
    split = split_model(backbone, spec, TrainableSpec(kind=kind), classes)
    images = torch.rand(examples, *shape)
    with torch.no_grad():
        acts = torch.cat([split.trunk(images[i : i + 64]) for i in range(0, examples, 64)])
    labels = torch.randint(0, classes, (examples,))
    setups = {mode: _setup(split.tail, mode, batch) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' backward-hook notices, once per step
        for i in range(warmup + steps):
            idx = torch.randperm(examples, generator=gen)[:batch].sort().values
            for mode in MODES:
                elapsed = _step(setups[mode], acts, labels, idx)
                if i >= warmup:
                    times[mode].append(elapsed)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    state = trainable_state(split.tail)
    full = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    sent = sum(a.nbytes for a in state.values())
    return {
        "part": kind,
        "backbone": backbone_name,
        "input": "x".join(map(str, shape)),
        "split": split.split or "(features)",
        "activation_shape": "x".join(map(str, acts.shape[1:])),
        "params_trained": sum(a.size for a in state.values()),
        "arrays": len(state),
        "bytes_per_round": sent,
        "full_model_bytes": full + sent,
        "batch": batch,
        "steps_timed": steps,
        "nonprivate_step_ms": median["non-private"] * 1e3,
        "dp_step_ms": median["flat"] * 1e3,
        "ghost_step_ms": median["ghost"] * 1e3,
        "dp_ratio": median["flat"] / median["non-private"],
        "ghost_ratio": median["ghost"] / median["non-private"],
        "target_ratio": TARGET.get(kind),
    }


def client_round(
    kind: str,
    backbone_name: str,
    image_size: int,
    examples: int,
    timed: int,
    warmup: int = 1,
    classes: int = 10,
) -> dict:
    """One client round as Ferry's client runs it (:func:`client.dp_trainer.train_tail` on
    cached split-point activations, a fresh Opacus engine per DP round; a bare linear head
    takes :mod:`client.linear_dp`), DP (σ = 1) against non-private, alternating; medians."""
    spec = backbone_spec(backbone_name)
    shape = (spec.input_shape[0], image_size, image_size)
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, shape).eval()
    split = split_model(backbone, spec, TrainableSpec(kind=kind), classes)
    with torch.no_grad():
        images = torch.rand(examples, *shape)
        acts = torch.cat([split.trunk(images[i : i + 64]) for i in range(0, examples, 64)])
    acts, labels = acts.numpy(), torch.randint(0, classes, (examples,)).numpy()
    configs = {
        "dp": DPTrainConfig(noise_multiplier=1.0, batch_size=32),
        "non-private": DPTrainConfig(noise_multiplier=0.0, batch_size=32, non_private=True),
    }
    times: dict[str, list[float]] = {mode: [] for mode in configs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(warmup + timed):
            for mode, cfg in configs.items():
                tail = copy.deepcopy(split.tail)
                start = time.perf_counter()
                train_tail(tail, acts, labels, cfg)
                if i >= warmup:
                    times[mode].append(time.perf_counter() - start)
    dp, plain = (statistics.median(times[m]) for m in ("dp", "non-private"))
    return {"client_dp_round_s": dp, "client_nonprivate_round_s": plain, "client_ratio": dp / plain}


def rows(quick: bool = False) -> list[dict]:
    """One measured row per trainable part (see the module docstring)."""
    steps, warmup = (15, 3) if quick else (60, 10)
    vit_size = 32 if quick else 64
    return [
        bench_part(
            kind,
            name,
            vit_size if name == "vit_b_16" else 32,
            examples=256 if quick else 1024,
            batch=32,
            steps=steps,
            warmup=warmup,
        )
        for kind, name in PARTS
    ]


@dataclass(frozen=True)
class FederatedSizes:
    """Sizes of :func:`federated_rows`. ``ferry-cnn`` parts run the demo's federation; LoRA on
    a ViT-B runs a smaller one (its trunk pass and DP steps cost ~100x a ferry-cnn's)."""

    rounds: int = 5
    epsilon: float = 3.0
    cnn_clients: int = 10
    cnn_examples: int = 4000
    pretrain_examples: int = 8000
    pretrain_epochs: int = 4
    vit_size: int = 32
    vit_clients: int = 5
    vit_examples: int = 1000
    step_examples: int = 1024
    cnn_steps: tuple[int, int] = (60, 10)  # timed steps, warm-up steps
    vit_steps: tuple[int, int] = (20, 4)
    client_rounds: tuple[int, int] = (5, 3)  # timed client rounds (ferry-cnn, vit_b_16)
    vit_round_examples: int = 256
    seed: int = 0


FEDERATED_FULL = FederatedSizes()
FEDERATED_QUICK = FederatedSizes(
    rounds=2,
    cnn_clients=3,
    cnn_examples=600,
    pretrain_examples=1000,
    pretrain_epochs=1,
    vit_clients=2,
    vit_examples=200,
    step_examples=256,
    cnn_steps=(10, 2),
    vit_steps=(4, 1),
    client_rounds=(1, 1),
    vit_round_examples=64,
)


def _backbone_weights(name: str, sizes: FederatedSizes, work: Path, log) -> Path:
    """ferry-cnn pretrained on the scenario's source task; vit_b_16 at random init."""
    out = work / f"backbone-{name}"
    if out.exists():
        return out
    if name == "vit_b_16":
        from ferry.server.backbone_import import import_backbone

        import_backbone(name, "random", sizes.vit_size, out, lambda *_: None, seed=sizes.seed)
    else:
        from ferry.server.pretrain import PretrainConfig, pretrain

        cfg = PretrainConfig(
            arch=name,
            examples=sizes.pretrain_examples,
            epochs=sizes.pretrain_epochs,
            seed=sizes.seed,
            out=str(out),
        )
        pretrain(cfg, log=log)
    return out


def federated_rows(
    sizes: FederatedSizes = FEDERATED_FULL,
    work: Path | None = None,
    parts: tuple[tuple[str, str], ...] = PARTS,
    log=print,
) -> list[dict]:
    """Per (part, backbone): the step times of :func:`bench_part` on the tail, then a DP
    simulation at ``sizes.epsilon`` training that part; one dict per part. Every step time is
    taken before the first simulation, so no Ray process (or its shutdown) shares the CPU."""
    from ferry.common.config import RunConfig
    from ferry.simulations.bench.transfer_bench import ferry_env
    from ferry.simulations.runner import simulate

    work = Path(work or tempfile.mkdtemp(prefix="ferry-trainable-bench-"))
    steps = {}
    threads = torch.get_num_threads()
    # One thread, as a Ray virtual client with one CPU runs; on shared cores it also keeps
    # intra-op threads from waiting on each other, which made ratios swing between runs.
    torch.set_num_threads(1)
    try:
        for kind, name in parts:
            vit = name == "vit_b_16"
            timed, warmup = sizes.vit_steps if vit else sizes.cnn_steps
            size = sizes.vit_size if vit else 32
            classes = 4  # the hospital-imaging scenario's lesion types
            steps[kind] = bench_part(
                kind, name, size, sizes.step_examples, 32, timed, warmup, classes
            )
            examples = sizes.vit_round_examples if vit else sizes.step_examples
            rounds_timed = sizes.client_rounds[1 if vit else 0]
            steps[kind].update(client_round(kind, name, size, examples, rounds_timed, 1, classes))
    finally:
        torch.set_num_threads(threads)
    measured = []
    with ferry_env(work / "ferry-home"):
        for kind, name in parts:
            vit = name == "vit_b_16"
            clients = sizes.vit_clients if vit else sizes.cnn_clients
            examples = sizes.vit_examples if vit else sizes.cnn_examples
            cfg = RunConfig(
                scenario="hospital-imaging",
                backbone=name,
                weights=str(_backbone_weights(name, sizes, work, log)),
                trainable=kind,
                clients=clients,
                examples=examples,
                rounds=sizes.rounds,
                epsilon=sizes.epsilon,
                batch_size=32,
                seed=sizes.seed,
                out=str(work / "runs" / kind),
            )
            started = time.perf_counter()
            summary = simulate(cfg, log=log)
            seconds = time.perf_counter() - started
            later = summary["bytes"]["per_round"][1:] or summary["bytes"]["per_round"]
            per_round = sum(r["sent"] + r["received"] for r in later) / len(later)
            measured.append(
                {
                    **steps[kind],
                    "clients": clients,
                    "examples": examples,
                    "rounds": summary["rounds_completed"],
                    "pretraining": summary["backbone"]["pretraining"].get("kind", "?"),
                    "accuracy": summary["final"].get("accuracy"),
                    "balanced_accuracy": summary["final"].get("balanced_accuracy"),
                    "max_epsilon": summary["privacy"]["max_epsilon"],
                    "trained_bytes": summary["bytes"]["head_bytes"],
                    "bytes_per_round_after_1": per_round,
                    "bytes_per_round_per_client": per_round / clients,
                    "lr": summary["run"]["lr"],
                    "run_wall_s": summary["wall_time_s"],
                    "simulate_s": seconds,
                    "sizes": asdict(sizes),
                }
            )
    return measured


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--federated", action="store_true", help="also simulate each part at ε = 3")
    parser.add_argument("--work", help="directory for backbones and runs (--federated)")
    parser.add_argument(
        "--benchmarks",
        help="markdown file for the --federated table (default: BENCHMARKS.md for a full run, "
        "none for --quick; '' = none)",
    )
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    command = "python -m simulations.bench.trainable_bench" + (" --quick" if args.quick else "")
    if not args.federated:
        measured = rows(args.quick)
        print(render(measured, command))
        return measured
    started = time.perf_counter()
    sizes = FEDERATED_QUICK if args.quick else FEDERATED_FULL
    measured = federated_rows(sizes, Path(args.work) if args.work else None)
    command = command.replace("trainable_bench", "trainable_bench --federated")
    table = render_federated(measured, command, time.perf_counter() - started)
    print(table)
    record_section(args.benchmarks, args.quick, FEDERATED_HEADING, table, load_before)
    return measured


if __name__ == "__main__":
    main()
