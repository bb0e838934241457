"""Non-uniform FFT (NUFFT) operators for non-Cartesian k-space: radial and spiral sites.

A radial or spiral scanner measures k-space off the Cartesian grid, so its forward model is a NUFFT, not
``fft2c`` followed by a mask. The transforms are FINUFFT's (Flatiron Institute; type 2 = image ->
samples, type 1 = its exact adjoint), wrapped in a ``torch.autograd.Function`` so that unrolled networks
train through them.

Conventions, chosen so that a non-Cartesian operator sampled on the Cartesian grid *is* ``fft2c``:

- coordinates ``coords`` are (K, 2) in cycles per pixel, ordered (ky, kx) like the image axes (H, W),
  each in [-0.5, 0.5); k = (m - N // 2) / N is the Cartesian sample m of :func:`common.fft.fft2c`;
- the image is centred at index N // 2 and the transform is scaled by 1 / sqrt(H W) (orthonormal on the
  full Cartesian grid), so noise levels and DC weights mean the same as at Cartesian sites;
- samples are (..., K) complex; leading axes (batch, coils) share one trajectory per call.
"""

from __future__ import annotations

import math
from typing import Any

import finufft
import numpy as np
import torch
from scipy.spatial import Voronoi
from torch import Tensor

from common.coils import rss

# FINUFFT's requested relative accuracy per precision: well below what the tests demand (1e-4 / 1e-5).
_EPS = {torch.complex64: 1e-6, torch.complex128: 1e-12}
# Below this many (points x transforms) FINUFFT is fastest on one thread: a slice's transform takes
# milliseconds, and waking threads costs more than it saves (5-10x slower measured on a busy 2-core host).
_SERIAL_WORK = 1 << 20
#: Largest density weight: one Nyquist cell of k-space, the weight of a Cartesian sample (orthonormal FFT).
MAX_DENSITY_WEIGHT = 1.0


def _threads(points: int, transforms: int) -> int:
    return 1 if points * transforms < _SERIAL_WORK else torch.get_num_threads()


