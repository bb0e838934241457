"""Classical compressed sensing: L1-wavelet regularised SENSE reconstruction solved by FISTA.

This is the pre-deep-learning reference every learned reconstruction has to beat (Lustig et al. 2007,
multi-coil through SENSE as in BART's ``pics -R W``). It solves, per slice,

    min_x  1/2 ||M F S x - y||^2 + lam ||W x||_1

with ``S`` the sample's coil maps, ``F`` the centred orthonormal FFT, ``M`` the sampling mask and ``W`` an
orthogonal wavelet transform (periodised, so ``W`` is unitary and the proximal step is exact soft
thresholding of the detail coefficients; the coarse approximation band is not penalised). It needs no
training data, so it is the same at every site and is a fair "no learning, but not naive" baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pywt
import torch
from torch import Tensor

from common.coils import sense_adjoint, sense_forward
from common.nufft import SenseNufft, is_non_cartesian


def _forward(image: Tensor, mask: Tensor, maps: Tensor) -> Tensor:
    """A x = M F (S x): combined image (B, H, W) -> sampled multi-coil k-space (B, C, H, W)."""
    return sense_forward(image, maps) * mask


def _adjoint(kspace: Tensor, mask: Tensor, maps: Tensor) -> Tensor:
    """A^H k = sum_c conj(S_c) F^-1 (M k_c): (B, C, H, W) -> (B, H, W)."""
    return sense_adjoint(kspace * mask, maps)


def lipschitz(mask: Tensor, maps: Tensor, iterations: int = 20, seed: int = 0) -> float:
    """Largest eigenvalue of A^H A by power iteration over the batch: the FISTA step is its inverse.

    For maps normalised to sum_c |S_c|^2 = 1 it is at most 1, but maps estimated from a calibration region
    (or simulated ones clipped to a support) need not be, and too large a step makes FISTA diverge.
    """
    shape = (maps.shape[0], *maps.shape[-2:])
    return _power_iteration(lambda x: _adjoint(_forward(x, mask, maps), mask, maps), shape, iterations, seed)


def _power_iteration(
    normal: Callable[[Tensor], Tensor], shape: tuple[int, ...], iterations: int = 20, seed: int = 0
) -> float:
    """Largest eigenvalue of a Hermitian positive operator on complex images of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    value = 1.0
    for _ in range(iterations):
        y = normal(x)
        value = float(torch.linalg.vector_norm(y) / torch.linalg.vector_norm(x).clamp_min(1e-30))
        x = y / torch.linalg.vector_norm(y).clamp_min(1e-30)
    return value


class WaveletProx:
    """Soft thresholding of the detail coefficients of an orthogonal, periodised 2-D wavelet transform.

    ``levels`` is a request: the transform goes as deep as the image allows, at most until the coarsest band
    is one filter long (db4 at 48² stops at 2 levels), and at least one level. Where a side is not a multiple
    of 2^levels (odd sizes), the image is mirrored out to the next multiple and cropped back after the
    transform: the prox is then that of the padded image's coefficients (approximate, not unitary), which
    keeps FISTA's behaviour at every size; at the usual power-of-two-rich sizes it is exact.
    """

    def __init__(self, wavelet: str, levels: int, shape: tuple[int, int]) -> None:
        kernel = pywt.Wavelet(wavelet)
        if not kernel.orthogonal:
            raise ValueError(f"wavelet {wavelet!r} is not orthogonal; the proximal step would not be exact")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        deepest = pywt.dwt_max_level(min(shape), kernel.dec_len)
        self.wavelet, self.levels, self.shape = wavelet, max(1, min(levels, deepest)), tuple(shape)
        block = 2**self.levels
        self.padded = tuple(-(-n // block) * block for n in shape)

    def __call__(self, image: Tensor, threshold: float) -> Tensor:
        """prox_{threshold ||W.||_1}(image) for a complex (B, H, W) image: shrink |coefficient| by threshold."""
        data = image.numpy()
        if self.padded != self.shape:
            extra = [(0, 0)] * (data.ndim - 2) + [(0, p - n) for p, n in zip(self.padded, self.shape)]
            data = np.pad(data, extra, mode="symmetric")
        coeffs = pywt.wavedec2(data, self.wavelet, mode="periodization", level=self.levels, axes=(-2, -1))
        array, slices = pywt.coeffs_to_array(coeffs, axes=(-2, -1))
        approx = slices[0]  # the coarse band's index (all axes), left unpenalised
        keep = array[approx].copy()
        magnitude = np.abs(array)
        array = array * (np.maximum(magnitude - threshold, 0.0) / np.maximum(magnitude, 1e-30))
        array[approx] = keep
        coeffs = pywt.array_to_coeffs(array, slices, output_format="wavedec2")
        out = pywt.waverec2(coeffs, self.wavelet, mode="periodization", axes=(-2, -1))
        out = out[..., : self.shape[0], : self.shape[1]]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.complex64))


