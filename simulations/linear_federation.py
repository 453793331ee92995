"""Training settings chosen on public data: a federation of DP linear heads run in-process.

``ferry tune`` (:mod:`simulations.tune`) and the K-curve benchmark
(:mod:`simulations.bench.kcurve_bench`) need to
train hundreds of federations (a grid of batch sizes, epochs, rounds and learning rates at
several ε) on data that costs no privacy: the backbone's public pretraining source, a public
split the operator names, or a benchmark's data. A Flower simulation costs a Ray start and
tens of seconds per run; this module runs the same mechanism in one process instead:

* features: the frozen backbone's outputs for every record, computed once
  (:func:`extract_features`) with the manifest's preprocessing, as a client computes them;
* partitions and the held-out split: :func:`common.data.datasets` exactly as ``ferry
  simulate`` splits the data (the pooled held-out records are the evaluation set);
* per institution and round: σ from the run's (ε, δ), q = 1/⌈n/B⌉ and the planned steps
  (:func:`common.privacy.accounting.noise_multiplier_for_target`), then
  :func:`client.linear_dp.train_linear`, the DP-SGD every Ferry client runs for a linear head;
* per round: :func:`server.aggregation.aggregate_updates` with the run's default policy.

It differs from a deployment only where it does not matter to a comparison of settings:
masks and noise come from a seeded generator (so two settings see the same randomness), and
σ may be derived with the RDP accountant (``accountant="rdp"``: a safe upper bound on the
PRV σ clients derive, seconds faster per derivation; every setting compared gets the same).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ferry.client.linear_dp import train_linear
from ferry.common.config import RunConfig
from ferry.common.data.datasets import DataSpec, _split, load_dataset
from ferry.common.data.preprocess import preprocess
from ferry.common.errors import FerryError
from ferry.common.metrics import binary_auc
from ferry.common.privacy.accounting import noise_multiplier_for_target
from ferry.common.scenarios import with_scenario_defaults
from ferry.common.serialization import instantiate
from ferry.common.training_defaults import round_plan
from ferry.server.aggregation import AggregationPolicy, aggregate_updates


@dataclass(frozen=True)
class TrainingSettings:
    """What a run tunes: the expected batch size B (per institution, or a fraction of its
    training examples when ``batch_fraction`` > 0), local epochs per round, rounds and the
    SGD learning rate (of the mean clipped gradient)."""

    batch_size: int
    local_epochs: int
    rounds: int
    lr: float

    def label(self) -> str:
        return f"B={self.batch_size} E={self.local_epochs} R={self.rounds} lr={self.lr:g}"


@dataclass
class FeatureSet:
    """Every record's frozen features, its label, and the splits of ``ferry simulate``."""

    x: torch.Tensor  # (records, features) float32
    y: torch.Tensor  # int64 class ids (classification) or float32 targets
    task: str
    num_classes: int
    cfg: RunConfig  # the data settings (scenario defaults applied)
    input_shape: tuple[int, ...]
    _splits: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = dataclasses.field(
        default_factory=dict
    )
    split: str = "target"  # "source": the scenario's pretraining source task (synthetic)

    @property
    def head_size(self) -> int:
        """p: the values a linear head on these features trains (weights and biases)."""
        return (int(self.x.shape[1]) + 1) * self.num_classes

    def splits(self, clients: int, partition: str | None = None, alpha: float | None = None):
        """[(train index, held-out index)] per institution, as ``ferry simulate`` splits the
        same data among ``clients`` institutions."""
        cfg = dataclasses.replace(
            self.cfg,
            clients=clients,
            partition=partition or self.cfg.partition,
            alpha=self.cfg.alpha if alpha is None else alpha,
        )
        key = (clients, cfg.partition, cfg.alpha)
        if key not in self._splits:
            spec = DataSpec.from_run(cfg, clients, self.input_shape)
            self._splits[key] = _split(spec, self.split)
        return self._splits[key]


