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
clip coefficients; the linear fast path its clipped factors; a non-private round (no clip)
weights the per-example losses.

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
no such row was found in tests. The returned loss sums finite rows in float64.

The tail (:mod:`common.trainable`) runs on activations the frozen trunk computed once (feature
cache): the trunk never enters Opacus. Only parameters with ``requires_grad`` are optimised and
get per-example gradients; frozen layers and parameter-free modules (dropout) run in eval mode
(:func:`common.trainable.set_train_mode`) and frozen norms hold pretraining statistics.

Inputs may be an array or a memory map of any trailing shape ``(n, ...)``: each batch reads its
own rows, so a memory-mapped file is never loaded whole.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from ferry.client import dp_randomness
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import MechanismSegment
from ferry.common.trainable import set_train_mode, trainable_state
from ferry.common.training_defaults import round_plan  # noqa: F401 - its home before
from torch import nn
from torch.utils.data import DataLoader, Dataset

TASKS = ("classification", "regression")
CLIPPING = ("flat", "ghost")


@dataclass(frozen=True)
class DPTrainConfig:
    noise_multiplier: float
    max_grad_norm: float = 1.0
    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 1.0
    non_private: bool = False
    device: str = "cpu"
    # > 0: split each (logical) Poisson batch into physical batches of at most this many
    # examples (Opacus BatchMemoryManager); accounting still counts logical steps.
    max_physical_batch: int = 0
    # flat: per-example gradients, then clipping; ghost: Opacus ghost clipping (same mechanism).
    clipping: str = "flat"
    # Per-class weights in [0, 1] applied to each example's gradient after clipping
    # (common.config.class_weights, from the run's public base rates); None = all 1.
    class_weights: tuple[float, ...] | None = None

    @property
    def private(self) -> bool:
        """The one definition of a private round, used by the trainer, the budget's
        reservation and the report alike: one not marked non-private. (A non-private round
        with noise is refused by :meth:`validate`, so no noised round goes unaccounted.)"""
        return not self.non_private

    def validate(self) -> None:
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise FerryError(
                f"noise multiplier must be >= 0, got {self.noise_multiplier}: pass a positive "
                "--noise-multiplier, or leave it out to derive it from --epsilon"
            )
        if self.noise_multiplier == 0 and not self.non_private:
            raise FerryError(
                "noise multiplier 0 gives no privacy: give a positive --noise-multiplier, or "
                "mark the run non-private with --non-private"
            )
        if self.noise_multiplier > 0 and self.non_private:
            raise FerryError(
                f"a non-private round with noise multiplier {self.noise_multiplier:g} is a "
                "contradiction: drop the noise multiplier or the non-private mark"
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise FerryError(
                f"max grad norm must be a positive finite number, got {self.max_grad_norm}"
            )
        if self.batch_size < 1 or self.local_epochs < 1:
            raise FerryError("batch size and local epochs must be >= 1")
        if self.clipping not in CLIPPING:
            raise FerryError(
                f"unknown clipping {self.clipping!r}: use --clipping flat or --clipping ghost"
            )
        if self.class_weights is not None and not (
            len(self.class_weights) >= 2
            and all(0.0 <= w <= 1.0 for w in self.class_weights)  # False for NaN
        ):
            raise FerryError(
                "class weights must be one number in [0, 1] per class (sensitivity stays C): "
                "derive them from public rates with --base-rates"
            )


@dataclass
class TrainOutcome:
    """One round's result. ``trainable_state``: the arrays that travel (the tail's trainable
    parameters after training). ``loss``: mean training loss over the examples the round's
    batches held (cross-entropy, or MSE for regression). After training, on the whole local
    training set: ``accuracy`` (classification; NaN for regression) and ``rmse`` (regression;
    NaN for classification). None of these metrics is covered by the DP guarantee."""

    trainable_state: dict[str, np.ndarray]
    loss: float
    accuracy: float
    num_examples: int
    segment: MechanismSegment | None  # None for a non-private round
    rmse: float = math.nan

    @property
    def head_state(self) -> dict[str, np.ndarray]:
        """The trainable arrays (the name from when only heads trained)."""
        return self.trainable_state


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
    rows = _Rows(inputs, device)
    y = torch.as_tensor(
        np.asarray(targets), dtype=torch.int64 if task == "classification" else torch.float32
    ).to(device)
    n = len(y)
    weights = _class_weight_tensor(cfg, y, task)
    tail = tail.to(device)
    params = [p for p in tail.parameters() if p.requires_grad]
    if not params:
        raise FerryError("the model has no trainable parameters: choose a --trainable part")
    if _fast_linear(tail, cfg):
        return _train_linear(tail, inputs, targets, rows, y, cfg, task)
    batch = _BatchWeights()  # each batch's w[y_i], set before its backward pass
    optimizer = torch.optim.SGD(params, lr=cfg.lr)
    criterion = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    ghost = cfg.private and cfg.clipping == "ghost"
    if ghost:
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    # Opacus' Poisson sampler (and a non-private round's shuffle) draws on the CPU.
    sampling = dp_randomness.round_generator("cpu")
    indices = _Indices(n)
    model, engine = tail, None
    if cfg.private:
        from opacus import PrivacyEngine

        loader = DataLoader(
            indices, batch_size=cfg.batch_size, collate_fn=_collate, generator=sampling
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
            _finite_clipping_coef(model)
            if weights is not None:
                _weight_ghost_clipping(model, batch)
        else:
            model, optimizer, loader = private
            if weights is not None:
                _weight_after_clipping(optimizer, batch)
        # The noise as Opacus' secure mode draws it (one draw discarded, four summed, / 2),
        # from our generator: make_private refuses a generator together with secure_mode.
        optimizer.secure_mode = True
    else:
        loader = DataLoader(
            indices,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=_collate,
            generator=sampling,
        )
    set_train_mode(tail)
    total_loss, seen = 0.0, 0
    try:
        for _ in range(cfg.local_epochs):
            with _physical_batches(loader, optimizer, cfg.max_physical_batch, engine) as batches:
                for (idx,) in batches:
                    idx = idx.sort().values  # sorted reads from a memory map; order is moot
                    xb, yb = rows.take(idx), y[idx.to(device)]
                    finite_in = _finite_rows(xb)
                    if not bool(finite_in.all()):  # such a row adds 0 (below); keep it finite
                        xb = torch.where(finite_in.view(-1, *[1] * (xb.dim() - 1)), xb, 0.0)
                    if ghost:  # drop rows that would carry an infinite activation
                        keep = _ghost_rows(model, xb, yb, finite_in, task)
                        xb, yb, finite_in = xb[keep], yb[keep], finite_in[keep]
                    if weights is not None:
                        batch.rows = weights[yb]
                    optimizer.zero_grad()
                    out = model(xb)
                    if task == "regression":
                        out = _single_output(out)
                    if len(yb):
                        per_example = _finite_losses(out, yb, finite_in, task)
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
                        _zero_non_finite_grad_samples(params)
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


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Per row of ``t`` (any trailing shape): all its values finite."""
    return torch.isfinite(t.reshape(len(t), -1)).all(dim=1)


def _finite_losses(
    out: torch.Tensor,
    target: torch.Tensor,
    finite_in: torch.Tensor,
    task: str,
    keep_only: bool = False,
) -> torch.Tensor:
    """Per-example losses (cross-entropy or squared error), exactly 0 and cut off from the
    graph for a row whose input, output or loss is not finite: the loss is computed on the
    kept rows by indexing and scattered into zeros, so a dropped row's output gets a gradient
    of exactly 0 (no NaN * 0). ``keep_only``: the indices of the rows kept instead."""
    keep = (finite_in & _finite_rows(out)).nonzero()[:, 0]
    fn = nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
    losses = fn(out[keep], target[keep], reduction="none")
    ok = torch.isfinite(losses)
    if keep_only:  # the kept rows' indices
        return keep[ok]
    return out.new_zeros(len(target)).index_put((keep[ok],), losses[ok])


def _ghost_rows(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, finite_in: torch.Tensor, task: str
) -> torch.Tensor:
    """Rows of a ghost-clipping batch to train on: those whose input, output, loss and every
    input to a module with trainable parameters are finite in a gradient-free forward pass
    (Opacus' hooks skip it). Ghost clipping's second
    backward sums ``activation x gradient`` over the whole batch, where a dropped row's zero
    gradient would meet its infinite activation (NaN); a row left out of the batch adds
    exactly 0, and Opacus' mean over the kept rows scales as it does for any batch (the
    optimizer divides by the expected batch size, not this one)."""
    if not len(yb):
        return finite_in
    finite = finite_in.clone()

    def check_input(_module, args):
        if args and isinstance(args[0], torch.Tensor) and len(args[0]) == len(finite):
            finite.logical_and_(_finite_rows(args[0]))

    trainable = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    handles = [m.register_forward_pre_hook(check_input) for m in trainable]
    try:
        with torch.no_grad():
            out = model(xb)
    finally:
        for handle in handles:
            handle.remove()
    if task == "regression":
        out = _single_output(out)
    return _finite_losses(out, yb, finite, task, keep_only=True)


def _class_weight_tensor(cfg: DPTrainConfig, y: torch.Tensor, task: str) -> torch.Tensor | None:
    """The class weights as a tensor on ``y``'s device, or None; refused for a regression
    task, or for labels they do not cover."""
    if cfg.class_weights is None:
        return None
    if task != "classification":
        raise FerryError("class weights (--base-rates) are for classification: drop them")
    w = torch.tensor(cfg.class_weights, dtype=torch.float32, device=y.device)
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(w):
        raise FerryError(
            f"the labels go beyond the {len(w)} classes --base-rates gives rates for: give "
            "one public rate per class"
        )
    return w


class _BatchWeights:
    """``rows``: the current batch's class weights ``w[y_i]``, for the clipping hooks."""

    rows: torch.Tensor = torch.empty(0)


def _weight_after_clipping(optimizer, batch: _BatchWeights) -> None:
    """Flat clipping: Opacus' ``DPOptimizer.clip_and_accumulate`` (opacus 1.6) with each
    example's clip factor ``min(1, C / (||g_i|| + 1e-6))`` multiplied by its class weight
    ``w[y_i]`` in [0, 1], after the factor is computed: the example adds ``w c_i g_i``, of
    norm at most C, to the clipped sum (sensitivity unchanged), which is what
    :func:`client.linear_dp.exact_clipped_sum` computes (``tests/test_class_balance.py``
    checks both, and that weights of 1 give Opacus' own sum)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def clip_and_accumulate() -> None:
        samples = optimizer.grad_samples
        if len(samples[0]) == 0:
            factor = torch.zeros((0,), device=samples[0].device)
        else:
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1)
            factor = (optimizer.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
            factor = factor * batch.rows.to(factor.device)  # after clipping: w c_i <= 1
        for p in optimizer.params:
            _check_processed_flag(p.grad_sample)
            g = optimizer._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(g.device, p.dtype), g)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    optimizer.clip_and_accumulate = clip_and_accumulate


def _weight_ghost_clipping(module, batch: _BatchWeights) -> None:
    """Ghost clipping: its second backward pass sums ``coef_i * grad(loss_i)`` with Opacus'
    clip coefficients; each is multiplied by its example's class weight, after clipping (the
    same clipped, weighted sum as flat clipping)."""
    coef = module.get_clipping_coef

    def weighted() -> torch.Tensor:
        c = coef()
        return c * batch.rows.to(c.device)

    module.get_clipping_coef = weighted


def _finite_clipping_coef(module) -> None:
    """Ghost clipping computes a row's norm as ``sqrt(||grad_out||^2 * ||activation||^2)``:
    ``0 * inf`` (a saturated row whose activation's square overflows) is NaN and Opacus'
    factor ``min(1, C / (norm + 1e-6))`` stays NaN. Such a row gets factor 0 (it adds
    exactly 0); an infinite norm already does."""
    coef = module.get_clipping_coef
    module.get_clipping_coef = lambda: torch.nan_to_num(coef(), nan=0.0)


def _zero_non_finite_grad_samples(params: list[nn.Parameter]) -> None:
    """Second guard (flat clipping): an example whose per-sample gradient has a non-finite
    value in any trainable parameter (an infinite activation inside the tail times its zero
    gradient) gets an all-zero per-sample gradient, before Opacus clips and sums."""
    samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not samples:
        return
    bad = ~torch.stack([_finite_rows(g) for g in samples]).all(dim=0)
    if bool(bad.any()):
        for g in samples:
            g[bad] = 0.0


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
        _single_output(torch.zeros(1, tail.out_features))  # one output per example
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
    rows = _Rows(inputs, device)
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


def _single_output(out: torch.Tensor) -> torch.Tensor:
    if out.dim() != 2 or out.shape[1] != 1:
        raise FerryError(
            f"a regression model must output one value per example, got shape "
            f"{tuple(out.shape)}: build its head with 1 output"
        )
    return out[:, 0]


class _Indices(Dataset):
    """Example indices: Opacus samples indices; :class:`_Rows` reads the examples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)

    def __getitems__(self, idx: list[int]) -> list[int]:
        return idx  # one fetch per batch, not one per example


def _collate(idx: list[int]) -> list[torch.Tensor]:
    return [torch.as_tensor(idx, dtype=torch.int64)]


class _Rows:
    """Rows of an (n, ...) array as float32 tensors on ``device``. An in-memory array is
    shared with torch (and moved to the device once); a memory map is read per batch."""

    def __init__(self, inputs: np.ndarray, device: torch.device):
        self.device = device
        self.mapped = isinstance(inputs, np.memmap)
        if self.mapped:
            self.array = inputs
        else:
            self.tensor = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
            self.tensor = self.tensor.to(device)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.mapped:
            return self.tensor[idx.to(self.device)]
        rows = np.asarray(self.array[idx.cpu().numpy()], dtype=np.float32)
        return torch.from_numpy(rows).to(self.device)


@contextlib.contextmanager
def _physical_batches(loader, optimizer, max_physical: int, engine):
    """The loader itself, or Opacus' BatchMemoryManager when logical batches may not fit."""
    if engine is None or max_physical <= 0:
        yield loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_physical, optimizer=optimizer
    ) as batches:
        yield batches


def resolve_device(device: str) -> str:
    """``auto``: CUDA when this process sees a GPU, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FerryError(
            f"device {device!r} requested but no CUDA GPU is visible: use --device cpu"
        )
    return device


def evaluate_head(head: nn.Module, features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``head`` on held-out features."""
    if len(labels) == 0:
        return 0.0, 0.0
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    head.eval()
    with torch.no_grad():
        logits = head(x)
        return float(nn.functional.cross_entropy(logits, y)), float(
            (logits.argmax(1) == y).float().mean()
        )
