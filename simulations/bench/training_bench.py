"""Training benchmarks, each a ratio measured in one run on one machine.

(a) DP head training on cached features vs Opacus running the frozen backbone every step:
    ResNet-18 trunk (random weights: speed does not depend on them), the same images, the
    same Poisson-sampled DP-SGD steps; Ferry's cost includes the one-off feature extraction,
    amortised over the rounds of a run.
(b) DP vs non-private head training on the same cached features and the same number of
    steps, each round a fresh Opacus PrivacyEngine as Ferry's client does.
(d) Bytes per round per client: the trainable head's arrays vs the full model's.

Run: ``python -m simulations.bench.training_bench [--quick]`` (or ``ferry bench``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ferry.client.dp_trainer import DPTrainConfig, train_head
from ferry.client.feature_cache import extract


def _resnet18_trunk() -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    return model.requires_grad_(False).eval()


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (imports, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_cached_vs_backbone(examples: int, size: int, rounds: int, classes: int = 4) -> dict:
    """(a): per-round time of Opacus with the trunk in the loop vs on cached features."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    images = torch.rand(examples, 3, size, size)
    labels = torch.randint(0, classes, (examples,))
    trunk = _resnet18_trunk()
    cfg = DPTrainConfig(noise_multiplier=1.0, batch_size=32, local_epochs=1, lr=0.5)

    def naive_round() -> None:
        head = nn.Linear(512, classes)
        model = nn.Sequential(trunk, head)
        loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.batch_size)
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, loader = PrivacyEngine(accountant="prv").make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
            )
        model.train()  # Opacus captures activations of modules in train mode only...
        model._module[0].eval()  # ...but the frozen trunk's BatchNorm must stay in eval mode
        for xb, yb in loader:
            opt.zero_grad()
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb) if len(yb) else out.sum() * 0
            loss.backward()
            opt.step()

    start = time.perf_counter()
    features = extract(trunk, images.numpy(), {"mean": 0.0, "std": 1.0})
    extraction = time.perf_counter() - start
    y = labels.numpy()

    def cached_round() -> None:
        train_head(nn.Linear(512, classes), features, y, cfg)

    naive = _timed(naive_round, 1)
    cached = _timed(cached_round, 3)
    ferry = cached + extraction / rounds
    return {
        "examples": examples,
        "image_size": size,
        "rounds_amortised": rounds,
        "naive_round_s": naive,
        "cached_round_s": cached,
        "feature_extraction_s": extraction,
        "speedup_head_only": naive / cached,
        "speedup_with_extraction": naive / ferry,
    }


def bench_dp_vs_nonprivate(
    examples: int, dim: int = 512, classes: int = 4, repeats: int = 20
) -> dict:
    """(b): one round of DP head training vs the same steps without DP."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, dim)).astype(np.float32)
    y = rng.integers(0, classes, examples)
    dp = DPTrainConfig(noise_multiplier=1.0, batch_size=32, local_epochs=1, lr=0.5)
    plain = DPTrainConfig(
        noise_multiplier=0.0, batch_size=32, local_epochs=1, lr=0.5, non_private=True
    )
    t_dp = _timed(lambda: train_head(nn.Linear(dim, classes), x, y, dp), repeats)
    t_plain = _timed(lambda: train_head(nn.Linear(dim, classes), x, y, plain), repeats)
    return {
        "examples": examples,
        "dp_round_s": t_dp,
        "nonprivate_round_s": t_plain,
        "ratio": t_dp / t_plain,
    }


def bench_bytes(classes: int = 10) -> dict:
    """(d): head arrays vs the full ResNet-18 + head, per round per client."""
    trunk = _resnet18_trunk()
    head = nn.Linear(512, classes)
    head_bytes = sum(t.numel() * t.element_size() for t in head.state_dict().values())
    full = head_bytes + sum(t.numel() * t.element_size() for t in trunk.state_dict().values())
    return {"head_bytes": head_bytes, "full_model_bytes": full, "ratio": head_bytes / full}


def run(quick: bool) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    examples, size = (200, 64) if quick else (500, 96)
    return {
        "a_cached_vs_backbone": bench_cached_vs_backbone(examples, size, rounds=5),
        "b_dp_vs_nonprivate": bench_dp_vs_nonprivate(examples, repeats=5 if quick else 20),
        "d_bytes": bench_bytes(),
    }


def render(results: dict, command: str) -> str:
    a, b, d = (results[k] for k in ("a_cached_vs_backbone", "b_dp_vs_nonprivate", "d_bytes"))
    return f"""Command: `{command}`

| | measured | target |
|---|---|---|
| (a) DP head round, Opacus running the frozen ResNet-18 every step vs cached features ({a["examples"]} images {a["image_size"]}×{a["image_size"]}) | **{a["speedup_head_only"]:.0f}×** faster on cached features ({a["naive_round_s"]:.2f} s vs {a["cached_round_s"] * 1000:.0f} ms per round); **{a["speedup_with_extraction"]:.1f}×** with the one-off extraction ({a["feature_extraction_s"]:.2f} s) amortised over {a["rounds_amortised"]} rounds | ≥ 20× |
| (b) DP vs non-private head round on the same cached features ({b["examples"]} examples, same steps) | **{b["ratio"]:.2f}×** ({b["dp_round_s"] * 1000:.1f} ms vs {b["nonprivate_round_s"] * 1000:.1f} ms) | ≤ 1.3× |
| (d) bytes per round per client, ResNet-18 + linear head (10 classes): head vs full model | **{d["ratio"] * 100:.3f}%** ({d["head_bytes"]:,} B vs {d["full_model_bytes"]:,} B) | ≤ 1% |
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.quick)
    print(
        render(
            results,
            "python -m simulations.bench.training_bench" + (" --quick" if args.quick else ""),
        )
    )
    return results


if __name__ == "__main__":
    main()
