"""Held-out real MR images: loaded from the installed packages, acquired like a magnitude site, scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ScannerConfig
from common.data.heldout import HeldOutImage, heldout_sample, load_heldout_images, score_heldout
from common.metrics import psnr

SCANNER = ScannerConfig(
    field_strength_t=1.5,
    coils=4,
    matrix=(64, 64),
    noise_std=0.0,
    mask="equispaced",
    acceleration=4,
    center_fraction=0.08,
)


def test_loads_real_images_from_nibabel_and_pydicom() -> None:
    images = load_heldout_images()
    sources = {item.name.split(":")[0] for item in images}
    assert sources == {"nibabel", "pydicom"}
    assert len({item.name for item in images}) == len(images) >= 10
    for item in images:
        assert item.image.ndim == 2 and item.image.max() > 0
        # Real images: hundreds of grey levels, not a handful of tissue constants.
        assert len(np.unique(item.image)) > 100


def test_sample_is_an_undersampled_acquisition_of_the_image() -> None:
    y, x = np.mgrid[:64, :64]
    image = np.exp(-((x - 32.0) ** 2 + (y - 30.0) ** 2) / 300.0).astype(np.float32)
    sample = heldout_sample(HeldOutImage("disc", image), SCANNER, seed=1)
    mask = sample["mask"][0].numpy()
    assert sample["masked_kspace"].shape == (4, 64, 64) and 3.0 < mask.size / mask.sum() < 5.0
    assert np.all(sample["masked_kspace"].numpy()[:, mask == 0] == 0)
    # Noise-free: the target is the image, scaled as the dataset scales it.
    target = sample["target"].numpy() / sample["scale"]
    np.testing.assert_allclose(target, image / image.max(), atol=1e-5)


class _Oracle(torch.nn.Module):
    """Returns the target it is handed (set per call): the best possible reconstruction."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: torch.Tensor | None = None

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        assert self.answer is not None
        return self.answer


def test_scores_compare_model_and_zero_filled_on_the_same_target() -> None:
    item = load_heldout_images()[-1]
    oracle = _Oracle()
    oracle.answer = heldout_sample(item, SCANNER)["target"].unsqueeze(0) * 0.9  # a 10 % gain error
    [score] = score_heldout(oracle, SCANNER, images=[item])
    target = heldout_sample(item, SCANNER)["target"].numpy()
    assert score.model_psnr == pytest.approx(psnr(target, 0.9 * target, float(target.max())), abs=1e-4)
    assert score.gain == pytest.approx(score.model_psnr - score.zero_filled_psnr)
    assert np.isfinite(score.zero_filled_psnr) and score.zero_filled_psnr < score.model_psnr
