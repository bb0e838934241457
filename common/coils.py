"""Coil sensitivities: simulation, estimation from the calibration region, and the SENSE operators.

Conventions: coil images and maps are complex (..., C, H, W); a coil-combined image is (..., H, W).
Maps are normalised so that sum_c |S_c|^2 = 1, which makes :func:`sense_reduce` a left inverse of
:func:`sense_expand` and lets the closed-form data-consistency layer act per coil.
"""

from typing import TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from common.fft import fft2c, ifft2c

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)

# A coil centre that falls exactly on a pixel would give an infinite 1/r sensitivity there.
_MIN_COIL_DISTANCE = 1e-3


def birdcage_maps(
    num_coils: int,
    shape: tuple[int, int],
    relative_radius: float = 1.5,
    support: np.ndarray | None = None,
) -> np.ndarray:
    """Simulated birdcage-like sensitivity maps (C, H, W) complex64, for data that has no coil information.

    Coils sit evenly on a circle of ``relative_radius`` (1 = the edge of the field of view) around the
    object; each has a 1/r magnitude fall-off and a phase that winds around its centre and is offset per
    coil, as in sigpy's ``birdcage_maps``. The maps are normalised to sum_c |S_c|^2 = 1 everywhere, or,
    when a boolean ``support`` (H, W) of the object is given, inside it and zero outside (as ESPIRiT maps
    are), so that the simulated coils carry no signal where there is no tissue.
    """
    if num_coils < 1:
        raise ValueError(f"num_coils must be >= 1, got {num_coils}")
    if relative_radius <= 0:
        raise ValueError(f"relative_radius must be > 0, got {relative_radius}")
    height, width = shape
    if support is not None and support.shape != (height, width):
        raise ValueError(f"support has shape {support.shape}, expected {(height, width)}")

    coil, y, x = np.mgrid[:num_coils, :height, :width].astype(np.float64)
    angle = coil * (2.0 * np.pi / num_coils)
    x_rel = (x - width / 2.0) / (width / 2.0) - relative_radius * np.cos(angle)
    y_rel = (y - height / 2.0) / (height / 2.0) - relative_radius * np.sin(angle)
    distance = np.maximum(np.hypot(x_rel, y_rel), _MIN_COIL_DISTANCE)
    phase = np.arctan2(x_rel, -y_rel) - angle
    maps: npt.NDArray[np.complex128] = np.exp(1j * phase) / distance

    maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    if support is not None:
        maps *= support.astype(bool)
    return maps.astype(np.complex64)


def rss(x: ArrayT, dim: int = 0, keepdim: bool = False) -> ArrayT:
    """Root-sum-of-squares of |x| over ``dim`` (torch or numpy): the standard magnitude coil combination.

    The torch path uses ``vector_norm`` because its gradient is defined (zero) where all coils vanish,
    where a hand-written ``sqrt(sum |x|^2)`` would give NaN.
    """
    if isinstance(x, np.ndarray):
        magnitude: np.ndarray = np.sqrt(np.sum(np.abs(x) ** 2, axis=dim, keepdims=keepdim))
        return magnitude
    norm: Tensor = torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
    return norm


def sense_expand(image: Tensor, maps: Tensor) -> Tensor:
    """Coil images S_c * x: combined image (..., H, W) and maps (..., C, H, W) -> (..., C, H, W)."""
    return image.unsqueeze(-3) * maps


def sense_reduce(coil_images: Tensor, maps: Tensor) -> Tensor:
    """Combined image sum_c conj(S_c) * x_c: the adjoint of :func:`sense_expand`, (..., C, H, W) -> (..., H, W)."""
    return torch.sum(maps.conj() * coil_images, dim=-3)


def sense_forward(image: Tensor, maps: Tensor) -> Tensor:
    """Multi-coil k-space F(S_c x) of a combined image (the forward model, before sampling)."""
    return fft2c(sense_expand(image, maps))


def sense_adjoint(kspace: Tensor, maps: Tensor) -> Tensor:
    """Combined image sum_c conj(S_c) F^-1(k_c): the adjoint of :func:`sense_forward`."""
    return sense_reduce(ifft2c(kspace), maps)