def _radians(coords: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """FINUFFT's nodes in radians [-pi, pi), in the real precision matching the complex ``dtype``."""
    real = np.float64 if dtype == torch.complex128 else np.float32
    points = (2.0 * np.pi) * coords.detach().cpu().numpy().astype(np.float64)
    return np.ascontiguousarray(points[:, 0], dtype=real), np.ascontiguousarray(points[:, 1], dtype=real)


def _check_coords(coords: Tensor) -> None:
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (K, 2) (ky, kx) in cycles per pixel, got {tuple(coords.shape)}")


def _type2(image: Tensor, coords: Tensor) -> Tensor:
    """Image (..., H, W) -> samples (..., K) without autograd: sum_n x[n] exp(-2 pi i k (n - N//2))."""
    lead, (height, width) = image.shape[:-2], image.shape[-2:]
    ky, kx = _radians(coords, image.dtype)
    flat = image.detach().cpu().resolve_conj().numpy().reshape(-1, height, width)
    out = finufft.nufft2d2(
        ky,
        kx,
        np.ascontiguousarray(flat),
        isign=-1,
        eps=_EPS[image.dtype],
        nthreads=_threads(coords.shape[0], flat.shape[0]),
    )
    out = torch.from_numpy(np.asarray(out).reshape(*lead, coords.shape[0])) / math.sqrt(height * width)
    return out.to(image.device)


def _type1(samples: Tensor, coords: Tensor, shape: tuple[int, int]) -> Tensor:
    """Samples (..., K) -> image (..., H, W) without autograd: the exact adjoint of :func:`_type2`."""
    lead = samples.shape[:-1]
    ky, kx = _radians(coords, samples.dtype)
    flat = samples.detach().cpu().resolve_conj().numpy().reshape(-1, samples.shape[-1])
    out = finufft.nufft2d1(
        ky,
        kx,
        np.ascontiguousarray(flat),
        shape,
        isign=1,
        eps=_EPS[samples.dtype],
        nthreads=_threads(coords.shape[0], flat.shape[0]),
    )
    out = torch.from_numpy(np.asarray(out).reshape(*lead, *shape)) / math.sqrt(shape[0] * shape[1])
    return out.to(samples.device)


class _Nufft(torch.autograd.Function):
    """Type-2 NUFFT whose backward pass is its adjoint (type 1): the vector-Jacobian product of a linear map."""

    @staticmethod
    def forward(ctx: Any, image: Tensor, coords: Tensor) -> Tensor:
        ctx.save_for_backward(coords)
        ctx.shape = tuple(image.shape[-2:])
        return _type2(image, coords)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (coords,) = ctx.saved_tensors
        return _type1(grad, coords, ctx.shape), None


class _NufftAdjoint(torch.autograd.Function):
    """Type-1 NUFFT (the adjoint) whose backward pass is the forward transform."""

    @staticmethod
    def forward(ctx: Any, samples: Tensor, coords: Tensor, shape: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(coords)
        return _type1(samples, coords, shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (coords,) = ctx.saved_tensors
        return _type2(grad, coords), None, None


def _complex(x: Tensor, what: str) -> Tensor:
    if not torch.is_complex(x):
        raise TypeError(f"{what} must be complex (complex64 or complex128), got {x.dtype}")
    return x if x.dtype in _EPS else x.to(torch.complex64)


def nufft(image: Tensor, coords: Tensor) -> Tensor:
    """Orthonormally scaled NUFFT: complex image (..., H, W) -> samples (..., K) at ``coords`` (K, 2)."""
    _check_coords(coords)
    image = _complex(image, "image")
    samples: Tensor = _Nufft.apply(image, coords)  # type: ignore[no-untyped-call]  # torch: Function.apply is unannotated
    return samples


def nufft_adjoint(samples: Tensor, coords: Tensor, shape: tuple[int, int]) -> Tensor:
    """Adjoint of :func:`nufft`: samples (..., K) -> image (..., H, W) (not an inverse: no density weights)."""
    _check_coords(coords)
    if samples.shape[-1] != coords.shape[0]:
        raise ValueError(f"samples have {samples.shape[-1]} points, coords {coords.shape[0]}")
    samples, size = _complex(samples, "samples"), (int(shape[0]), int(shape[1]))
    image: Tensor = _NufftAdjoint.apply(samples, coords, size)  # type: ignore[no-untyped-call]  # torch: unannotated
    return image


def voronoi_areas(coords: np.ndarray, guard_spacing: float) -> np.ndarray:
    """Area of each sample's Voronoi cell (K,), in (cycles per pixel)^2, with coincident samples sharing one.

    A ring of guard points ``guard_spacing`` beyond the outermost sample closes the edge cells, which
    would otherwise be unbounded (mri-nufft extrapolates those, and for spirals the interleave ends came
    out ~100x too large, streaking the whole image); coincident samples (k = 0 of every spiral
    interleave or radial spoke) split their cell evenly.
    """
    unique, inverse, counts = np.unique(np.round(coords, 9), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    radius = float(np.max(np.hypot(unique[:, 0], unique[:, 1]))) + guard_spacing
    ring = max(16, int(np.ceil(2.0 * np.pi * radius / (0.5 * guard_spacing))))
    angles = 2.0 * np.pi * np.arange(ring) / ring
    points = np.concatenate((unique, radius * np.stack((np.sin(angles), np.cos(angles)), axis=-1)))
    diagram = Voronoi(points)
    areas = np.empty(len(unique))
    for index in range(len(unique)):
        vertices = diagram.vertices[diagram.regions[diagram.point_region[index]]]
        centred = vertices - vertices.mean(axis=0)
        order = np.argsort(np.arctan2(centred[:, 0], centred[:, 1]))
        y, x = centred[order, 0], centred[order, 1]
        areas[index] = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return (areas / counts)[inverse]


def weight_caps(coords: Tensor, shape: tuple[int, int]) -> Tensor:
    """Largest density weight each sample may get (K,): min(1, N * readout step), N = max(H, W).

    A sample a readout step d from its neighbours, with the next readout at most Nyquist's 1 / N away,
    stands for a cell of d / N, i.e. N d Nyquist cells (1/2 on a radial spoke with 2x readout
    oversampling). The readout step is the distance to the nearer of the previous and next sample in
    the stored order (the scanner's order: spoke by spoke, interleave by interleave); samples stored in
    another order get larger steps, so only the one-cell cap then applies.
    """
    points = coords.detach().to(torch.float32)
    step = torch.linalg.vector_norm(points[1:] - points[:-1], dim=-1)
    far = torch.full((1,), math.inf)
    nearest = torch.minimum(torch.cat((far, step)), torch.cat((step, far)))
    return (nearest * max(int(shape[0]), int(shape[1]))).clamp_max(MAX_DENSITY_WEIGHT).cpu()


def density_compensation(coords: Tensor, shape: tuple[int, int], *, capped: bool = True) -> Tensor:
    """Voronoi density compensation weights (K,) float32, scaled so that A^H D A reproduces smooth objects.

    Each sample is weighted by the area of its Voronoi cell (:func:`voronoi_areas`). Pipe-Menon iterations
    on FINUFFT's spreading kernel (mri-nufft) were tried and over-weight the innermost radial samples
    about twofold, which puts a bias on every pixel; Voronoi areas do not. The weights are then scaled
    by a least-squares fit of A^H D A x to x for a smooth (band-limited) Gaussian blob, so that D carries
    the same units at every site and the zero-filled image has the object's intensity: a fully sampled
    Cartesian grid gets weight 1.

    Finally each weight is capped at what the sample can stand for (:func:`weight_caps`): at most one
    Nyquist cell (1, the weight of a Cartesian sample), and at most its readout step times the Nyquist
    spacing 1 / N across the readout. Where a trajectory samples more sparsely than Nyquist (an
    undersampled radial scan beyond radius spokes / (pi N), a spiral's outer turns), a Voronoi cell spans
    the gap to the next spoke and its area grows with it; weighting the sample by that area multiplies
    the aliasing it carries (the streaks) by the gap width instead of filling the gap. Cartesian
    zero-filling never does that (a sampled line keeps weight 1 at any R), and with the cap a trajectory
    that lies on the grid gives exactly the Cartesian zero-filled image. Uncapped, the radial demo site's
    zero-filled image was 16.3 dB at R = 4 (NMSE 0.15), 2-5 dB below torchkbnufft's Pipe-Menon gridding.
    ``capped=False`` gives those uncapped weights (``python -m bench.nufft density`` compares them).
    """
    _check_coords(coords)
    height, width = int(shape[0]), int(shape[1])
    points = coords.detach().cpu().numpy().astype(np.float64)
    dcf = torch.from_numpy(voronoi_areas(points, guard_spacing=1.0 / max(height, width)).astype(np.float32))
    rows = (torch.arange(height) - height // 2) / (height / 8.0)
    cols = (torch.arange(width) - width // 2) / (width / 8.0)
    blob = torch.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2)).to(torch.complex64)
    response = nufft_adjoint(dcf * nufft(blob, coords), coords, (height, width))
    scale = torch.sum(response.conj() * blob).real / torch.sum(response.abs() ** 2).clamp_min(1e-30)
    scaled = dcf * scale
    return torch.minimum(scaled, weight_caps(coords, shape)) if capped else scaled


def toeplitz_kernel(coords: Tensor, shape: tuple[int, int], weights: Tensor | None = None) -> Tensor:
    """Fourier-domain kernel (2H, 2W) of the normal operator A^H W A, for :func:`toeplitz_normal`.

    A^H W A is a convolution with the point-spread function T[d] = (1/HW) sum_j w_j exp(2 pi i k_j d),
    d in (-H, H) x (-W, W): one type-1 NUFFT onto a grid twice the size gives T, and a circular convolution
    on that doubled grid equals the linear one on the image (Fessler et al. 2005; Baron et al. 2018).
    """
    _check_coords(coords)
    height, width = int(shape[0]), int(shape[1])
    ones = torch.ones(coords.shape[0], dtype=torch.complex128)
    if weights is not None:
        ones = ones * weights.detach().cpu().to(torch.float64)
    # _type1 scales by 1/sqrt(4HW); the kernel needs 1/(HW).
    psf = _type1(ones, coords.to(torch.float64), (2 * height, 2 * width)) * (2.0 / math.sqrt(height * width))
    kernel: Tensor = torch.fft.fft2(torch.fft.ifftshift(psf, dim=(-2, -1)))
    return kernel.to(torch.complex64).to(coords.device)


def toeplitz_normal(image: Tensor, kernel: Tensor) -> Tensor:
    """A^H W A x for images (..., H, W) by zero-padding to (2H, 2W) and one FFT pair: no NUFFT per call."""
    height, width = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (0, width, 0, height))
    out: Tensor = torch.fft.ifft2(torch.fft.fft2(padded) * kernel.to(image.dtype))
    return out[..., :height, :width]


class SenseNufft:
    """Multi-coil non-Cartesian SENSE operator of a batch: A x = NUFFT(S_c x) along each slice's trajectory.

    ``maps`` (B, C, H, W) complex, ``coords`` (B, K, 2), ``dcf`` (B, K) density weights D. Provides the
    forward and adjoint, the density-compensated adjoint A^H D y (the zero-filled image) and the Toeplitz
    normal operator A^H D A (kernels built once, on first use, shared by the coils). Slices with the same
    trajectory (a site's fixed protocol) go through FINUFFT together.
    """

    def __init__(self, maps: Tensor, coords: Tensor, dcf: Tensor) -> None:
        if maps.ndim != 4 or not torch.is_complex(maps):
            raise ValueError(f"maps must be complex (B, C, H, W), got {tuple(maps.shape)} {maps.dtype}")
        if coords.ndim != 3 or coords.shape[0] != maps.shape[0] or coords.shape[-1] != 2:
            raise ValueError(f"coords must be (B, K, 2) with B = {maps.shape[0]}, got {tuple(coords.shape)}")
        if dcf.shape != coords.shape[:2]:
            raise ValueError(f"dcf must be {tuple(coords.shape[:2])}, got {tuple(dcf.shape)}")
        self.maps, self.coords, self.dcf = maps, coords, dcf
        self.shape = (int(maps.shape[-2]), int(maps.shape[-1]))
        shared = bool(torch.equal(coords, coords[:1].expand_as(coords)) and torch.equal(dcf, dcf[:1].expand_as(dcf)))
        self._groups = [slice(None)] if shared else [slice(b, b + 1) for b in range(coords.shape[0])]
        self._kernel: Tensor | None = None

    @classmethod
    def from_batch(cls, trajectory: Tensor, maps: Tensor) -> SenseNufft:
        """The operator of a batch whose ``mask`` entry is a trajectory tensor (B, K, 3): ky, kx, dcf."""
        return cls(maps, trajectory[..., :2], trajectory[..., 2])

    def forward(self, image: Tensor) -> Tensor:
        """Images (B, H, W) -> coil samples (B, C, K)."""
        coil_images = image.unsqueeze(-3) * self.maps
        return torch.cat([nufft(coil_images[g], self.coords[g][0]) for g in self._groups])

    def adjoint(self, samples: Tensor) -> Tensor:
        """Coil samples (B, C, K) -> combined images (B, H, W): sum_c conj(S_c) NUFFT^H y_c."""
        images = torch.cat([nufft_adjoint(samples[g], self.coords[g][0], self.shape) for g in self._groups])
        return torch.sum(self.maps.conj() * images, dim=-3)

    def coil_gridded(self, samples: Tensor) -> Tensor:
        """Density-compensated coil images (B, C, H, W): NUFFT^H D y_c per coil (their RSS is the zero-filled)."""
        weighted = samples * self.dcf.unsqueeze(-2)
        return torch.cat([nufft_adjoint(weighted[g], self.coords[g][0], self.shape) for g in self._groups])

    def gridded(self, samples: Tensor) -> Tensor:
        """The density-compensated adjoint A^H D y: the non-Cartesian zero-filled images (B, H, W)."""
        return self.adjoint(samples * self.dcf.unsqueeze(-2))

    def normal(self, image: Tensor) -> Tensor:
        """A^H D A x through the Toeplitz kernels: (B, H, W) -> (B, H, W), differentiable in x and maps."""
        if self._kernel is None:
            self._kernel = torch.cat(
                [toeplitz_kernel(self.coords[g][0], self.shape, self.dcf[g][0]).unsqueeze(0) for g in self._groups]
            )
        coil_images = toeplitz_normal(image.unsqueeze(-3) * self.maps, self._kernel.unsqueeze(-3))
        return torch.sum(self.maps.conj() * coil_images, dim=-3)


def is_non_cartesian(kspace: Tensor) -> bool:
    """Whether a batch's k-space is non-Cartesian samples (B, C, K) rather than a Cartesian grid (B, C, H, W)."""
    return kspace.ndim == 3


def coil_images(samples: Tensor, coords: Tensor, dcf: Tensor, shape: tuple[int, int]) -> Tensor:
    """Density-compensated adjoint per coil (C, K) -> (C, H, W): the coil images of a non-Cartesian scan."""
    return nufft_adjoint(samples * dcf, coords, shape)


def estimate_maps_from_centre(
    samples: Tensor,
    coords: Tensor,
    dcf: Tensor,
    shape: tuple[int, int],
    radius: float = 0.06,
    eps: float = 1e-8,
) -> Tensor:
    """Coil maps from the centre of non-Cartesian k-space: low-resolution coil images / their RSS.

    The non-Cartesian twin of :func:`common.coils.estimate_maps_from_acs`: radial and spiral trajectories
    sample their centre densely, so the samples within ``radius`` (cycles per pixel) are a calibration
    region; they are Hann-tapered by radius (against Gibbs ringing), density compensated, and transformed
    to coil images, which are divided by their RSS so that sum_c |S_c|^2 = 1 where there is signal.
    """
    if not 0.0 < radius <= 0.5:
        raise ValueError(f"radius must be in (0, 0.5] cycles per pixel, got {radius}")
    k_radius = torch.linalg.vector_norm(coords.to(torch.float32), dim=-1)
    taper = torch.where(k_radius < radius, 0.5 + 0.5 * torch.cos(torch.pi * k_radius / radius), 0.0)
    low_res = coil_images(samples * taper.to(samples.device), coords, dcf, shape)
    return low_res / rss(low_res, dim=-3, keepdim=True).clamp_min(eps)


__all__ = [
    "MAX_DENSITY_WEIGHT",
    "SenseNufft",
    "coil_images",
    "density_compensation",
    "estimate_maps_from_centre",
    "is_non_cartesian",
    "nufft",
    "nufft_adjoint",
    "toeplitz_kernel",
    "toeplitz_normal",
    "voronoi_areas",
    "weight_caps",
]
