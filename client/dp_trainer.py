"""DP-SGD training of a head on cached features, with Opacus.

Mechanism per round (unit of privacy: one local example): Poisson sampling with rate
``q = 1 / ceil(n / batch_size)`` (expected batch ``n * q``), per-example clipping to
``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm`` per step, for
``local_epochs * ceil(n / batch_size)`` steps. The segment actually executed is read back from
Opacus' accountant and returned, so the reported mechanism is the one that ran.

Only the head is trained; features are computed once by the frozen trunk (feature cache), so
the backbone never enters Opacus (no per-example gradients of frozen layers, no BatchNorm in
train mode).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import FerryError
from common.privacy.accounting import MechanismSegment


@dataclass(frozen=True)
class DPTrainConfig:
    noise_multiplier: float
    max_grad_norm: float = 1.0
    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 1.0
    non_private: bool = False
    seed: int = 0
    device: str = "cpu"
    # > 0: split each (logical) Poisson batch into physical batches of at most this many
    # examples (Opacus BatchMemoryManager); accounting still counts logical steps.
    max_physical_batch: int = 0

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
        if self.max_grad_norm <= 0:
            raise FerryError(f"max grad norm must be > 0, got {self.max_grad_norm}")
        if self.batch_size < 1 or self.local_epochs < 1:
            raise FerryError("batch size and local epochs must be >= 1")


def round_plan(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate q, steps) one round runs on ``num_examples`` examples; Opacus' formula."""
    batches = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / batches, local_epochs * batches


@dataclass
class TrainOutcome:
    head_state: dict[str, np.ndarray]
    loss: float
    accuracy: float
    num_examples: int
    segment: MechanismSegment | None  # None for a non-private round


def train_head(
    head: nn.Module, features: np.ndarray, labels: np.ndarray, cfg: DPTrainConfig
) -> TrainOutcome:
    """Train ``head`` (already holding the global weights) on ``features`` for one round."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    head = head.to(device)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=cfg.lr)
    engine = None
    if not cfg.non_private or cfg.noise_multiplier > 0:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head, optimizer, loader = engine.make_private(
                module=head,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
            )
    else:
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    total_loss, seen = 0.0, 0
    for _ in range(cfg.local_epochs):
        with _physical_batches(loader, optimizer, cfg.max_physical_batch, engine) as batches:
            for xb, yb in batches:
                optimizer.zero_grad()
                logits = head(xb)
                # An empty Poisson batch still takes a (noise-only) step, as accounted.
                loss = nn.functional.cross_entropy(logits, yb) if len(yb) else logits.sum() * 0.0
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(yb)
                seen += len(yb)
    segment = None
    if engine is not None:
        (sigma, q, steps), *rest = engine.accountant.history
        assert not rest, "one round is one mechanism segment"
        segment = MechanismSegment(float(sigma), float(q), int(steps))
        head = head._module
    head.eval()
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean()) if len(y) else 0.0
    state = {k: v.detach().cpu().numpy().copy() for k, v in head.state_dict().items()}
    return TrainOutcome(state, total_loss / max(seen, 1), acc, len(y), segment)


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
