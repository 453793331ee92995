"""Class weights applied to each example's gradient after clipping, on every Opacus path.

``DPTrainConfig.class_weights`` (from the run's public ``--base-rates``: see
:mod:`client.linear_dp`) gives each class a weight in [0, 1]. Each example's clipped gradient
is multiplied by its class's weight *after* clipping, so it adds at most C and the mechanism,
hence the accounting, is the unweighted one. Flat clipping scales Opacus' per-example clip
factors (:func:`weight_after_clipping`, a copy of Opacus' ``clip_and_accumulate``), ghost
clipping its clip coefficients (:func:`weight_ghost_clipping`). ``tests/test_class_balance.py``
checks both against :func:`client.linear_dp.exact_clipped_sum`, and that weights of 1 give
Opacus' own sum, so the copy cannot drift from the library unnoticed.
"""

from __future__ import annotations

import torch

from ferry.common.errors import FerryError


def class_weight_tensor(
    weights: tuple[float, ...] | None, y: torch.Tensor, task: str
) -> torch.Tensor | None:
    """The class weights as a tensor on ``y``'s device, or None; refused for a regression
    task, or for labels they do not cover."""
    if weights is None:
        return None
    if task != "classification":
        raise FerryError("class weights (--base-rates) are for classification: drop them")
    w = torch.tensor(weights, dtype=torch.float32, device=y.device)
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(w):
        raise FerryError(
            f"the labels go beyond the {len(w)} classes --base-rates gives rates for: give "
            "one public rate per class"
        )
    return w


class BatchWeights:
    """``rows``: the current batch's class weights ``w[y_i]``, for the clipping hooks."""

    rows: torch.Tensor = torch.empty(0)


def weight_after_clipping(optimizer, batch: BatchWeights) -> None:
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


def weight_ghost_clipping(module, batch: BatchWeights) -> None:
    """Ghost clipping: its second backward pass sums ``coef_i * grad(loss_i)`` with Opacus'
    clip coefficients; each is multiplied by its example's class weight, after clipping (the
    same clipped, weighted sum as flat clipping)."""
    coef = module.get_clipping_coef

    def weighted() -> torch.Tensor:
        c = coef()
        return c * batch.rows.to(c.device)

    module.get_clipping_coef = weighted