def extract_features(
    cfg: RunConfig, artifact, batch: int = 256, log=print, split: str = "target"
) -> FeatureSet:
    """The frozen backbone's features for every record of ``cfg``'s data (its scenario's
    built-in data or ``--data``), preprocessed as the manifest says. ``split`` "source": the
    scenario's built-in pretraining source task instead (:func:`source_config`)."""
    cfg = with_scenario_defaults(cfg)
    if split == "source":
        cfg = source_config(cfg)
    shape = tuple(artifact.manifest["input_shape"])
    dataset = load_dataset(DataSpec.from_run(cfg, 1, shape), split)
    model = instantiate(artifact).eval()
    pre = artifact.manifest["preprocessing"]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            x = preprocess(dataset.x[start : start + batch], pre)
            chunks.append(model(torch.from_numpy(np.ascontiguousarray(x))).float())
            if log and len(dataset) > 4 * batch and start % (8 * batch) == 0:
                log(f"  features: {start + len(x):,}/{len(dataset):,} records")
    y = torch.from_numpy(np.asarray(dataset.y))
    return FeatureSet(
        x=torch.cat(chunks).reshape(len(dataset), -1).contiguous(),
        y=y.long() if dataset.task == "classification" else y.float(),
        task=dataset.task,
        num_classes=dataset.num_classes,
        cfg=dataclasses.replace(cfg, task=dataset.task),
        input_shape=shape,
        split=split,
    )


