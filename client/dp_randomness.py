"""The randomness DP-SGD's guarantee rests on: Poisson sampling and Gaussian noise.

Contract. Every draw the guarantee rests on (which examples join each step's batch, the
noise added to each step's clipped sum) comes from a generator that :func:`round_generator`
makes fresh for each round, seeded from the institution's own OS entropy
(:func:`secrets.randbits`, i.e. ``os.urandom``). Nothing the server sends or knows (the run's
``--seed``, the round number, the partition id, the arrays) enters it, so the operator cannot
replay a round to subtract its noise or learn its batches. The seed is never stored, logged
or released, and there is no reproducible mode: two identical rounds release different arrays.
``--seed`` keeps only what is public (initialisation, partitioning, synthetic data).

What the generator is, honestly: torch's own PRNG (Mersenne Twister on the CPU, Philox on
CUDA) seeded with 64 bits of OS entropy per round, one generator per use (sampling, noise).
It is not a CSPRNG: recovering a round's noise means guessing its 64-bit seed (2^64 replays
of the round, each a full training run) or inverting the PRNG from outputs the operator never
sees raw (they reach it only added to clipped gradients and averaged). Opacus' ``secure_mode``
(``torchcsprng``) is not used because torchcsprng has no wheel for current torch; Opacus'
defence against floating-point attacks on the Gaussian sampler (arXiv:2107.10138,
arXiv:2112.05307), which is independent of the generator, is used: :func:`gaussian_noise`
on the vectorised path, the DPOptimizer's ``secure_mode`` flag on the Opacus path.
"""

from __future__ import annotations

import secrets

import torch

SEED_BITS = 64  # what torch.Generator.manual_seed takes


def round_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` (CPU or CUDA: it must live where the tensors it draws
    do), seeded with :data:`SEED_BITS` bits of OS entropy. Call once per round and use: the
    seed is never returned, stored or released."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(secrets.randbits(SEED_BITS))
    return generator


def gaussian_noise(
    shape: tuple[int, ...],
    std: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``N(0, std^2)`` noise of ``shape`` on the generator's device, drawn as Opacus'
    ``_generate_noise`` draws it in secure mode: one draw thrown away, then the sum of four
    ``N(0, std^2)`` draws divided by 2 (the same distribution; a sum's floating-point values
    no longer betray which Gaussian sample was drawn, so noise cannot be told from signal by
    its low bits)."""
    device = generator.device
    if std == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    torch.normal(0.0, std, size=(1, 1), generator=generator, device=device)  # thrown away
    total = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)
    draw = torch.empty_like(total)
    for _ in range(3):
        total.add_(draw.normal_(0.0, std, generator=generator))
    return total.div_(2.0)
