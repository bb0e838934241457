"""A site's config, datasets and loaders, loaded once per process and shared by every caller.

The ClientApp, the baselines and the benchmarks all go through here so that they read the same
splits with the same masks.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from common.config import SiteConfig, load_site_config
from common.data.dataset import SiteDataset, build_site_datasets

logger = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def load_site(path: str) -> tuple[SiteConfig, dict[str, SiteDataset]]:
    """Site config and its train/val/test datasets; cached for the life of the process."""
    config = load_site_config(Path(path))
    datasets = build_site_datasets(config)
    logger.info("site %s: %s", config.name, {split: len(ds) for split, ds in datasets.items()})
    return config, datasets


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A single-process loader (sites run on small CPU boxes; workers would only add overhead)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
