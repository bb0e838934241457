"""Metrics against hand-written formulas and scikit-image as an independent reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.metrics import METRIC_FUNCS, SSIMLoss, mse, nmse, psnr, ssim


@pytest.fixture(scope="module")
def volumes() -> tuple[np.ndarray, np.ndarray]:
    """Three 72x64 slices of a smooth phantom with different maxima, and a blurred noisy copy."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-1:1:72j, -1:1:64j]
    slices = []
    for peak, width, shift in ((1.0, 0.5, 0.0), (2.5, 0.3, 0.2), (0.7, 0.8, -0.3)):
        body = np.exp(-((xx - shift) ** 2 + yy**2) / width)
        detail = 0.2 * np.sin(6 * xx) * np.cos(4 * yy) * (np.hypot(xx, yy) < 0.8)
        slices.append(peak * (body + detail).clip(0))
    gt = np.stack(slices)
    blurred = 0.5 * gt + 0.25 * (np.roll(gt, 1, axis=-1) + np.roll(gt, -1, axis=-2))
    pred = blurred + 0.03 * gt.max() * rng.standard_normal(gt.shape)
    return gt, pred


def reference_ssim(gt: np.ndarray, pred: np.ndarray, data_range: float) -> float:
    return float(
        np.mean(
            [structural_similarity(g, p, data_range=data_range, win_size=7, K1=0.01, K2=0.03) for g, p in zip(gt, pred)]
        )
    )


def test_ssim_matches_skimage_with_volume_max_as_range(volumes: tuple[np.ndarray, np.ndarray]) -> None:
    gt, pred = volumes
    value = ssim(gt, pred)
    assert value == pytest.approx(reference_ssim(gt, pred, gt.max()), abs=1e-8)
    assert 0.3 < value < 0.99, "the data must be neither trivial nor unrelated"
    # the range is the volume max, not each slice's: per-slice ranges give a different score
    per_slice = np.mean([structural_similarity(g, p, data_range=g.max()) for g, p in zip(gt, pred)])
    assert abs(value - per_slice) > 1e-3


def test_ssim_with_explicit_maxval_and_single_slice(volumes: tuple[np.ndarray, np.ndarray]) -> None:
    gt, pred = volumes
    assert ssim(gt, pred, maxval=4.0) == pytest.approx(reference_ssim(gt, pred, 4.0), abs=1e-8)
    assert ssim(gt[1], pred[1], maxval=4.0) == pytest.approx(ssim(gt[1:2], pred[1:2], maxval=4.0), abs=1e-15)
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)


def test_psnr_matches_formula_and_skimage_over_the_whole_volume(
    volumes: tuple[np.ndarray, np.ndarray],
) -> None:
    gt, pred = volumes
    by_hand = 10 * math.log10(gt.max() ** 2 / np.mean((gt - pred) ** 2))
    assert psnr(gt, pred) == pytest.approx(by_hand, abs=1e-10)
    assert psnr(gt, pred) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=gt.max()), abs=1e-10)
    assert psnr(gt, pred, maxval=10.0) == pytest.approx(10 * math.log10(100.0 / np.mean((gt - pred) ** 2)), abs=1e-10)
    slice_mean = np.mean([psnr(g, p, maxval=gt.max()) for g, p in zip(gt, pred)])
    assert abs(psnr(gt, pred) - slice_mean) > 1e-3, "volume PSNR is not a mean of slice PSNRs"


def test_psnr_of_identical_images_is_inf_without_warnings(volumes: tuple[np.ndarray, np.ndarray]) -> None:
    gt, _ = volumes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert psnr(gt, gt.copy()) == math.inf


def test_nmse_and_mse_by_hand(volumes: tuple[np.ndarray, np.ndarray]) -> None:
    gt, pred = volumes
    assert nmse(gt, 0.9 * gt) == pytest.approx(0.01, rel=1e-12)
    assert nmse(gt, pred) == pytest.approx(np.sum((gt - pred) ** 2) / np.sum(gt**2), rel=1e-12)
    assert mse(gt, pred) == pytest.approx(np.mean((gt - pred) ** 2), rel=1e-12)
    assert nmse(gt, gt) == 0.0


def test_metric_funcs_table(volumes: tuple[np.ndarray, np.ndarray]) -> None:
    gt, pred = volumes
    assert set(METRIC_FUNCS) == {"mse", "nmse", "psnr", "ssim"}
    err = np.sum((gt - pred) ** 2)
    expected = {
        "mse": err / gt.size,
        "nmse": err / np.sum(gt**2),
        "psnr": 10 * np.log10(gt.max() ** 2 / (err / gt.size)),
        "ssim": float(np.mean([structural_similarity(g, p, data_range=gt.max()) for g, p in zip(gt, pred)])),
    }
    for name, func in METRIC_FUNCS.items():
        assert func(gt, pred) == pytest.approx(expected[name], rel=1e-6), name


@pytest.mark.parametrize("func", [mse, nmse, psnr, ssim])
def test_misuse_raises_value_error(func) -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        func(np.ones((2, 16, 16)), np.ones((2, 16, 15)))
    with pytest.raises(ValueError, match=r"expected a volume \(S, H, W\)"):
        func(np.ones((1, 2, 16, 16)), np.ones((1, 2, 16, 16)))
    with pytest.raises(ValueError, match=r"expected a volume \(S, H, W\)"):
        func(np.ones(16), np.ones(16))


def test_degenerate_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="smaller than the 7x7 window"):
        ssim(np.ones((2, 6, 16)), np.ones((2, 6, 16)))
    with pytest.raises(ValueError, match="all-zero"):
        nmse(np.zeros((2, 8, 8)), np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="maxval"):
        psnr(np.zeros((2, 8, 8)), np.ones((2, 8, 8)))


def test_ssim_loss_is_zero_for_identical_images_and_differentiable() -> None:
    x = torch.rand(2, 1, 32, 40, dtype=torch.float64)
    loss_fn = SSIMLoss()
    assert loss_fn(x, x.clone(), torch.ones(2, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    pred = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    loss = loss_fn(pred, x, torch.ones(2, dtype=torch.float64))
    assert loss.item() > 0.01
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ssim_loss_agrees_with_numpy_ssim(volumes: tuple[np.ndarray, np.ndarray]) -> None:
    gt, pred = volumes
    x, y = torch.from_numpy(pred), torch.from_numpy(gt)
    ranges = torch.from_numpy(gt.reshape(len(gt), -1).max(axis=1))
    loss_fn = SSIMLoss()
    per_slice = []
    for i in range(len(gt)):
        expected = ssim(gt[i], pred[i], maxval=float(ranges[i]))
        per_slice.append(expected)
        got = 1 - loss_fn(x[i : i + 1, None], y[i : i + 1, None], ranges[i : i + 1]).item()
        assert got == pytest.approx(expected, abs=1e-8)
    batch = 1 - loss_fn(x, y, ranges).item()  # (B, H, W) input, per-image ranges
    assert batch == pytest.approx(np.mean(per_slice), abs=1e-8)
    single_precision = 1 - loss_fn(x.float(), y.float(), ranges.float()).item()
    assert single_precision == pytest.approx(np.mean(per_slice), abs=1e-4)


def test_ssim_loss_rejects_bad_shapes() -> None:
    loss_fn = SSIMLoss()
    with pytest.raises(ValueError, match="shape mismatch"):
        loss_fn(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 15), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        loss_fn(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match="data_range"):
        loss_fn(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), torch.ones(3))
