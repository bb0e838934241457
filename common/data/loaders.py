"""A site's config, datasets and loaders, loaded once per process and shared by every caller.

The ClientApp, the baselines and the benchmarks all go through here so that they read the same
splits with the same masks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from common.config import SiteConfig, load_site_config
from common.data.dataset import Sample, SiteDataset, build_site_datasets
from common.data.selfsup import build_selfsup_datasets
from common.errors import DataError

logger = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def load_site(path: str) -> tuple[SiteConfig, dict[str, SiteDataset]]:
    """Site config and its train/val/test datasets; cached for the life of the process."""
    config = load_site_config(Path(path))
    if config.supervision == "self":
        datasets = build_selfsup_datasets(config)
    else:
        datasets = build_site_datasets(config)
    logger.info("site %s: %s", config.name, {split: len(ds) for split, ds in datasets.items()})
    return config, dict(datasets.items())


def make_loader(
    dataset: Dataset[Sample], batch_size: int, shuffle: bool, seed: int, augment: bool = False
) -> DataLoader[Sample]:
    """A single-process loader (sites run on small CPU boxes; workers would only add overhead).

    With ``augment`` every pass over a training split draws fresh masks (and simulated noise and
    phase), seeded by (``seed``, pass number); without it the slices' fixed draws are used.
    """
    generator = torch.Generator().manual_seed(seed)
    return EpochLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=0,
        augment_seed=seed if augment else None,
    )


class EpochLoader(DataLoader[Sample]):
    """A DataLoader that tells its dataset which pass over the data it is starting.

    The datasets are shared (cached per site), so every pass sets the epoch, ``None`` included:
    a loader without augmentation never inherits another loader's draws.
    """

    def __init__(self, dataset: Dataset[Sample], *, augment_seed: int | None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.augment_seed = augment_seed
        self.passes = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # torch's stub names its private iterator
        set_pass(self.dataset, None if self.augment_seed is None else (self.augment_seed, self.passes))
        self.passes += 1
        return super().__iter__()


def set_pass(dataset: Dataset[Any], epoch: tuple[int, int] | None) -> None:
    """Tell every SiteDataset inside ``dataset`` which augmented pass starts (``None``: fixed draws)."""
    for leaf in _leaf_datasets(dataset):
        leaf.set_epoch(epoch)


def _leaf_datasets(dataset: Dataset[Any]) -> list[SiteDataset]:
    """The SiteDatasets inside ``dataset`` (itself, or the parts of a ConcatDataset / Subset)."""
    if isinstance(dataset, SiteDataset):
        return [dataset]
    if isinstance(dataset, ConcatDataset):
        return [leaf for part in dataset.datasets for leaf in _leaf_datasets(part)]
    if isinstance(dataset, Subset):
        return _leaf_datasets(dataset.dataset)
    return []


def empty_split_error(source: object) -> DataError:
    """The error for an evaluation that got no slice: a split without subjects is the site's data, not a bug,
    so it names each empty site and split and what to change. ``source``: a loader or a dataset."""
    dataset = source if isinstance(source, Dataset) else getattr(source, "dataset", None)
    leaves = _leaf_datasets(dataset) if isinstance(dataset, Dataset) else []
    advice = (
        "evaluation needs slices in it: add subjects to the site (or partition the data into fewer sites), "
        "or change [split] in its site config; `fedsense data check SITE.toml` shows the splits"
    )
    where = [
        f"{leaf.config.data_path}: site {leaf.config.name}: the {leaf.split} split is empty "
        f"({len(leaf.subjects)} subject(s))"
        for leaf in leaves
        if len(leaf) == 0
    ]
    return DataError(f"{'; '.join(where) or 'the evaluated split is empty (no slice)'}; {advice}")


class InterleavedLoader:
    """Round-robin over several sites' loaders, one whole batch from one site at a time.

    Pooling sites with different coil counts or matrix sizes cannot share a batch, so the
    centralized baseline takes its batches from each site in turn instead of mixing slices.
    """

    def __init__(self, loaders: list[DataLoader[Sample]]) -> None:
        if not loaders:
            raise ValueError("InterleavedLoader needs at least one loader")
        self.loaders = loaders
        self.dataset: ConcatDataset[Any] = ConcatDataset([loader.dataset for loader in loaders])

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[dict[str, object]]:
        iterators = [iter(loader) for loader in self.loaders]
        while iterators:
            for it in list(iterators):
                try:
                    yield next(it)
                except StopIteration:
                    iterators.remove(it)
