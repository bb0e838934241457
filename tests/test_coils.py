"""Coil maps and SENSE operators, checked against explicit per-coil loops, numpy and adjoint identities."""

import numpy as np
import pytest
import torch

from common.coils import (
    birdcage_maps,
    estimate_maps_from_acs,
    rss,
    sense_adjoint,
    sense_expand,
    sense_forward,
    sense_reduce,
)
from common.fft import fft2c_np, ifft2c_np


def random_complex(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded complex64 Gaussian data: no structure the code under test could accidentally rely on."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def smooth_object(height: int, width: int) -> np.ndarray:
    """A smooth positive blob: its low-resolution version is close to itself, so ACS maps should be accurate."""
    yy, xx = np.mgrid[:height, :width]
    return np.exp(-(((yy - height / 2) / 10) ** 2 + ((xx - width / 2) / 12) ** 2))


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complex inner product <a, b>, for adjointness checks."""
    return torch.sum(a.conj() * b)


@pytest.mark.parametrize(("coils", "shape"), [(8, (32, 32)), (3, (21, 34)), (1, (16, 15))])
def test_birdcage_maps_normalised_everywhere(coils: int, shape: tuple[int, int]) -> None:
    maps = birdcage_maps(coils, shape)
    assert maps.shape == (coils, *shape) and maps.dtype == np.complex64
    energy = np.sum(np.abs(maps.astype(np.complex128)) ** 2, axis=0)
    np.testing.assert_allclose(energy, 1.0, atol=1e-5)


def test_birdcage_maps_geometry_and_phase() -> None:
    maps = birdcage_maps(4, (32, 32))
    mag = np.abs(maps)
    # Coil 0 sits at +x (right of the image), coil 2 at -x (left).
    assert mag[0, 16, 30] > 2 * mag[0, 16, 1]
    assert mag[2, 16, 1] > 2 * mag[2, 16, 30]
    # Maps are genuinely complex and differ between coils.
    assert np.std(np.angle(maps[0])) > 0.1
    assert not np.allclose(maps[0], maps[1])


def test_birdcage_maps_support_normalised_inside_zero_outside() -> None:
    yy, xx = np.mgrid[:24, :24]
    support = (yy - 12) ** 2 + (xx - 12) ** 2 < 8**2
    maps = birdcage_maps(6, (24, 24), support=support)
    energy = np.sum(np.abs(maps) ** 2, axis=0)
    np.testing.assert_allclose(energy[support], 1.0, atol=1e-5)
    assert np.all(maps[:, ~support] == 0)
    with pytest.raises(ValueError):
        birdcage_maps(6, (24, 24), support=support[:20])


def test_rss_matches_explicit_loop_torch_and_numpy() -> None:
    x = random_complex((2, 5, 6, 7), seed=1)
    expected = np.zeros((2, 6, 7))
    for c in range(5):
        expected += np.abs(x[:, c]) ** 2
    expected = np.sqrt(expected)
    np.testing.assert_allclose(rss(x, dim=1), expected, rtol=1e-5)
    np.testing.assert_allclose(rss(torch.from_numpy(x), dim=1).numpy(), expected, rtol=1e-5)
    assert rss(torch.from_numpy(x), dim=1, keepdim=True).shape == (2, 1, 6, 7)


def test_rss_gradient_is_finite_where_all_coils_vanish() -> None:
    x = torch.zeros(4, 3, 3, dtype=torch.complex64, requires_grad=True)
    rss(x, dim=0).sum().backward()
    assert torch.isfinite(torch.view_as_real(x.grad)).all()


def test_sense_expand_and_reduce_match_per_coil_loop() -> None:
    image = torch.from_numpy(random_complex((2, 10, 12), seed=2))
    maps = torch.from_numpy(random_complex((2, 4, 10, 12), seed=3))
    coil = sense_expand(image, maps)
    for c in range(4):
        torch.testing.assert_close(coil[:, c], maps[:, c] * image)
    reduced = sense_reduce(coil, maps)
    expected = sum(torch.conj(maps[:, c]) * coil[:, c] for c in range(4))
    torch.testing.assert_close(reduced, expected)


def test_sense_reduce_is_adjoint_of_expand_and_left_inverse_for_normalised_maps() -> None:
    image = torch.from_numpy(random_complex((1, 16, 16), seed=4))
    coil_images = torch.from_numpy(random_complex((1, 6, 16, 16), seed=5))
    maps = torch.from_numpy(birdcage_maps(6, (16, 16)))[None]
    torch.testing.assert_close(
        inner(sense_expand(image, maps), coil_images),
        inner(image, sense_reduce(coil_images, maps)),
        rtol=1e-4,
        atol=1e-3,
    )
    torch.testing.assert_close(sense_reduce(sense_expand(image, maps), maps), image, atol=1e-5, rtol=0)


def test_sense_forward_adjoint_pair() -> None:
    image = torch.from_numpy(random_complex((2, 9, 11), seed=6))
    kspace = torch.from_numpy(random_complex((2, 3, 9, 11), seed=7))
    maps = torch.from_numpy(random_complex((2, 3, 9, 11), seed=8))
    expected_k = torch.from_numpy(fft2c_np(maps.numpy() * image.numpy()[:, None]))
    torch.testing.assert_close(sense_forward(image, maps), expected_k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        inner(sense_forward(image, maps), kspace), inner(image, sense_adjoint(kspace, maps)), rtol=1e-4, atol=1e-3
    )


def column_mask(width: int, acs: range, extra: list[int]) -> np.ndarray:
    """Sampled-column profile (W,) with a calibration run ``acs`` and isolated ``extra`` lines."""
    cols = np.zeros(width, dtype=np.float32)
    cols[list(acs)] = 1
    cols[extra] = 1
    return cols


def test_acs_estimate_recovers_true_maps_on_smooth_object() -> None:
    height, width = 48, 48
    obj = smooth_object(height, width)
    true_maps = birdcage_maps(8, (height, width))
    kspace = fft2c_np(true_maps * obj).astype(np.complex64)
    est = estimate_maps_from_acs(kspace, num_low_freqs=12)
    assert isinstance(est, np.ndarray) and est.shape == true_maps.shape
    inside = obj > 0.3
    np.testing.assert_allclose(np.sum(np.abs(est) ** 2, axis=0), 1.0, atol=1e-4)
    assert np.mean(np.sum(np.abs(est - true_maps) ** 2, axis=0)[inside]) < 0.02


def test_acs_estimate_without_window_matches_numpy_reference() -> None:
    kspace = random_complex((4, 20, 24), seed=9)
    acs = np.zeros((20, 24))
    acs[:, 9:15] = 1  # fastMRI placement of 6 centre lines: (24 - 6 + 1) // 2 = 9
    low_res = ifft2c_np(kspace * acs)
    expected = low_res / np.sqrt(np.sum(np.abs(low_res) ** 2, axis=0))
    est = estimate_maps_from_acs(torch.from_numpy(kspace), num_low_freqs=6, window=False)
    assert isinstance(est, torch.Tensor)
    np.testing.assert_allclose(est.numpy(), expected, atol=1e-5)


def acs_reference(kspace: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted k-space -> low-resolution coil images -> divided by their RSS, in plain numpy."""
    low_res = ifft2c_np(kspace * weights)
    return low_res / np.sqrt(np.sum(np.abs(low_res) ** 2, axis=0))


def test_acs_asymmetric_run_uses_every_contiguous_centre_line() -> None:
    kspace = random_complex((3, 12, 32), seed=14)
    cols = column_mask(32, range(13, 22), extra=[4])  # centre 16: three lines left of it, six from it on
    mask = np.broadcast_to(cols, (1, 12, 32)).copy()
    acs = np.zeros(32)
    acs[13:22] = 1
    # Unmasked k-space, so that any line wrongly counted as calibration would change the result.
    est = estimate_maps_from_acs(kspace, mask=mask, window=False)
    np.testing.assert_allclose(est, acs_reference(kspace, acs), atol=1e-5)


def test_acs_window_tapers_only_the_partially_sampled_axis() -> None:
    kspace = random_complex((3, 16, 24), seed=15)
    lines = np.arange(24)
    start, length = 9, 6
    hamming = 0.54 - 0.46 * np.cos(2 * np.pi * (lines - start + 0.5) / length)
    weights = np.where((lines >= start) & (lines < start + length), hamming, 0.0)
    est = estimate_maps_from_acs(kspace, num_low_freqs=length)
    np.testing.assert_allclose(est, acs_reference(kspace, weights), atol=1e-5)


def test_acs_region_read_from_column_mask_ignores_outer_lines() -> None:
    width = 32
    kspace = random_complex((3, 24, width), seed=10)
    cols = column_mask(width, range(12, 20), extra=[2, 5, 26, 30])
    mask = np.broadcast_to(cols, (1, 24, width)).copy()
    from_mask = estimate_maps_from_acs(kspace * mask, mask=mask)
    from_count = estimate_maps_from_acs(kspace * mask, num_low_freqs=8)
    np.testing.assert_allclose(from_mask, from_count, atol=1e-6)
    changed = kspace.copy()
    changed[:, :, [2, 26]] += 5.0
    np.testing.assert_allclose(estimate_maps_from_acs(changed * mask, mask=mask), from_mask, atol=1e-6)
    changed[:, :, 15] += 5.0
    assert not np.allclose(estimate_maps_from_acs(changed * mask, mask=mask), from_mask, atol=1e-3)


def test_acs_region_read_from_2d_mask_with_calibration_box() -> None:
    rng = np.random.default_rng(11)
    mask = (rng.random((1, 30, 28)) < 0.2).astype(np.float32)
    mask[:, 15, :] = 0  # isolate the box along the centre row/column
    mask[:, :, 14] = 0
    mask[:, 11:19, 10:18] = 1  # 8x8 box centred at (15, 14)
    kspace = random_complex((2, 30, 28), seed=12)
    ref = estimate_maps_from_acs(kspace * mask, mask=mask)
    outside = kspace.copy()
    outside[:, 3, 3] += 10.0
    outside[:, 11:19, 20] += 10.0
    np.testing.assert_allclose(estimate_maps_from_acs(outside * mask, mask=mask), ref, atol=1e-6)
    inside = kspace.copy()
    inside[:, 12, 11] += 10.0
    assert not np.allclose(estimate_maps_from_acs(inside * mask, mask=mask), ref, atol=1e-3)


def test_acs_estimate_batched_matches_per_sample_calls() -> None:
    kspace = torch.from_numpy(random_complex((2, 3, 16, 20), seed=13))
    mask = torch.zeros(2, 1, 16, 20)
    mask[0, ..., 8:12] = 1
    mask[1, ..., 6:14] = 1
    mask[:, ..., 1] = 1
    batched = estimate_maps_from_acs(kspace * mask, mask=mask)
    for b in range(2):
        torch.testing.assert_close(batched[b], estimate_maps_from_acs(kspace[b] * mask[b], mask=mask[b]))
    assert not torch.allclose(batched[0], estimate_maps_from_acs(kspace[0] * mask[1], mask=mask[1]))


def test_acs_estimate_argument_errors() -> None:
    kspace = torch.zeros(2, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError):
        estimate_maps_from_acs(kspace)
    with pytest.raises(ValueError):
        estimate_maps_from_acs(kspace, mask=torch.ones(1, 8, 8), num_low_freqs=4)
    with pytest.raises(ValueError):
        estimate_maps_from_acs(kspace, num_low_freqs=9)
    with pytest.raises(ValueError):
        estimate_maps_from_acs(kspace, mask=torch.ones(1, 8, 7))
