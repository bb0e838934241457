"""Simulate a site's multi-coil acquisition of a magnitude-only image (BraTS, IXI).

Public magnitude datasets have no k-space, coils or phase, so training on them directly would make the
problem unrealistically easy (a real, positive image) and identical across sites. Each site instead
"re-acquires" the image with its own scanner: resample to the site's matrix, add a smooth background phase
(as B0/receive phase gives), weight by the site's coil sensitivities, Fourier transform and add complex
Gaussian noise. Undersampling is left to the dataset, which applies the site's mask.

Noise definition (see :class:`common.config.ScannerConfig`): ``noise_std`` is the std of the complex noise
per k-space sample and coil (E|n|^2 = noise_std^2), relative to ``image_max``, the maximum of the image
volume. With the orthonormal FFT that is also the noise std per coil-image pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from common.coils import birdcage_maps, rss
from common.config import ScannerConfig
from common.fft import fft2c_np

# Sub-streams of one slice's seed, so the phase does not change when only the noise level does.
_PHASE_STREAM = 1
_NOISE_STREAM = 2


@dataclass(frozen=True)
class Acquisition:
    """A simulated, fully sampled acquisition of one slice at the site's matrix size."""

    kspace: np.ndarray  # (C, H, W) complex64, noisy
    sens_maps: np.ndarray  # (C, H, W) complex64, sum_c |S_c|^2 = 1
    target: np.ndarray  # (H, W) float32: RSS of the noise-free coil images (= the resampled magnitude)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a magnitude image to ``shape`` without distorting anatomy or aliasing fine detail.

    The image is first zero-padded (centred) to the target aspect ratio, then low-pass filtered when it
    shrinks (Gaussian, sigma = (factor - 1) / 2 as scikit-image does) and linearly interpolated, which keeps
    values non-negative and never above the input maximum.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.shape == tuple(shape):
        return image.astype(np.float32)
    height, width = image.shape
    out_h, out_w = shape
    if height * out_w < width * out_h:
        height = round(width * out_h / out_w)
    else:
        width = round(height * out_w / out_h)
    pad_h, pad_w = height - image.shape[0], width - image.shape[1]
    image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    factors = (height / out_h, width / out_w)
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(sigma):
        image = ndimage.gaussian_filter(image, sigma)
    rows = (np.arange(out_h) + 0.5) * factors[0] - 0.5
    cols = (np.arange(out_w) + 0.5) * factors[1] - 0.5
    coords = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    return ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random background phase (radians): a 2nd-order polynomial over the field of view, about +-pi."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    terms = [np.ones(shape), x, y, x * x, x * y, y * y]
    scales = [np.pi, 1.0, 1.0, 0.5, 0.5, 0.5]
    coefficients = [rng.uniform(-s, s) for s in scales]
    return sum((c * t for c, t in zip(coefficients, terms, strict=True)), np.zeros(shape))


@lru_cache(maxsize=16)
def site_coil_maps(num_coils: int, shape: tuple[int, int]) -> np.ndarray:
    """The site's receive coil sensitivities: fixed per (coil count, matrix), like a physical coil array."""
    maps = birdcage_maps(num_coils, shape)
    maps.setflags(write=False)
    return maps


def scanner_magnitude(image: np.ndarray, scanner: ScannerConfig, image_max: float | None = None) -> np.ndarray:
    """The magnitude ``image`` (H0, W0) divided by ``image_max`` and resampled to the scanner's matrix.

    The part of the simulation no seed changes, so a data cache can keep it (:mod:`common.data.slice_cache`).
    ``image_max`` is the volume maximum (so slices keep their relative brightness); defaults to the
    image's own maximum.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D magnitude image, got shape {image.shape}")
    reference = float(image_max) if image_max is not None else float(np.max(image))
    if not reference > 0:
        reference = 1.0
    shape = (int(scanner.matrix[0]), int(scanner.matrix[1]))
    return resize_image(np.abs(image) / reference, shape)


def acquire_magnitude(magnitude: np.ndarray, scanner: ScannerConfig, seed: int) -> Acquisition:
    """Fully sampled noisy multi-coil k-space of a :func:`scanner_magnitude` image; deterministic per ``seed``."""
    shape = magnitude.shape
    phase = smooth_phase(shape, np.random.default_rng([seed, _PHASE_STREAM]))
    maps = site_coil_maps(scanner.coils, shape)
    coil_images = maps * (magnitude * np.exp(1j * phase))
    kspace = fft2c_np(coil_images)
    if scanner.noise_std > 0:
        rng = np.random.default_rng([seed, _NOISE_STREAM])
        noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
        kspace = kspace + noise * (scanner.noise_std / np.sqrt(2.0))
    return Acquisition(
        kspace=kspace.astype(np.complex64),
        sens_maps=maps.copy(),
        target=rss(coil_images, dim=0).astype(np.float32),
    )


def simulate_acquisition(
    image: np.ndarray,
    scanner: ScannerConfig,
    seed: int,
    image_max: float | None = None,
) -> Acquisition:
    """Fully sampled noisy multi-coil k-space of a magnitude ``image`` (H0, W0) on ``scanner``.

    The image is divided by ``image_max`` (the volume maximum, so slices keep their relative brightness;
    defaults to the image's own maximum) before simulation, so the noise level means the same for every
    source intensity scale. Deterministic for a given ``seed``.
    """
    return acquire_magnitude(scanner_magnitude(image, scanner, image_max), scanner, seed)
