"""The slice cache: cached reads give exactly the uncached batches (augmented or not); the budget holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_site_config
from common.data import slice_cache
from common.data.dataset import build_site_datasets
from common.data.loaders import make_loader


def _batches(path: Path, split: str, augment: bool, passes: int) -> list[dict[str, object]]:
    """Every batch of ``passes`` passes over a split of a freshly built site (its own cache entries)."""
    datasets = build_site_datasets(load_site_config(path))
    loader = make_loader(datasets[split], 2, shuffle=split == "train", seed=5, augment=augment)
    return [batch for _ in range(passes) for batch in loader]


def _same(a: list[dict[str, object]], b: list[dict[str, object]]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("index", [0, 1, 2], ids=["fastmri", "brats", "ixi"])
def test_cached_batches_equal_uncached_exactly(
    small_sites: list[Path], index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = small_sites[index]
    monkeypatch.setenv(slice_cache.ENV_MB, "0")
    plain = {
        (split, aug): _batches(path, split, aug, passes=3)
        for split, aug in (("train", True), ("train", False), ("val", False))
    }
    monkeypatch.setenv(slice_cache.ENV_MB, "256")
    cache = slice_cache.shared_cache()
    assert cache is not None
    cache.clear()
    hits = cache.hits
    for (split, aug), expected in plain.items():
        _same(_batches(path, split, aug, passes=3), expected)
    assert cache.hits > hits  # passes 2 and 3 were served from the cache
    # Augmented passes really differ from each other (the cache keeps the source, not the draw).
    first, second = plain[("train", True)][0], plain[("train", True)][len(plain[("train", True)]) // 3]
    assert first["fname"] != second["fname"] or not torch.equal(first["mask"], second["mask"])


def test_budget_evicts_least_recently_used_and_skips_oversized() -> None:
    cache = slice_cache.SliceCache(budget=3 * 800)
    computed: list[str] = []

    def make(name: str, size: int = 100) -> object:
        def compute() -> np.ndarray:
            computed.append(name)
            return np.zeros(size)  # float64: 8 bytes each

        return compute

    for name in "abc":
        cache.get(name, make(name))
    cache.get("a", make("a"))  # hit: "a" becomes the most recent
    cache.get("d", make("d"))  # over budget: "b" (least recent) leaves
    assert computed == ["a", "b", "c", "d"] and cache.used == 3 * 800
    cache.get("b", make("b"))
    cache.get("a", make("a"))
    assert computed == ["a", "b", "c", "d", "b"]  # "c" went for "b"; "a" stayed
    cache.get("huge", make("huge", size=1000))
    assert "huge" not in cache._entries and cache.used <= cache.budget


def test_budget_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(slice_cache.ENV_MB, "0")
    assert slice_cache.shared_cache() is None
    monkeypatch.setenv(slice_cache.ENV_MB, "1.5")
    assert slice_cache.budget_bytes() == 3 << 19
    monkeypatch.setenv(slice_cache.ENV_MB, "-1")
    with pytest.raises(Exception, match="FEDSENSE_SLICE_CACHE_MB"):
        slice_cache.budget_bytes()
