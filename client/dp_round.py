"""A DP training round's terms and its result, as :mod:`client.dp_trainer` takes and gives them.

:class:`DPTrainConfig` holds the mechanism's settings (noise multiplier, clipping norm, batch
size, local epochs) and the optimiser's, validated once (:meth:`DPTrainConfig.validate`, one
line per refusal); :attr:`DPTrainConfig.private` is the one definition of a private round that
the trainer, the budget's reservation and the privacy report share. :class:`TrainOutcome` is
what a round gives back: the arrays that travel, the mechanism segment that ran, and local
metrics that the client does not release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import MechanismSegment

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
