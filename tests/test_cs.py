"""Classical L1-wavelet SENSE compressed sensing (common.cs): better than zero-filled, consistent with the data."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from common.coils import birdcage_maps, rss, sense_adjoint
from common.cs import WaveletProx, data_residual, l1_wavelet_sense, lipschitz
from common.fft import fft2c, ifft2c
from common.masks import make_mask
from common.metrics import psnr

SIZE = 64


def block_phantom(size: int = SIZE) -> np.ndarray:
    """Piecewise-constant rectangles (on a dyadic grid at 64²: exactly sparse in the Haar basis)."""
    image = np.zeros((size, size), dtype=np.float32)
    at = lambda i: i * size // SIZE  # noqa: E731
    image[at(8) : at(24), at(8) : at(40)] = 1.0
    image[at(32) : at(56), at(16) : at(32)] = 0.6
    image[at(40) : at(48), at(40) : at(56)] = 0.8
    image[at(24) : at(32), at(44) : at(52)] = 0.3
    return image


def acquire(
    image: np.ndarray,
    coils: int,
    pattern: str,
    acceleration: float,
    noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked k-space, mask, maps), batch of one, as the site datasets deliver them."""
    maps = torch.from_numpy(birdcage_maps(coils, image.shape))[None]
    mask = torch.from_numpy(make_mask(pattern, image.shape, acceleration, 0.08, seed=0).mask)[None, None]
    kspace = fft2c(torch.from_numpy(image).to(torch.complex64)[None, None] * maps)
    if noise:
        generator = torch.Generator().manual_seed(1)
        kspace = kspace + noise * torch.complex(
            torch.randn(kspace.shape, generator=generator), torch.randn(kspace.shape, generator=generator)
        )
    return kspace * mask, mask, maps


@pytest.mark.parametrize("pattern", ["random", "poisson"])
def test_beats_zero_filled_on_a_sparse_phantom(pattern: str) -> None:
    image = block_phantom()
    kspace, mask, maps = acquire(image, coils=8, pattern=pattern, acceleration=4)
    zero_filled = rss(ifft2c(kspace), dim=1)[0].numpy()
    recon = l1_wavelet_sense(kspace, mask, maps, lam=0.003, iterations=100, wavelet="haar")[0].abs().numpy()
    assert psnr(image, recon) > psnr(image, zero_filled) + 10.0


def test_keeps_data_consistency() -> None:
    """The solution reproduces the measured samples far better than the zero-filled SENSE image does."""
    kspace, mask, maps = acquire(block_phantom(), coils=4, pattern="random", acceleration=4)
    recon = l1_wavelet_sense(kspace, mask, maps, lam=0.003, iterations=100, wavelet="haar")
    start = data_residual(sense_adjoint(kspace, maps), kspace, mask, maps)
    assert data_residual(recon, kspace, mask, maps) < 0.01
    assert data_residual(recon, kspace, mask, maps) < start / 10


def test_noisy_data_is_regularised_not_overfitted() -> None:
    """With noise, a larger lam trades residual for image quality: residual near the noise level, better PSNR."""
    image = block_phantom()
    kspace, mask, maps = acquire(image, coils=4, pattern="poisson", acceleration=4, noise=0.01)
    plain = l1_wavelet_sense(kspace, mask, maps, lam=0.0, iterations=100, wavelet="haar")[0].abs().numpy()
    sparse = l1_wavelet_sense(kspace, mask, maps, lam=0.01, iterations=100, wavelet="haar")[0].abs().numpy()
    assert psnr(image, sparse) > psnr(image, plain) + 3.0


def test_lipschitz_constant_of_normalised_maps_is_one() -> None:
    """With sum_c |S_c|^2 = 1 and a mask that keeps everything, A^H A is the identity."""
    maps = torch.from_numpy(birdcage_maps(4, (32, 32)))[None]
    assert lipschitz(torch.ones(1, 1, 32, 32), maps) == pytest.approx(1.0, abs=1e-3)


def test_wavelet_prox_with_zero_threshold_is_the_identity() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.complex(torch.randn(2, 32, 32, generator=generator), torch.randn(2, 32, 32, generator=generator))
    assert torch.allclose(WaveletProx("db4", 2, (32, 32))(image, 0.0), image, atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 48), (45, 45), (47, 33), (16, 20)])
def test_wavelet_prox_works_at_sizes_too_small_or_odd_for_the_requested_levels(shape: tuple[int, int]) -> None:
    """db4 at 48² allows 2 levels, not the default 3; odd sides are mirrored out and cropped back."""
    generator = torch.Generator().manual_seed(1)
    image = torch.complex(torch.randn(2, *shape, generator=generator), torch.randn(2, *shape, generator=generator))
    prox = WaveletProx("db4", 3, shape)
    # pywt's own bound (an independent count): the coarsest band still at least one filter long.
    assert prox.levels == max(1, min(3, pywt.dwt_max_level(min(shape), pywt.Wavelet("db4").dec_len)))
    assert torch.allclose(prox(image, 0.0), image, atol=1e-5)
    shrunk = prox(image, 0.5)
    assert shrunk.shape == image.shape and torch.linalg.vector_norm(shrunk) < torch.linalg.vector_norm(image)


@pytest.mark.parametrize("size", [48, 45])
def test_cs_reconstructs_at_48_and_odd_sizes_with_db4(size: int) -> None:
    """The bench's 48² (and an odd size) with the default db4 / 3 levels: no error, and better than zero-filled."""
    image = block_phantom(size)
    kspace, mask, maps = acquire(image, coils=4, pattern="random", acceleration=4)
    zero_filled = l1_wavelet_sense(kspace, mask, maps, lam=0.0, iterations=1)[0].abs().numpy()
    sparse = l1_wavelet_sense(kspace, mask, maps, lam=0.005, iterations=50)[0].abs().numpy()
    assert sparse.shape == (size, size)
    assert psnr(image, sparse) > psnr(image, zero_filled)


def test_progress_is_reported_after_every_iteration() -> None:
    kspace, mask, maps = acquire(block_phantom(), coils=4, pattern="random", acceleration=4)
    done: list[int] = []
    with_progress = l1_wavelet_sense(kspace, mask, maps, iterations=7, on_iteration=done.append)
    assert done == list(range(1, 8))
    assert torch.equal(with_progress, l1_wavelet_sense(kspace, mask, maps, iterations=7))


def test_bad_arguments_are_refused() -> None:
    kspace, mask, maps = acquire(block_phantom(), coils=4, pattern="random", acceleration=4)
    with pytest.raises(ValueError, match="equal shape"):
        l1_wavelet_sense(kspace, mask, maps[:, :2])
    with pytest.raises(ValueError, match="lam >= 0"):
        l1_wavelet_sense(kspace, mask, maps, lam=-1.0)
    with pytest.raises(ValueError, match="not orthogonal"):
        l1_wavelet_sense(kspace, mask, maps, wavelet="bior2.2")


def test_iterates_of_one_run_equal_separate_runs_of_each_length() -> None:
    from common.cs import l1_wavelet_sense_iterates

    kspace, mask, maps = acquire(block_phantom(), coils=4, pattern="random", acceleration=4)
    kept = l1_wavelet_sense_iterates(kspace, mask, maps, lam=0.01, iterations=(3, 7))
    for count in (3, 7):
        assert torch.allclose(kept[count], l1_wavelet_sense(kspace, mask, maps, lam=0.01, iterations=count))
