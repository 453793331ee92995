"""DP-SGD training of a model's trainable tail on cached split-point activations, with Opacus.

Mechanism per round (unit of privacy: one local example): Poisson sampling with rate
``q = 1 / ceil(n / batch_size)`` (expected batch ``n * q``), per-example clipping of the
gradient of the tail's trainable parameters to ``max_grad_norm``, Gaussian noise
``noise_multiplier * max_grad_norm`` per step, for ``local_epochs * ceil(n / batch_size)``
steps. The segment actually executed is read back from Opacus' accountant and returned, so the
reported mechanism is the one that ran. ``clipping="ghost"`` computes the same clipped sum
with Opacus' ghost clipping (per-example gradient norms without per-example gradients: less
memory); the mechanism, and so the accounting, is the same. A bare linear head under flat
clipping runs the same mechanism vectorised (:mod:`client.linear_dp`, checked against
Opacus' per-example gradients in tests), without Opacus' fixed per-step cost; its segment is
the one its loop ran.

Class weights (``DPTrainConfig.class_weights``, from the run's public ``--base-rates``: see
:mod:`client.linear_dp`): each example's gradient is multiplied by its class's weight in
[0, 1] *after* clipping, so it adds at most C and the mechanism, hence the accounting, is the
unweighted one. Flat clipping scales Opacus' per-example clip factors; ghost clipping its
clip coefficients (both :mod:`client.weighted_clipping`); the linear fast path its clipped
factors; a non-private round (no clip) weights the per-example losses.

Randomness (:mod:`client.dp_randomness`): Poisson sampling and noise come from generators
seeded from this institution's OS entropy afresh each round (sampling on the CPU, where
Opacus' sampler draws; noise on the parameters' device), never from anything the server
sends; Opacus' noise is drawn in its ``secure_mode`` (the sum of four Gaussian draws, against
floating-point attacks). Two identical rounds release different arrays. A non-private
round's shuffling is unseeded too.

Non-finite examples (an operator can choose arrays, or a trunk, that overflow for records
past a threshold, so that a NaN release would answer "does any record exceed t?" for free):
each example adds its clipped gradient or exactly zero, so sensitivity stays
``max_grad_norm`` and the release is always finite. Rows with a non-finite input are zeroed
before the forward pass; the loss is taken by indexing over rows whose input, output and loss
are finite (mean over the whole batch, Opacus' scaling), so the others get a gradient of
exactly 0; under flat clipping any per-sample gradient row still non-finite (an infinite
activation inside the tail times its zero gradient) is zeroed before Opacus clips. Ghost
clipping has no per-sample gradients to zero: a gradient-free forward pass first drops from
the batch every row whose input, output, loss or input to a module with trainable parameters
is not finite, and a NaN clipping factor (``0 * inf`` in its norm) becomes 0. Residual (ghost
only): the check pass and the training pass run on batches of different sizes, so a row whose
values sit within rounding of float32's overflow could pass one and overflow in the other;
no such row was found in tests. The returned loss sums finite rows in float64. The guards
are :mod:`client.nonfinite_guards`.

The tail (:mod:`common.trainable`) runs on activations the frozen trunk computed once (feature
cache): the trunk never enters Opacus. Only parameters with ``requires_grad`` are optimised and
get per-example gradients; frozen layers and parameter-free modules (dropout) run in eval mode
(:func:`common.trainable.set_train_mode`) and frozen norms hold pretraining statistics.

Inputs may be an array or a memory map of any trailing shape ``(n, ...)``: each batch reads its
own rows, so a memory-mapped file is never loaded whole (:mod:`client.activation_batches`).
The round's terms and result are :mod:`client.dp_round`; :func:`setup_round` is the one place
that wraps a tail in Opacus (the benchmarks time their steps on it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ferry.client import dp_randomness
from ferry.client.activation_batches import (
    ActivationRows,
    ExampleIndices,
    collate_indices,
    physical_batches,
)
from ferry.client.dp_round import DPTrainConfig, TrainOutcome
from ferry.client.nonfinite_guards import (
    finite_clipping_coef,
    finite_losses,
    finite_rows,
    ghost_rows,
    single_output,
    zero_non_finite_grad_samples,
)
from ferry.client.weighted_clipping import (
    BatchWeights,
    class_weight_tensor,
    weight_after_clipping,
    weight_ghost_clipping,
)
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import MechanismSegment
from ferry.common.trainable import set_train_mode, trainable_state
from ferry.common.training_defaults import round_plan

TASKS = ("classification", "regression")


@dataclass
class RoundSetup:
    """What one round trains with: ``model`` (the tail, or Opacus' wrapper of it), its
    ``optimizer`` and ``criterion`` (Opacus' own when private), the ``loader`` of example
    indices (Poisson sampling when private, a shuffle when not), Opacus' ``engine`` (None when
    non-private; its accountant holds the segment that ran) and ``batch``, where the loop puts
    each batch's class weights before its backward pass for the clipping hooks to read."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: DataLoader
    engine: object | None
    batch: BatchWeights


def setup_round(
    tail: nn.Module, cfg: DPTrainConfig, n: int, task: str = "classification"
) -> RoundSetup:
    """``tail`` set up to train one round of ``cfg`` on ``n`` examples, in training mode
    (frozen parts in eval): Opacus' PrivacyEngine when private (Poisson sampling, flat or ghost
    clipping, noise in secure mode from this institution's own generator, class weights after
    clipping), plain SGD over a shuffle when not. :func:`train_tail` runs its loop on it; the
    benchmarks time their steps on it (``simulations.bench.trainable_bench``)."""
    cfg.validate()
    params = [p for p in tail.parameters() if p.requires_grad]
    if not params:
        raise FerryError("the model has no trainable parameters: choose a --trainable part")
    batch = BatchWeights()
    optimizer = torch.optim.SGD(params, lr=cfg.lr)
    criterion = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    # Opacus' Poisson sampler (and a non-private round's shuffle) draws on the CPU.
    sampling = dp_randomness.round_generator("cpu")
    indices = ExampleIndices(n)
    model, engine = tail, None
    if cfg.private:
        from opacus import PrivacyEngine

        loader = DataLoader(
            indices, batch_size=cfg.batch_size, collate_fn=collate_indices, generator=sampling
        )
        with warnings.catch_warnings():
            # "Secure RNG turned off": its secure RNG needs torchcsprng (no wheel for current
            # torch); our generators are seeded from OS entropy instead (client.dp_randomness).
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv")
            private = engine.make_private(
                module=set_train_mode(tail),
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode="ghost" if cfg.clipping == "ghost" else "hooks",
                noise_generator=dp_randomness.round_generator(params[0].device),
            )
        if cfg.clipping == "ghost":
            model, optimizer, criterion, loader = private
            finite_clipping_coef(model)
            if cfg.class_weights is not None:
                weight_ghost_clipping(model, batch)
        else:
            model, optimizer, loader = private
            if cfg.class_weights is not None:
                weight_after_clipping(optimizer, batch)
        # The noise as Opacus' secure mode draws it (one draw discarded, four summed, / 2),
        # from our generator: make_private refuses a generator together with secure_mode.
        optimizer.secure_mode = True
    else:
        loader = DataLoader(
            indices,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=collate_indices,
            generator=sampling,
        )
    set_train_mode(tail)
    return RoundSetup(model, optimizer, criterion, loader, engine, batch)


def train_tail(
    tail: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    cfg: DPTrainConfig,
    task: str = "classification",
) -> TrainOutcome:
    """Train ``tail`` (already holding the global weights) on split-point activations
    ``inputs`` for one round, in place; only its parameters with ``requires_grad`` change.
    ``targets``: class indices (classification) or values (regression; the tail outputs
    ``(n, 1)``)."""
    cfg.validate()
    if task not in TASKS:
        raise FerryError(f"unknown task {task!r}: use classification or regression")
    if len(inputs) != len(targets):
        raise FerryError(f"{len(inputs)} inputs but {len(targets)} targets: give one per example")
    device = torch.device(cfg.device)
    rows = ActivationRows(inputs, device)
    y = torch.as_tensor(
        np.asarray(targets), dtype=torch.int64 if task == "classification" else torch.float32
    ).to(device)
    n = len(y)
    weights = class_weight_tensor(cfg.class_weights, y, task)
    tail = tail.to(device)
    params = [p for p in tail.parameters() if p.requires_grad]
    if not params:
        raise FerryError("the model has no trainable parameters: choose a --trainable part")
    if _fast_linear(tail, cfg):
        return _train_linear(tail, inputs, targets, rows, y, cfg, task)
    run = setup_round(tail, cfg, n, task)
    model, optimizer, criterion, loader = run.model, run.optimizer, run.criterion, run.loader
    engine, batch = run.engine, run.batch
    ghost = cfg.private and cfg.clipping == "ghost"
    if ghost:
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    total_loss, seen = 0.0, 0
    try:
        for _ in range(cfg.local_epochs):
            with physical_batches(loader, optimizer, cfg.max_physical_batch, engine) as batches:
                for (idx,) in batches:
                    idx = idx.sort().values  # sorted reads from a memory map; order is moot
                    xb, yb = rows.take(idx), y[idx.to(device)]
                    finite_in = finite_rows(xb)
                    if not bool(finite_in.all()):  # such a row adds 0 (below); keep it finite
                        xb = torch.where(finite_in.view(-1, *[1] * (xb.dim() - 1)), xb, 0.0)
                    if ghost:  # drop rows that would carry an infinite activation
                        keep = ghost_rows(model, xb, yb, finite_in, task)
                        xb, yb, finite_in = xb[keep], yb[keep], finite_in[keep]
                    if weights is not None:
                        batch.rows = weights[yb]
                    optimizer.zero_grad()
                    out = model(xb)
                    if task == "regression":
                        out = single_output(out)
                    if len(yb):
                        per_example = finite_losses(out, yb, finite_in, task)
                        if ghost:
                            loss = DPTensorFastGradientClipping(
                                criterion.module, criterion.optimizer, per_example, "mean"
                            )
                        elif weights is not None and engine is None:  # unclipped: weight losses
                            loss = (per_example * batch.rows).sum() / len(yb)
                        else:  # Opacus' mean reduction: over the whole batch
                            loss = per_example.sum() / len(yb)
                        total_loss += float(per_example.detach().sum(dtype=torch.float64))
                        seen += len(yb)
                        loss.backward()
                    else:
                        # An empty Poisson batch still takes a (noise-only) step, as accounted.
                        (out.sum() * 0.0).backward()
                    if engine is not None and cfg.clipping == "flat":
                        zero_non_finite_grad_samples(params)
                    optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            model.to_standard_module()  # hooks and per-example state off the tail's parameters
        for p in params:
            p.grad = None
    segment = None
    if engine is not None:
        (sigma, q, steps), *rest = engine.accountant.history
        assert not rest, "one round is one mechanism segment"
        segment = MechanismSegment(float(sigma), float(q), int(steps))
    tail.eval()
    accuracy, rmse = _fit(tail, inputs, targets, task)
    return TrainOutcome(
        trainable_state(tail), total_loss / max(seen, 1), accuracy, n, segment, rmse
    )


def _fast_linear(tail: nn.Module, cfg: DPTrainConfig) -> bool:
    """A bare linear head under flat clipping runs :mod:`client.linear_dp` (same mechanism
    as Opacus, ~5x faster per step; a non-private run the same loop without clipping and
    noise); everything else runs Opacus (or plain SGD when non-private)."""
    return (
        isinstance(tail, nn.Linear)
        and tail.weight.requires_grad
        and cfg.clipping == "flat"
        and cfg.max_physical_batch == 0
    )


def _train_linear(tail, inputs, targets, rows, y, cfg: DPTrainConfig, task: str) -> TrainOutcome:
    from ferry.client.linear_dp import train_linear

    n = len(y)
    if task == "regression":
        single_output(torch.zeros(1, tail.out_features))  # one output per example
    q, steps = round_plan(n, cfg.batch_size, cfg.local_epochs)
    x = rows.take(torch.arange(n)) if n else torch.zeros((0, tail.in_features))
    total, seen, segment = train_linear(
        tail,
        x.reshape(n, -1),
        y,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        sample_rate=q,
        steps=steps,
        lr=cfg.lr,
        task=task,
        private=cfg.private,
        class_weights=cfg.class_weights,
    )
    tail.eval()
    accuracy, rmse = _fit(tail, inputs, targets, task)
    return TrainOutcome(trainable_state(tail), total / max(seen, 1), accuracy, n, segment, rmse)


def train_head(
    head: nn.Module, features: np.ndarray, labels: np.ndarray, cfg: DPTrainConfig
) -> TrainOutcome:
    """A classification head trained on backbone features (:func:`train_tail`)."""
    return train_tail(head, features, labels, cfg, "classification")


def predict_tail(tail: nn.Module, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """``tail``'s outputs on ``inputs`` (eval mode, no gradients), as a float32 array
    ``(n, outputs)``; reads ``inputs`` batch by batch (memory maps stay on disk)."""
    tail.eval()
    device = next(tail.parameters()).device
    rows = ActivationRows(inputs, device)
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            out.append(tail(rows.take(torch.arange(i, min(i + batch, len(inputs))))).cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def _fit(tail: nn.Module, inputs, targets, task: str) -> tuple[float, float]:
    """(accuracy, rmse) of the trained tail on its own training set."""
    if len(targets) == 0:
        return (0.0, math.nan) if task == "classification" else (math.nan, 0.0)
    out = predict_tail(tail, inputs)
    if task == "classification":
        return float((out.argmax(1) == np.asarray(targets)).mean()), math.nan
    err = out[:, 0].astype(np.float64) - np.asarray(targets, dtype=np.float64)
    return math.nan, float(np.sqrt(np.mean(err**2)))


def resolve_device(device: str) -> str:
    """``auto``: CUDA when this process sees a GPU, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FerryError(
            f"device {device!r} requested but no CUDA GPU is visible: use --device cpu"
        )
    return device