@torch.no_grad()
def l1_wavelet_sense(
    masked_kspace: Tensor,
    mask: Tensor,
    sens_maps: Tensor,
    *,
    lam: float = 0.005,
    iterations: int = 50,
    wavelet: str = "db4",
    levels: int = 3,
    on_iteration: Callable[[int], None] | None = None,
) -> Tensor:
    """FISTA for L1-wavelet SENSE: k-space (B,C,H,W), mask (B,1,H,W), maps (B,C,H,W) -> complex (B,H,W).

    Non-Cartesian batches (samples (B, C, K) with a trajectory (B, K, 3) as ``mask``) run on the
    SENSE-NUFFT operator with the density-weighted data term. ``lam`` is absolute, in the units of the
    k-space: FedSense samples are scaled so the zero-filled image peaks at 1, which is what makes one
    ``lam`` serve every site. ``lam = 0`` is a least-squares
    SENSE reconstruction (FISTA on the data term only). Starts from the zero-filled SENSE image A^H y.
    ``on_iteration(done)`` is called after each FISTA iteration: progress for a caller whose batches take
    seconds each.
    """
    if iterations < 1:
        raise ValueError(f"need lam >= 0 and iterations >= 1, got {lam} and {iterations}")
    return l1_wavelet_sense_iterates(
        masked_kspace,
        mask,
        sens_maps,
        lam=lam,
        iterations=(iterations,),
        wavelet=wavelet,
        levels=levels,
        on_iteration=on_iteration,
    )[iterations]


@torch.no_grad()
def l1_wavelet_sense_iterates(
    masked_kspace: Tensor,
    mask: Tensor,
    sens_maps: Tensor,
    *,
    lam: float,
    iterations: tuple[int, ...],
    wavelet: str = "db4",
    levels: int = 3,
    on_iteration: Callable[[int], None] | None = None,
) -> dict[int, Tensor]:
    """The FISTA iterate after each of ``iterations`` (e.g. 50, 100, 200) from one run of the longest.

    Tuning the iteration count on validation then costs one run per ``lam``, not one per (lam, count).
    """
    if (
        sens_maps.dim() != 4
        or sens_maps.shape[:2] != masked_kspace.shape[:2]
        or (masked_kspace.dim() == 4 and sens_maps.shape != masked_kspace.shape)
    ):
        raise ValueError(
            f"expected k-space (B, C, H, W) or samples (B, C, K) and maps (B, C, H, W) of equal shape, got "
            f"{tuple(masked_kspace.shape)} and {tuple(sens_maps.shape)}"
        )
    if lam < 0 or not iterations or min(iterations) < 1:
        raise ValueError(f"need lam >= 0 and iterations >= 1, got {lam} and {iterations}")
    maps = sens_maps.to(torch.complex64)
    prox = WaveletProx(wavelet, levels, (maps.shape[-2], maps.shape[-1]))
    if is_non_cartesian(masked_kspace):
        # Radial / spiral site: the density-weighted data term 1/2 ||D^(1/2) (A x - y)||^2 on the NUFFT
        # operator (the weighting the non-Cartesian DC layers use), through the Toeplitz normal operator.
        operator = SenseNufft.from_batch(mask.to(torch.float32), maps)
        data_adjoint = operator.gridded(masked_kspace.to(torch.complex64))
        step = 1.0 / max(_power_iteration(operator.normal, data_adjoint.shape), 1e-12)
        return _fista(
            data_adjoint, lambda z: operator.normal(z) - data_adjoint, prox, step, lam, iterations, on_iteration
        )
    if mask.dim() != 4 or mask.shape[-2:] != masked_kspace.shape[-2:]:
        raise ValueError(f"expected a mask (B, 1, H, W) matching the k-space, got {tuple(mask.shape)}")
    kspace = masked_kspace.to(torch.complex64)
    mask = mask.to(torch.float32)
    step = 1.0 / max(lipschitz(mask, maps), 1e-12)
    return _fista(
        _adjoint(kspace, mask, maps),
        lambda z: _adjoint(_forward(z, mask, maps) - kspace, mask, maps),
        prox,
        step,
        lam,
        iterations,
        on_iteration,
    )


def _fista(
    x: Tensor,
    gradient: Callable[[Tensor], Tensor],
    prox: WaveletProx,
    step: float,
    lam: float,
    iterations: tuple[int, ...],
    on_iteration: Callable[[int], None] | None = None,
) -> dict[int, Tensor]:
    """FISTA from ``x`` with the data-term ``gradient`` and the wavelet prox (plain gradient steps at lam 0);
    the iterate after each count in ``iterations``; ``on_iteration(done)`` after each iteration."""
    z, t = x, 1.0
    kept: dict[int, Tensor] = {}
    for done in range(1, max(iterations) + 1):
        x_next = z - step * gradient(z)
        if lam > 0:
            x_next = prox(x_next, step * lam)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_next + ((t - 1.0) / t_next) * (x_next - x)
        x, t = x_next, t_next
        if done in iterations:
            kept[done] = x
        if on_iteration is not None:
            on_iteration(done)
    return kept


def data_residual(image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> float:
    """||M F S x - y|| / ||y||: how far a combined image is from agreeing with the measured samples."""
    residual = _forward(image.to(torch.complex64), mask.to(torch.float32), sens_maps) - masked_kspace * mask
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(masked_kspace * mask).clamp_min(1e-30))


__all__ = ["WaveletProx", "data_residual", "l1_wavelet_sense", "l1_wavelet_sense_iterates", "lipschitz"]
