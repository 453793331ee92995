"""Trainable-part benchmark: per part, the DP step against the non-private step on the same tail,
the bytes that travel per round, and the parameters trained.

Each part runs on a backbone it applies to: ``ferry-cnn`` (1x32x32) for ``head``,
``last-block`` and ``conv-adapter``; the registry's ``vit_b_16`` at a small resolution for
``lora`` (its default targets: Q/V projections and MLP Linears of the last two blocks). Weights
are random: speed does not depend on them. The trunk runs once over the same images (the
cached split-point activations, as Ferry's client caches them); then every step reads a batch
of cached activations and runs the tail: forward, loss, backward, optimizer step. Non-private
SGD, Opacus flat clipping (per-example gradients) and Opacus ghost clipping take turns step by
step on identical copies of the tail, so machine load drifts equally over all three; each
time is the median of the timed steps after warm-up, and ratios are within one run.

Run: ``python -m simulations.bench.trainable_bench [--quick]``; :func:`rows` returns the
measurements for BENCHMARKS.md (:func:`render` formats them).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.backbones import build_backbone
from common.backbones.registry import backbone_spec
from common.trainable import TrainableSpec, set_train_mode, split_model, trainable_state

PARTS = (
    ("head", "ferry-cnn"),
    ("last-block", "ferry-cnn"),
    ("conv-adapter", "ferry-cnn"),
    ("lora", "vit_b_16"),
)
TARGET = {"head": 1.3, "lora": 1.3}  # DP step / non-private step
MODES = ("non-private", "flat", "ghost")


def _setup(tail: nn.Module, mode: str, batch: int):
    """(model, optimizer, criterion) for one mode, on its own copy of ``tail``."""
    tail = copy.deepcopy(tail)
    optimizer = torch.optim.SGD([p for p in tail.parameters() if p.requires_grad], lr=0.1)
    criterion = nn.CrossEntropyLoss()
    set_train_mode(tail)
    if mode == "non-private":
        return tail, optimizer, criterion
    from opacus import PrivacyEngine

    loader = DataLoader(TensorDataset(torch.zeros(batch * 4)), batch_size=batch)  # unused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = PrivacyEngine(accountant="prv").make_private(
            module=tail,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost" if mode == "ghost" else "hooks",
        )
    if mode == "ghost":
        model, optimizer, criterion, _ = private
    else:
        model, optimizer, _ = private
    set_train_mode(model._module)
    return model, optimizer, criterion


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


def render(measured: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`. Batch {measured[0]['batch']}, median of "
        f"{measured[0]['steps_timed']} steps after warm-up; DP = Opacus per-example clipping "
        "(flat), ghost = Opacus ghost clipping; σ = 1, C = 1, 10 classes.",
        "",
        "| part | backbone (input) | split-point activations | params trained | bytes per "
        "round (share of full model) | non-private step | DP step (ratio) | ghost step (ratio) "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        target = f"≤ {r['target_ratio']}×" if r["target_ratio"] else "—"
        share = 100 * r["bytes_per_round"] / r["full_model_bytes"]
        lines.append(
            f"| {r['part']} | {r['backbone']} ({r['input']}) | {r['split']}: "
            f"{r['activation_shape']} | {r['params_trained']:,} | {r['bytes_per_round']:,} B "
            f"({share:.2f}%) | {r['nonprivate_step_ms']:.2f} ms | {r['dp_step_ms']:.2f} ms "
            f"(**{r['dp_ratio']:.2f}×**) | {r['ghost_step_ms']:.2f} ms ({r['ghost_ratio']:.2f}×) "
            f"| {target} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    measured = rows(args.quick)
    command = "python -m simulations.bench.trainable_bench" + (" --quick" if args.quick else "")
    print(render(measured, command))
    return measured


if __name__ == "__main__":
    main()
