"""Scanner simulation: measured noise matches the configured level; coils, phase and resizing behave."""

import numpy as np
import pytest

from common.config import ScannerConfig
from common.data.acquisition import resize_image, simulate_acquisition
from common.fft import ifft2c_np


def scanner(**overrides: object) -> ScannerConfig:
    values = dict(
        field_strength_t=3.0,
        coils=4,
        matrix=(64, 64),
        noise_std=0.05,
        mask="equispaced",
        acceleration=4,
        center_fraction=0.08,
    )
    values.update(overrides)
    return ScannerConfig(**values)


def head(shape: tuple[int, int] = (80, 80)) -> np.ndarray:
    """An ellipse with a brighter inner structure, in arbitrary (archive-like) units."""
    y, x = np.mgrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
    image = 700.0 * ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1) + 300.0 * (x**2 + y**2 < 0.2)
    return image.astype(np.float32)


@pytest.mark.parametrize("noise_std", [0.01, 0.05])
def test_measured_kspace_noise_matches_configured_level(noise_std: float) -> None:
    image = head()
    noisy = simulate_acquisition(image, scanner(noise_std=noise_std), seed=7, image_max=float(image.max()))
    clean = simulate_acquisition(image, scanner(noise_std=0.0), seed=7, image_max=float(image.max()))
    noise = noisy.kspace - clean.kspace  # 4 coils x 64 x 64 = 16384 complex samples
    measured = float(np.sqrt(np.mean(np.abs(noise) ** 2)))
    assert measured == pytest.approx(noise_std, rel=0.03)
    # Circular: half the power in each of the real and imaginary parts, and zero mean.
    assert float(noise.real.std()) == pytest.approx(noise_std / np.sqrt(2), rel=0.04)
    assert float(noise.imag.std()) == pytest.approx(noise_std / np.sqrt(2), rel=0.04)
    assert abs(complex(noise.mean())) < 5 * noise_std / np.sqrt(noise.size)
    # Parseval: the orthonormal FFT gives the same std per coil-image pixel.
    image_noise = ifft2c_np(noise)
    assert float(np.sqrt(np.mean(np.abs(image_noise) ** 2))) == pytest.approx(noise_std, rel=0.03)


def test_noise_is_relative_to_the_volume_maximum() -> None:
    """On a zero image only noise remains; its std is noise_std whatever the source's units."""
    zeros = np.zeros((64, 64), np.float32)
    result = simulate_acquisition(zeros, scanner(noise_std=0.02), seed=3, image_max=1234.0)
    assert float(np.sqrt(np.mean(np.abs(result.kspace) ** 2))) == pytest.approx(0.02, rel=0.03)
    assert float(np.abs(result.target).max()) == 0.0


def test_target_is_the_resampled_magnitude_and_maps_are_normalised() -> None:
    image = head((64, 64))
    result = simulate_acquisition(image, scanner(noise_std=0.0), seed=1)
    assert result.kspace.shape == result.sens_maps.shape == (4, 64, 64)
    assert result.kspace.dtype == result.sens_maps.dtype == np.complex64
    np.testing.assert_allclose(np.sum(np.abs(result.sens_maps) ** 2, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.target, image / image.max(), atol=1e-5)
    coil_images = ifft2c_np(result.kspace)
    assert np.abs(np.angle(coil_images[0][image > 0])).std() > 0.1  # a background phase, not a real image


def test_deterministic_per_seed_with_fixed_site_coils() -> None:
    image = head()
    first = simulate_acquisition(image, scanner(), seed=5)
    again = simulate_acquisition(image, scanner(), seed=5)
    other = simulate_acquisition(image, scanner(), seed=6)
    np.testing.assert_array_equal(first.kspace, again.kspace)
    assert not np.allclose(first.kspace, other.kspace)
    np.testing.assert_array_equal(first.sens_maps, other.sens_maps)


def test_resize_keeps_aspect_and_range() -> None:
    wide = np.zeros((60, 120), np.float32)
    wide[20:40, 50:70] = 1.0  # a square object
    out = resize_image(wide, (64, 64))
    assert out.shape == (64, 64)
    assert out.min() >= 0.0 and out.max() <= 1.0
    rows, cols = np.nonzero(out > 0.5)
    assert np.ptp(rows) == pytest.approx(np.ptp(cols), abs=1)  # still square: padded, not stretched
    assert resize_image(head((64, 64)), (64, 64)).dtype == np.float32
