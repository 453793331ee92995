"""DP-SGD for a linear head, vectorised: the mechanism Opacus runs, without its per-step
Python overhead.

For a linear layer the per-example gradient is rank one: with ``e_i`` the gradient of example
i's loss with respect to the layer's output, ``dW_i = e_i x_i^T`` and ``db_i = e_i``, so
``||g_i||^2 = ||e_i||^2 (||x_i||^2 + 1)`` exactly, and the clipped sum is ``(c * e)^T x``.
Each step is what Opacus' ``DPOptimizer`` does (``tests/test_linear_dp.py`` checks the
clipped sums against Opacus' own per-example gradients): Poisson sampling with rate ``q``
(each example joins each step's batch independently), per-example clipping to ``C`` with
factor ``min(1, C / (||g_i|| + 1e-6))``, Gaussian noise of std ``sigma * C`` added to the
sum, division by the expected batch size ``int(n * q)``, an SGD step. Mechanism and
accounting are unchanged: ``steps`` of PoissonSampled(q, Gaussian(sigma)).

Class weights (imbalanced tasks): once most gradients are clipped to norm C every example
pushes equally and the majority class wins; weighting the *loss* changes nothing a clip then
undoes. So the weight multiplies the *clipped* gradient instead: example i adds
``w[y_i] * c_i * g_i`` with ``w[y_i]`` in [0, 1] (:func:`common.config.class_weights`:
``w_c = min(rates) / rate_c`` from the run's public ``--base-rates``, which travel in the
run config; never from an institution's labels). Adding or removing one example still
changes the clipped sum by at most ``w C <= C``: the sensitivity, hence σ, q, steps and the
accounting, are unchanged, exactly; the weights only scale down the majority's pull.
:mod:`client.dp_trainer` does the same to Opacus' clip factors for the other trainable parts.

Randomness: the Poisson masks and the noise come from a generator seeded from this
institution's OS entropy for each round (:mod:`client.dp_randomness`), never from anything
the server sends; the noise is drawn with Opacus' defence against floating-point attacks
(:func:`client.dp_randomness.gaussian_noise`). Two identical rounds release different arrays.

Why: on a 64-feature head Opacus adds ~0.4 ms of fixed cost per step to a ~0.1 ms step
(``BENCHMARKS.md``). A non-private run of a linear head runs the same loop without clipping
and noise, so the two differ by exactly what DP adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ferry.client import dp_randomness
from ferry.common.privacy.accounting import MechanismSegment

NOISE_BLOCK = 1 << 22  # noise values drawn per call (16 MiB of float32, twice: secure sum)
MASK_BLOCK = 1 << 24  # Poisson draws per call (64 MiB of float32): memory bounded for any round


def row_norms(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """``sqrt(||x_i||^2 + 1)`` per row (``+ 1`` for a bias): per-example gradient norms are
    ``||e_i||`` times this."""
    return ((x * x).sum(dim=1) + (1.0 if bias else 0.0)).sqrt()


def exact_clipped_sum(
    layer: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float | None,
    task: str,
    x_norm: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(clipped sum of per-example weight gradients, of bias gradients, per-example losses)
    for the mean-reduced cross-entropy (classification) or squared error (regression);
    ``max_grad_norm`` None: no clipping (a non-private run). ``x_norm``: the rows' norms
    as :func:`row_norms` gives them, if already known. ``class_weights``: one weight in
    [0, 1] per class (a tensor); example i's factor ``e_i`` is multiplied by
    ``class_weights[y_i]`` after the clip (module docstring), so it still adds at most C.

    Non-finite rows: an example whose gradient factor ``e_i`` or input ``x_i`` is not finite
    (a logit that overflows, an infinite feature: an operator can choose arrays that do this
    for records past a threshold) contributes exactly zero to both sums and its loss is 0;
    so does one whose gradient norm overflows (clipping would scale it to 0). A finite row may
    still have an infinite loss: :func:`train_linear` leaves it out of the summed loss. So
    each example adds its clipped gradient or nothing: sensitivity stays ``C``, and the sums,
    hence the release, are always finite; whether a record overflowed is hidden by the noise
    like any other gradient."""
    out = (
        torch.addmm(layer.bias, x, layer.weight.T) if layer.bias is not None else x @ layer.weight.T
    )
    if task == "classification":
        logp = torch.log_softmax(out, dim=1)
        rows = torch.arange(len(y))
        losses = -logp[rows, y]
        e = logp.exp()
        e[rows, y] -= 1.0
    else:
        residual = out[:, 0] - y
        losses = residual**2
        e = (2.0 * residual)[:, None]
    if max_grad_norm is not None:
        if x_norm is None:
            x_norm = row_norms(x, layer.bias is not None)
        norms = torch.linalg.vector_norm(e, dim=1).mul_(x_norm)
        # Not finite iff e_i or x_i is not (or the norm overflows, which clips the row to
        # exactly 0 anyway): one check on a vector per step.
        valid = torch.isfinite(norms)
    else:
        valid = torch.isfinite(e).all(dim=1) & torch.isfinite(x).all(dim=1)
    if not bool(valid.all()):
        # Such a row contributes exactly 0: its operands are replaced (never multiplied) by
        # zeros, so no NaN * 0 reaches the sums.
        rows_ok = valid[:, None]
        e, x = torch.where(rows_ok, e, 0.0), torch.where(rows_ok, x, 0.0)
        losses = torch.where(valid, losses, 0.0)
        if max_grad_norm is not None:
            norms = torch.where(valid, norms, 1.0)
    if max_grad_norm is not None:
        e = e.mul_(torch.clamp(max_grad_norm / norms.add_(1e-6), max=1.0)[:, None])
    if class_weights is not None:  # after clipping: each example adds at most w_y * C <= C
        e = e.mul_(class_weights[y][:, None])
    return e.T @ x, e.sum(dim=0) if layer.bias is not None else None, losses