def _central_run(profile: Tensor) -> tuple[Tensor, Tensor]:
    """Start and length of the contiguous sampled run through the centre index of each 1-D profile (..., N)."""
    centre = profile.shape[-1] // 2
    sampled = (profile > 0).to(torch.int64)
    right = torch.cumprod(sampled[..., centre:], dim=-1).sum(dim=-1)
    left = torch.cumprod(sampled[..., :centre].flip(-1), dim=-1).sum(dim=-1)
    return centre - left, left + right


def _line_weights(start: Tensor, length: Tensor, size: int, window: bool) -> Tensor:
    """Weights (..., size) that keep ``length`` lines from ``start``, Hamming-tapered when the run is partial.

    The taper suppresses the Gibbs ringing that a hard cut-off of the calibration region puts into the
    low-resolution coil images. A fully sampled axis is left untapered so its resolution is kept. The
    half-sample offset keeps every calibration line's weight positive, even for a run of one line.
    """
    lines = torch.arange(size, dtype=torch.float32, device=start.device)
    start = start.unsqueeze(-1).to(torch.float32)
    length = length.unsqueeze(-1).to(torch.float32)
    inside = (lines >= start) & (lines < start + length)
    if not window:
        return inside.to(torch.float32)
    taper = 0.54 - 0.46 * torch.cos(2.0 * torch.pi * (lines - start + 0.5) / length.clamp_min(1.0))
    taper = torch.where(length >= size, torch.ones_like(taper), taper)
    return torch.where(inside, taper, torch.zeros_like(taper))


def estimate_maps_from_acs(
    kspace: ArrayT,
    mask: Tensor | np.ndarray | None = None,
    num_low_freqs: int | None = None,
    window: bool = True,
    eps: float = 1e-8,
) -> ArrayT:
    """Coil maps from the fully sampled k-space centre: low-resolution coil images divided by their RSS.

    This is the ACS estimate used by fastMRI's VarNet: k-space outside the auto-calibration (ACS) region
    is zeroed (and, with ``window``, the region tapered), the result is transformed to images, and each
    coil image is divided by the RSS over coils so that sum_c |S_c|^2 = 1 wherever there is signal.

    ``kspace`` is (..., C, H, W), torch or numpy (the result has the same type). The ACS region is either
    read from ``mask`` (..., H, W) or (..., 1, H, W) -- the contiguous sampled run through the k-space
    centre along W (centre row) and along H (centre column), so both column masks and 2-D masks with a
    calibration box work -- or given as ``num_low_freqs`` centre columns over the full height.
    """
    if (mask is None) == (num_low_freqs is None):
        raise ValueError("give exactly one of mask or num_low_freqs")
    as_numpy = isinstance(kspace, np.ndarray)
    kspace_t: Tensor = torch.from_numpy(kspace) if isinstance(kspace, np.ndarray) else kspace
    height, width = kspace_t.shape[-2], kspace_t.shape[-1]

    if mask is not None:
        mask_t = (torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask).to(kspace_t.device)
        if tuple(mask_t.shape[-2:]) != (height, width):
            raise ValueError(f"mask shape {tuple(mask_t.shape)} does not match k-space {(height, width)}")
        start_w, length_w = _central_run(mask_t[..., height // 2, :])
        start_h, length_h = _central_run(mask_t[..., :, width // 2])
    else:
        assert num_low_freqs is not None  # exactly one of mask or num_low_freqs, checked above
        if not 1 <= num_low_freqs <= width:
            raise ValueError(f"num_low_freqs must be in [1, {width}], got {num_low_freqs}")
        device = kspace_t.device
        length_w = torch.tensor(num_low_freqs, device=device)
        start_w = torch.tensor((width - num_low_freqs + 1) // 2, device=device)
        length_h = torch.tensor(height, device=device)
        start_h = torch.tensor(0, device=device)

    weights_w = _line_weights(start_w, length_w, width, window)
    weights_h = _line_weights(start_h, length_h, height, window)
    weights = weights_h.unsqueeze(-1) * weights_w.unsqueeze(-2)
    low_res = ifft2c(kspace_t * weights)
    maps = low_res / rss(low_res, dim=-3, keepdim=True).clamp_min(eps)
    return cast(ArrayT, maps.numpy() if as_numpy else maps)
