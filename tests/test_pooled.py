"""Pooled centralized batches: every slice once per epoch, one site per batch, sites in proportion to their size."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import Dataset

from common.data.pooled import PooledLoader


class Slices(Dataset):
    def __init__(self, site: str, n: int, coils: int) -> None:
        self.site, self.n, self.coils = site, n, coils

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"site": self.site, "idx": i, "kspace": torch.zeros(self.coils, 4, 4)}


def test_each_epoch_serves_every_slice_once_in_single_site_batches() -> None:
    loader = PooledLoader([Slices("a", 5, 16), Slices("b", 20, 4)], batch_size=2, seed=0)
    assert len(loader) == 3 + 10
    for _ in range(2):
        seen = Counter()
        for batch in loader:
            assert len(set(batch["site"])) == 1  # coil counts differ: a batch never mixes sites
            seen.update((s, int(i)) for s, i in zip(batch["site"], batch["idx"]))
        assert seen == Counter({**{("a", i): 1 for i in range(5)}, **{("b", i): 1 for i in range(20)}})


def test_sites_are_drawn_in_proportion_to_their_slices_and_runs_reproduce() -> None:
    datasets = [Slices("a", 6, 2), Slices("b", 54, 2)]
    first = [b[0] for b in PooledLoader(datasets, 3, seed=1).batches()]
    again = [b[0] for b in PooledLoader(datasets, 3, seed=1).batches()]
    assert first == again
    # Over many epochs the first step lands on the small site about 2 times in 20 (its share of batches).
    loader = PooledLoader(datasets, 3, seed=2)
    firsts = [loader.batches()[0][0] for _ in range(2000)]
    assert abs(firsts.count(0) / 2000 - 2 / 20) < 0.03


def test_pooled_training_augments_like_the_other_loaders(small_sites) -> None:  # type: ignore[no-untyped-def]
    """Pooled centralized training sees fresh masks every pass, as federated and local training do."""
    from common.data.loaders import load_site

    train = [load_site(str(path))[1]["train"] for path in small_sites[1:]]

    def one_pass(loader: PooledLoader) -> dict[tuple[str, str, int], torch.Tensor]:
        return {
            (b["site"][i], b["fname"][i], int(b["slice_idx"][i])): b["mask"][i]
            for b in loader
            for i in range(len(b["fname"]))
        }

    def two_passes(augment: bool) -> tuple[dict, dict]:
        loader = PooledLoader(train, batch_size=4, seed=0, augment=augment)
        return one_pass(loader), one_pass(loader)

    fixed, augmented, again = two_passes(False), two_passes(True), two_passes(True)
    assert fixed[0].keys() == augmented[0].keys() and len(fixed[0]) > 4
    assert all(torch.equal(fixed[0][k], fixed[1][k]) for k in fixed[0]), "no augmentation: each slice's fixed mask"
    changed = [k for k in augmented[0] if not torch.equal(augmented[0][k], augmented[1][k])]
    assert len(changed) > len(augmented[0]) // 2, "augmentation: fresh masks on the next pass"
    assert all(torch.equal(augmented[p][k], again[p][k]) for p in (0, 1) for k in augmented[0]), "reproducible"
