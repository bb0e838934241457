"""Training-time augmentation: a fresh mask (and simulated noise / phase) per pass, seeded, train split only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import SiteConfig, parse_site_config
from common.data.dataset import build_site_datasets
from common.data.demo import generate_demo
from common.data.loaders import make_loader
from common.masks import ACCELERATION_TOLERANCE, make_mask


def _site(name: str, dataset: str, data_path: Path, mask: str, acceleration: float) -> SiteConfig:
    return parse_site_config(
        {
            "name": name,
            "dataset": dataset,
            "data_path": str(data_path),
            "seed": 5,
            "split": {"seed": 1, "val_fraction": 0.25, "test_fraction": 0.25},
            "scanner": {
                "field_strength_t": 3.0,
                "coils": 3,
                "matrix": [32, 32],
                "noise_std": 0.02,
                "mask": mask,
                "acceleration": acceleration,
                "center_fraction": 0.125,
            },
            "max_slices_per_volume": 2,
        },
        f"{name}.toml",
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteConfig]:
    out = tmp_path_factory.mktemp("augment")
    configs = {
        "fastmri": _site("h5", "fastmri", out / "h5", "equispaced", 4),
        "brats": _site("nii", "brats", out / "nii", "random", 4),
    }
    generate_demo(out, size=32, subjects=4, seed=0, sites=list(configs.values()))
    return configs


@pytest.mark.parametrize("kind", ["fastmri", "brats"])
def test_train_masks_change_with_the_epoch_and_repeat_for_the_same_epoch(
    sites: dict[str, SiteConfig], kind: str
) -> None:
    train = build_site_datasets(sites[kind])["train"]
    train.set_epoch((7, 0))
    first = train[0]
    train.set_epoch((7, 1))
    second = train[0]
    train.set_epoch((7, 0))
    again = train[0]
    # An equispaced mask has only R offsets, so one redraw may repeat the first: a few must not all do.
    redraws = [second]
    for step in (2, 3, 4):
        train.set_epoch((7, step))
        redraws.append(train[0])
    assert any(not torch.equal(first["mask"], other["mask"]) for other in redraws)
    assert torch.equal(first["mask"], again["mask"]) and torch.equal(first["masked_kspace"], again["masked_kspace"])
    # The target is the same slice either way; only the acquisition is redrawn.
    assert torch.allclose(first["target"] / first["scale"], second["target"] / second["scale"], rtol=1e-5, atol=1e-6)
    train.set_epoch(None)
    fixed = train[0]
    assert not torch.equal(fixed["mask"], first["mask"])


def test_simulated_sites_also_redraw_noise_and_phase(sites: dict[str, SiteConfig]) -> None:
    train = build_site_datasets(sites["brats"])["train"]
    train.set_epoch(0)
    a = train[0]
    train.set_epoch(1)
    b = train[0]
    both = (a["mask"][0] > 0) & (b["mask"][0] > 0)  # k-space samples both draws acquired
    assert int(both.sum()) > 0
    ka = a["masked_kspace"][:, both] / a["scale"]
    kb = b["masked_kspace"][:, both] / b["scale"]
    # Same image, so equal magnitudes would mean only the mask changed; phase and noise differ.
    assert not torch.allclose(ka, kb, atol=1e-3)


@pytest.mark.parametrize("split", ["val", "test"])
def test_validation_and_test_keep_their_fixed_draw(sites: dict[str, SiteConfig], split: str) -> None:
    dataset = build_site_datasets(sites["brats"])[split]
    dataset.set_epoch(None)
    fixed = dataset[0]
    for epoch in (0, 1, (3, 9)):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        assert torch.equal(sample["mask"], fixed["mask"])
        assert torch.equal(sample["masked_kspace"], fixed["masked_kspace"])


@pytest.mark.parametrize("kind", ["fastmri", "brats"])
def test_augmented_masks_keep_the_sites_acceleration_and_calibration(sites: dict[str, SiteConfig], kind: str) -> None:
    config = sites[kind]
    scanner = config.scanner
    train = build_site_datasets(config)["train"]
    reference = make_mask(scanner.mask, tuple(scanner.matrix), scanner.acceleration, scanner.center_fraction, 0)
    acs = reference.num_low_frequencies
    width = scanner.matrix[1]
    left = (width - acs + 1) // 2  # fastMRI's placement of the calibration columns
    for epoch in range(4):
        train.set_epoch(epoch)
        mask = train[epoch % len(train)]["mask"][0].numpy()
        achieved = mask.size / mask.sum()
        assert abs(achieved - scanner.acceleration) <= ACCELERATION_TOLERANCE * scanner.acceleration
        # Every draw keeps the fully sampled calibration columns around DC.
        assert np.all(mask[:, left : left + acs] == 1), epoch


def test_loader_draws_a_new_epoch_per_pass_reproducibly(sites: dict[str, SiteConfig]) -> None:
    train = build_site_datasets(sites["brats"])["train"]

    def passes(loader: torch.utils.data.DataLoader, n: int) -> list[torch.Tensor]:
        return [torch.cat([batch["mask"] for batch in loader]) for _ in range(n)]

    one = passes(make_loader(train, 2, shuffle=False, seed=3, augment=True), 2)
    two = passes(make_loader(train, 2, shuffle=False, seed=3, augment=True), 2)
    other_round = passes(make_loader(train, 2, shuffle=False, seed=4, augment=True), 1)
    fixed = passes(make_loader(train, 2, shuffle=False, seed=3, augment=False), 2)
    assert not torch.equal(one[0], one[1])  # a fresh draw every pass
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # ... that a rerun reproduces
    assert not torch.equal(one[0], other_round[0])  # the next round's loader draws anew
    assert torch.equal(fixed[0], fixed[1])  # without augmentation: one fixed mask per slice
    assert not torch.equal(fixed[0], one[0])  # and the shared dataset did not keep the last epoch
