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

Why: on a 64-feature head Opacus adds ~0.4 ms of fixed cost per step to a ~0.1 ms step
(``BENCHMARKS.md``). A non-private run of a linear head runs the same loop without clipping
and noise, so the two differ by exactly what DP adds.
"""

from __future__ import annotations

import torch
from torch import nn

from common.privacy.accounting import MechanismSegment


def exact_clipped_sum(
    layer: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float | None,
    task: str,
    x_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(clipped sum of per-example weight gradients, of bias gradients, per-example losses)
    for the mean-reduced cross-entropy (classification) or squared error (regression);
    ``max_grad_norm`` None: no clipping (a non-private run). ``x_sq``: the rows' squared
    norms, if already known."""
    out = x @ layer.weight.T
    if layer.bias is not None:
        out = out + layer.bias
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
    clipped = e
    if max_grad_norm is not None:
        scale = (x * x).sum(dim=1) if x_sq is None else x_sq
        scale = scale + (1.0 if layer.bias is not None else 0.0)
        norms = torch.sqrt((e * e).sum(dim=1) * scale)
        clipped = e * (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)[:, None]
    return clipped.T @ x, clipped.sum(dim=0) if layer.bias is not None else None, losses


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
    seed: int,
    private: bool = True,
) -> tuple[float, int, MechanismSegment | None]:
    """Run ``steps`` DP-SGD steps on ``layer`` in place; (summed loss, examples seen, the
    mechanism that ran). ``private=False``: the same loop without clipping and noise (the
    non-private baseline; no mechanism)."""
    n = len(y)
    expected = max(1, int(n * sample_rate))  # Opacus: int(len(dataset) * sample_rate)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    std = noise_multiplier * max_grad_norm if private else 0.0
    clip = max_grad_norm if private else None
    x_sq = (x * x).sum(dim=1)  # once per round: the rows do not change
    total, seen = 0.0, 0
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.rand(n, generator=generator, device=x.device) < sample_rate
            xb, yb = x[mask], y[mask]
            g_w, g_b, losses = exact_clipped_sum(layer, xb, yb, clip, task, x_sq[mask])
            if private:
                g_w += std * torch.randn(g_w.shape, generator=generator, device=x.device)
            layer.weight -= lr * g_w / expected
            if g_b is not None:
                if private:
                    g_b += std * torch.randn(g_b.shape, generator=generator, device=x.device)
                layer.bias -= lr * g_b / expected
            total += float(losses.sum())
            seen += len(yb)
    if not private:
        return total, seen, None
    return total, seen, MechanismSegment(float(noise_multiplier), float(sample_rate), steps)