def source_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` (scenario defaults applied) reading the scenario's synthetic pretraining source
    task: no ``--data``, and its own labels (the preset's class list names the institutions'
    task, not the source's)."""
    return dataclasses.replace(cfg, data="", classes="", base_rates="")


@dataclass(frozen=True)
class Privacy:
    """The run's privacy: ε = None is non-private."""

    epsilon: float | None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"


def _sigma(privacy: Privacy, q: float, steps: int) -> float:
    if privacy.epsilon is None:
        return 0.0
    return noise_multiplier_for_target(privacy.epsilon, privacy.delta, q, steps, privacy.accountant)


def batch_for(
    settings: TrainingSettings,
    n: int,
    resolve: Callable[[int, int], int] | None,
    params: int = 1,
) -> int:
    """The expected batch an institution of ``n`` training examples that trains ``params``
    values uses: ``resolve(n, params)`` (e.g. the default rule), else the setting's."""
    b = resolve(n, params) if resolve else settings.batch_size
    return max(1, min(int(b), n))


def run_federation(
    features: FeatureSet,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    settings: TrainingSettings,
    privacy: Privacy,
    seed: int = 0,
    batch_rule: Callable[[int, int], int] | None = None,
    class_weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Train a linear head over ``splits`` (FedAvg, Ferry's default aggregation policy) and
    return its metrics on the pooled held-out records. ``batch_rule``: each institution's
    expected batch from its own n and the head's size p (``settings.batch_size`` otherwise),
    e.g. :func:`common.training_defaults.rule_batch_size`."""
    if features.task != "classification":
        raise FerryError("tuning covers classification tasks only (for now)")
    gen = torch.Generator().manual_seed(seed)
    dim, k = features.x.shape[1], features.num_classes
    torch.manual_seed(seed)
    head = torch.nn.Linear(dim, k)
    current = {
        "weight": head.weight.detach().numpy().copy(),
        "bias": head.bias.detach().numpy().copy(),
    }
    plans = []
    for i, (train, _) in enumerate(splits):
        n = len(train)
        b = batch_for(settings, n, batch_rule, features.head_size)
        q, steps = round_plan(n, b, settings.local_epochs)
        plans.append(
            (
                f"i{i}",
                torch.from_numpy(train),
                q,
                steps,
                _sigma(privacy, q, steps * settings.rounds),
            )
        )
    policy = AggregationPolicy()
    for _ in range(settings.rounds):
        updates = []
        for name, idx, q, steps, sigma in plans:
            layer = torch.nn.Linear(dim, k)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(current["weight"]))
                layer.bias.copy_(torch.from_numpy(current["bias"]))
            train_linear(
                layer,
                features.x[idx],
                features.y[idx],
                noise_multiplier=sigma,
                max_grad_norm=privacy.max_grad_norm,
                sample_rate=q,
                steps=steps,
                lr=settings.lr,
                task="classification",
                private=privacy.epsilon is not None,
                generator=gen,
                class_weights=class_weights,
            )
            arrays = {
                "weight": layer.weight.detach().numpy().copy(),
                "bias": layer.bias.detach().numpy().copy(),
            }
            if not all(np.isfinite(a).all() for a in arrays.values()):
                diverged = {"accuracy": math.nan, "balanced_accuracy": math.nan}
                return diverged | ({"roc_auc": math.nan} if k == 2 else {})
            updates.append((name, arrays, float(len(idx))))
        current = aggregate_updates(current, updates, policy).arrays
    test = np.concatenate([t for _, t in splits])
    return evaluate(current, features.x[test].numpy(), features.y[test].numpy(), k)


def evaluate(arrays: dict, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and (two classes) ROC AUC of a linear head."""
    logits = x.astype(np.float64) @ arrays["weight"].T.astype(np.float64) + arrays["bias"]
    pred = logits.argmax(axis=1)
    recalls = [float((pred[y == c] == c).mean()) for c in range(num_classes) if (y == c).any()]
    out = {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(recalls))}
    if num_classes == 2:
        out["roc_auc"] = float(binary_auc(y, logits[:, 1] - logits[:, 0]))
    return out


def mean_metrics(runs: Iterable[dict[str, float]]) -> dict[str, float]:
    runs = list(runs)
    keys = runs[0].keys()
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}


def repeated(
    features: FeatureSet,
    splits,
    settings: TrainingSettings,
    privacy: Privacy,
    repeats: int,
    first_seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """:func:`run_federation` averaged over ``repeats`` seeds of the DP randomness."""
    return mean_metrics(
        run_federation(features, splits, settings, privacy, seed=s, **kwargs)
        for s in range(first_seed, first_seed + repeats)
    )


def finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


# The grid ``ferry tune`` and the K-curve benchmark search: expected batch size, (rounds,
# local epochs) and learning rate. Batch sizes above an institution's n are capped at n.
GRID_BATCH = (64, 128, 256, 512)
GRID_SCHEDULE = ((5, 1), (5, 3), (6, 5))  # (rounds, local epochs)
GRID_LR = (0.25, 0.5, 1.0, 2.0)


def grid(
    batches: Sequence[int] = GRID_BATCH,
    schedules: Sequence[tuple[int, int]] = GRID_SCHEDULE,
    lrs: Sequence[float] = GRID_LR,
) -> list[TrainingSettings]:
    return [TrainingSettings(b, e, r, lr) for (r, e) in schedules for b in batches for lr in lrs]


@dataclass
class SearchResult:
    best: TrainingSettings
    best_metrics: dict[str, float]
    screened: list[tuple[TrainingSettings, dict[str, float]]]  # every grid point, 1 seed
    confirmed: list[tuple[TrainingSettings, dict[str, float]]]  # the top ones, ``repeats`` seeds


def grid_search(
    features: FeatureSet,
    splits,
    privacy: Privacy,
    settings: Sequence[TrainingSettings] | None = None,
    metric: str = "accuracy",
    repeats: int = 3,
    top: int = 4,
    log=None,
    **kwargs,
) -> SearchResult:
    """Every grid point once (seed 0), then the ``top`` best again over ``repeats`` seeds;
    the best is the one with the highest mean ``metric`` over those seeds (a single noisy
    run would favour luck). Points whose batch exceeds every institution's n are skipped
    (the same as the point at the largest n)."""
    largest = max(len(t) for t, _ in splits)
    points, seen = [], set()
    for s in settings or grid():
        key = (min(s.batch_size, largest), s.local_epochs, s.rounds, s.lr)
        if key not in seen:
            seen.add(key)
            points.append(s)
    screened = []
    for i, s in enumerate(points):
        m = run_federation(features, splits, s, privacy, seed=0, **kwargs)
        screened.append((s, m))
        if log and (i + 1) % 20 == 0:
            log(f"  {i + 1}/{len(points)} settings tried")
    ranked = sorted(screened, key=lambda sm: -finite_or(sm[1][metric], -1.0))[:top]
    confirmed = [  # fresh seeds: seed 0 chose them
        (s, repeated(features, splits, s, privacy, repeats, first_seed=1, **kwargs))
        for s, _ in ranked
    ]
    best, best_metrics = max(confirmed, key=lambda sm: finite_or(sm[1][metric], -1.0))
    return SearchResult(best, best_metrics, screened, confirmed)
