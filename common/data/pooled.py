"""Batches over several sites' training slices pooled, every slice equally likely: true centralized training.

Sites differ in coil count and matrix, so their slices cannot share a batch. Each epoch this loader cuts
every site's shuffled slices into batches and shuffles the *batches* of all sites together: each slice is
seen once per epoch and each step draws from a site in proportion to its number of slices, as training on
the pooled data set would (unlike :class:`common.data.loaders.InterleavedLoader`, which gives every site
the same number of steps however few slices it has).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from common.data.dataset import Sample
from common.data.loaders import set_pass


class PooledLoader:
    """Single-site batches drawn from the pooled slices of ``datasets``; reproducible for a ``seed``.

    Each pass over the loader is one epoch with a fresh permutation (the generator advances), so
    training for more steps than one epoch sees new orders, as a shuffling DataLoader does.
    """

    def __init__(self, datasets: Sequence[Dataset[Sample]], batch_size: int, seed: int, augment: bool = False) -> None:
        if not datasets:
            raise ValueError("PooledLoader needs at least one dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.datasets = list(datasets)
        self.batch_size = batch_size
        self.dataset: ConcatDataset[Any] = ConcatDataset(self.datasets)
        self.generator = torch.Generator().manual_seed(seed)
        # As make_loader's: with augment every pass draws fresh masks (and simulated noise and phase).
        self.augment_seed, self.passes = (seed if augment else None), 0

    def batches(self) -> list[tuple[int, list[int]]]:
        """One epoch's ``(dataset index, slice indices)`` batches in the order they will be served."""
        batches = []
        for which, dataset in enumerate(self.datasets):
            order = torch.randperm(len(dataset), generator=self.generator).tolist()  # type: ignore[arg-type]
            batches += [(which, order[i : i + self.batch_size]) for i in range(0, len(order), self.batch_size)]
        permutation = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in permutation]

    def __len__(self) -> int:
        return sum(-(-len(d) // self.batch_size) for d in self.datasets)  # type: ignore[arg-type,misc]  # sized datasets

    def __iter__(self) -> Iterator[dict[str, object]]:
        set_pass(self.dataset, None if self.augment_seed is None else (self.augment_seed, self.passes))
        self.passes += 1
        for which, indices in self.batches():
            yield default_collate([self.datasets[which][i] for i in indices])
