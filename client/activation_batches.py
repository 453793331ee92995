"""Cached split-point activations read batch by batch for DP training (:mod:`client.dp_trainer`).

Opacus samples example *indices* (:class:`ExampleIndices`, one fetch per batch); each batch then
reads its own rows (:class:`ActivationRows`), so a memory-mapped activation file is never
loaded whole; :func:`physical_batches` splits a logical batch that may not fit into physical
ones (Opacus' BatchMemoryManager), which changes neither the update nor the accounting.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils.data import Dataset


class ExampleIndices(Dataset):
    """Example indices: Opacus samples indices; :class:`ActivationRows` reads the examples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)

    def __getitems__(self, idx: list[int]) -> list[int]:
        return idx  # one fetch per batch, not one per example


def collate_indices(idx: list[int]) -> list[torch.Tensor]:
    return [torch.as_tensor(idx, dtype=torch.int64)]


class ActivationRows:
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
def physical_batches(loader, optimizer, max_physical: int, engine):
    """The loader itself, or Opacus' BatchMemoryManager when logical batches may not fit."""
    if engine is None or max_physical <= 0:
        yield loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_physical, optimizer=optimizer
    ) as batches:
        yield batches
