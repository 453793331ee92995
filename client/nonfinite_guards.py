"""Guards that keep a DP round's release finite whatever the examples or the arrays hold.

An operator can choose arrays, or a trunk, that overflow for records past a threshold, so that
a NaN release would answer "does any record exceed t?" for free. Each example therefore adds
its clipped gradient or exactly zero, so sensitivity stays ``max_grad_norm``: the loss is taken
by indexing over rows whose input, output and loss are finite (:func:`finite_losses`); under
flat clipping a per-sample gradient row still non-finite is zeroed before Opacus clips
(:func:`zero_non_finite_grad_samples`); ghost clipping, which has no per-sample gradients to
zero, trains only on rows a gradient-free pass found finite (:func:`ghost_rows`) and turns a
NaN clipping factor into 0 (:func:`finite_clipping_coef`). The contract, and its one residual,
are stated in :mod:`client.dp_trainer`.
"""

from __future__ import annotations

import torch
from torch import nn

from ferry.common.errors import FerryError


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Per row of ``t`` (any trailing shape): all its values finite."""
    return torch.isfinite(t.reshape(len(t), -1)).all(dim=1)


def single_output(out: torch.Tensor) -> torch.Tensor:
    """A regression tail's one output per example, or a one-line refusal of any other shape."""
    if out.dim() != 2 or out.shape[1] != 1:
        raise FerryError(
            f"a regression model must output one value per example, got shape "
            f"{tuple(out.shape)}: build its head with 1 output"
        )
    return out[:, 0]


def finite_losses(
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
    keep = (finite_in & finite_rows(out)).nonzero()[:, 0]
    fn = nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
    losses = fn(out[keep], target[keep], reduction="none")
    ok = torch.isfinite(losses)
    if keep_only:  # the kept rows' indices
        return keep[ok]
    return out.new_zeros(len(target)).index_put((keep[ok],), losses[ok])


def ghost_rows(
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
            finite.logical_and_(finite_rows(args[0]))

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
        out = single_output(out)
    return finite_losses(out, yb, finite, task, keep_only=True)


def finite_clipping_coef(module) -> None:
    """Ghost clipping computes a row's norm as ``sqrt(||grad_out||^2 * ||activation||^2)``:
    ``0 * inf`` (a saturated row whose activation's square overflows) is NaN and Opacus'
    factor ``min(1, C / (norm + 1e-6))`` stays NaN. Such a row gets factor 0 (it adds
    exactly 0); an infinite norm already does."""
    coef = module.get_clipping_coef
    module.get_clipping_coef = lambda: torch.nan_to_num(coef(), nan=0.0)


def zero_non_finite_grad_samples(params: list[nn.Parameter]) -> None:
    """Second guard (flat clipping): an example whose per-sample gradient has a non-finite
    value in any trainable parameter (an infinite activation inside the tail times its zero
    gradient) gets an all-zero per-sample gradient, before Opacus clips and sums."""
    samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not samples:
        return
    bad = ~torch.stack([finite_rows(g) for g in samples]).all(dim=0)
    if bool(bad.any()):
        for g in samples:
            g[bad] = 0.0