def train_linear(
    layer: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    lr: float,
    task: str,
    private: bool = True,
    generator: torch.Generator | None = None,
    class_weights: Sequence[float] | torch.Tensor | None = None,
) -> tuple[float, int, MechanismSegment | None]:
    """Run ``steps`` DP-SGD steps on ``layer`` in place; (summed loss, examples seen, the
    mechanism that ran). ``private=False``: the same loop without clipping and noise (the
    non-private baseline; no mechanism). ``generator``: None (what Ferry always passes) draws
    masks and noise from a fresh OS-seeded :func:`client.dp_randomness.round_generator` on
    ``x``'s device; tests may pass their own to pin a distribution. ``class_weights``: one
    weight in [0, 1] per class, applied after clipping (module docstring); None: all 1."""
    n = len(y)
    expected = max(1, int(n * sample_rate))  # Opacus: int(len(dataset) * sample_rate)
    if generator is None:
        generator = dp_randomness.round_generator(x.device)
    std = noise_multiplier * max_grad_norm if private else 0.0
    clip = max_grad_norm if private else None
    x_norm = row_norms(x, layer.bias is not None)  # once per round: the rows do not change
    total, seen = 0.0, 0
    w, b = layer.weight, layer.bias
    sizes = (w.numel(), 0 if b is None else b.numel())
    step = lr / expected
    # Draws are made in blocks (a block of Poisson masks, a block of noise vectors) rather
    # than step by step: the same distributions, a fraction of the per-call overhead, and at
    # most MASK_BLOCK mask draws and NOISE_BLOCK noise values in memory whatever the round.
    mask_rows = max(1, min(steps, MASK_BLOCK // max(1, n)))
    per_block = max(1, min(steps, NOISE_BLOCK // max(1, sum(sizes))))
    masks = noise = torch.empty(0)
    weights = None
    if class_weights is not None:  # float64 weights <= 1 round to float32 weights <= 1
        weights = torch.as_tensor(class_weights, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for i in range(steps):
            if i % mask_rows == 0:
                rows = min(mask_rows, steps - i)
                draws = torch.rand((rows, n), generator=generator, device=x.device)
                masks = draws < sample_rate
                del draws
            mask = masks[i % mask_rows]
            xb, yb = x[mask], y[mask]
            g_w, g_b, losses = exact_clipped_sum(layer, xb, yb, clip, task, x_norm[mask], weights)
            if private:  # N(0, (sigma C)^2) on every coordinate of the clipped sum
                if i % per_block == 0:
                    rows = min(per_block, steps - i)
                    noise = dp_randomness.gaussian_noise((rows, sum(sizes)), std, generator)
                z = noise[i % per_block]
                g_w.add_(z[: sizes[0]].view_as(g_w))
                if g_b is not None:
                    g_b.add_(z[sizes[0] :])
            w.sub_(g_w, alpha=step)
            if g_b is not None:
                b.sub_(g_b, alpha=step)
            batch_loss = float(losses.sum(dtype=torch.float64))
            if not math.isfinite(batch_loss):  # a saturated row: finite gradient, infinite loss
                batch_loss = float(losses[torch.isfinite(losses)].sum(dtype=torch.float64))
            total += batch_loss
            seen += len(yb)
    if not private:
        return total, seen, None
    return total, seen, MechanismSegment(float(noise_multiplier), float(sample_rate), steps)
