"""A bounded in-memory cache of what a site's slices cost to prepare, shared by all datasets of a process.

A training read re-reads the file and re-simulates the scanner, although with augmentation only the mask,
the noise and the background phase change: the stored k-space (fastMRI) or the magnitude image resampled
to the scanner's matrix (NIfTI) is the same on every pass, and a slice without augmentation (validation,
test, ``augment = false``, acquired-only data) is the same sample every time. :class:`SliceCache` keeps
those, least recently used out first, within a byte budget: ``$FEDSENSE_SLICE_CACHE_MB`` (default
:data:`DEFAULT_MB`; ``0`` turns it off). What is cached is exactly what would be computed, so a cached read
returns the same values as an uncached one (tests/test_slice_cache.py compares them bit for bit).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

import numpy as np
import torch

from common.errors import ConfigError

log = logging.getLogger(__name__)

ENV_MB = "FEDSENSE_SLICE_CACHE_MB"
DEFAULT_MB = 1024

T = TypeVar("T")

_owners = itertools.count()


def new_owner() -> int:
    """A key prefix unique in this process, one per dataset (two datasets never share entries)."""
    return next(_owners)


def budget_bytes() -> int:
    """The cache's budget from ``$FEDSENSE_SLICE_CACHE_MB``, in bytes (0: no caching)."""
    raw = os.environ.get(ENV_MB, "").strip()
    if not raw:
        return DEFAULT_MB << 20
    try:
        megabytes = float(raw)
    except ValueError:
        raise ConfigError(f"${ENV_MB}: must be a number of megabytes >= 0, got {raw!r}") from None
    if megabytes < 0:
        raise ConfigError(f"${ENV_MB}: must be a number of megabytes >= 0, got {raw!r}")
    return int(megabytes * (1 << 20))


def nbytes(value: Any) -> int:
    """Approximate memory held by ``value``: its arrays and tensors (containers and dataclasses walked)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 64


class SliceCache:
    """Least-recently-used values within ``budget`` bytes; a value larger than the budget is not kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value of ``key``, or ``compute()`` (kept when it fits)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cast(T, entry[0])  # what ``compute`` gave for this key: a key always has the same kind of value
        self.misses += 1
        value = compute()
        size = nbytes(value)
        if size <= self.budget:
            self._entries[key] = (value, size)
            self.used += size
            while self.used > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.used -= dropped
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0


_shared: SliceCache | None = None


def shared_cache() -> SliceCache | None:
    """The process's cache (budget read once from the environment); None when turned off."""
    global _shared
    budget = budget_bytes()
    if budget == 0:
        return None
    if _shared is None or _shared.budget != budget:
        _shared = SliceCache(budget)
        log.debug("slice cache: %d MiB", budget >> 20)
    return _shared
