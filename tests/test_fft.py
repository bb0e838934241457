"""Centred orthonormal FFTs and layout helpers, checked against an explicit DFT matrix and identities."""

import numpy as np
import pytest
import torch

from common.fft import (
    center_crop,
    channels_to_complex,
    complex_abs,
    complex_to_channels,
    fft2,
    fft2c,
    fft2c_np,
    ifft2,
    ifft2c,
    ifft2c_np,
    mask_to_natural_order,
    to_natural_order,
)

SIZES = [(8, 8), (7, 9), (6, 5)]


def centred_dft_matrix(n: int) -> np.ndarray:
    """Unitary DFT with indices counted from the centre (n // 2): F[k, j] = exp(-2 pi i (k-c)(j-c) / n) / sqrt(n)."""
    idx = np.arange(n) - n // 2
    return np.exp(-2j * np.pi * np.outer(idx, idx) / n) / np.sqrt(n)


def random_complex(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded complex64 Gaussian data: no structure the code under test could accidentally rely on."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("shape", SIZES)
def test_fft2c_matches_explicit_centred_dft(shape: tuple[int, int]) -> None:
    x = random_complex((3, *shape))
    expected = np.stack([centred_dft_matrix(shape[0]) @ xi @ centred_dft_matrix(shape[1]).T for xi in x])
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(fft2c_np(x), expected, atol=1e-5)


@pytest.mark.parametrize("shape", SIZES)
def test_ifft2c_is_conjugate_transpose_of_dft(shape: tuple[int, int]) -> None:
    k = random_complex((2, *shape), seed=1)
    fh, fw = centred_dft_matrix(shape[0]), centred_dft_matrix(shape[1])
    expected = np.stack([fh.conj().T @ ki @ fw.conj() for ki in k])
    np.testing.assert_allclose(ifft2c(torch.from_numpy(k)).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(ifft2c_np(k), expected, atol=1e-5)


@pytest.mark.parametrize("shape", SIZES)
def test_centre_delta_gives_flat_kspace(shape: tuple[int, int]) -> None:
    delta = np.zeros(shape, dtype=np.complex64)
    delta[shape[0] // 2, shape[1] // 2] = 1.0
    flat = np.full(shape, 1.0 / np.sqrt(shape[0] * shape[1]))
    np.testing.assert_allclose(fft2c_np(delta), flat, atol=1e-6)
    np.testing.assert_allclose(fft2c(torch.from_numpy(delta)).numpy(), flat, atol=1e-6)


def test_constant_image_puts_all_energy_at_kspace_centre() -> None:
    k = fft2c(torch.ones(7, 10, dtype=torch.complex64))
    assert torch.isclose(k[3, 5], torch.tensor(np.sqrt(70.0), dtype=torch.complex64))
    k[3, 5] = 0
    assert k.abs().max() < 1e-5


@pytest.mark.parametrize("shape", SIZES)
def test_parseval_and_round_trip(shape: tuple[int, int]) -> None:
    x = torch.from_numpy(random_complex((2, 3, *shape), seed=2))
    k = fft2c(x)
    assert k.shape == x.shape and k.dtype == torch.complex64
    torch.testing.assert_close(torch.sum(k.abs() ** 2), torch.sum(x.abs() ** 2), rtol=1e-5, atol=0)
    torch.testing.assert_close(ifft2c(k), x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ifft2c_np(fft2c_np(x.numpy())), x.numpy(), atol=1e-5)


def test_channels_layout_and_round_trip() -> None:
    x = torch.from_numpy(random_complex((2, 3, 5, 4), seed=3))
    ch = complex_to_channels(x)
    assert ch.shape == (2, 3, 2, 5, 4) and not ch.is_complex()
    torch.testing.assert_close(ch[:, :, 0], x.real)
    torch.testing.assert_close(ch[:, :, 1], x.imag)
    torch.testing.assert_close(channels_to_complex(ch), x)
    with pytest.raises(ValueError):
        channels_to_complex(torch.zeros(3, 5, 4))


def test_complex_abs() -> None:
    x = torch.from_numpy(random_complex((4, 6), seed=4))
    torch.testing.assert_close(complex_abs(x), torch.sqrt(x.real**2 + x.imag**2))
    with pytest.raises(TypeError):
        complex_abs(torch.zeros(4, 6))


@pytest.mark.parametrize(("size", "crop", "offset"), [((8, 9), (4, 5), (2, 2)), ((7, 6), (3, 3), (2, 1))])
def test_center_crop_offsets(size: tuple[int, int], crop: tuple[int, int], offset: tuple[int, int]) -> None:
    x = np.arange(size[0] * size[1]).reshape(size)
    out = center_crop(x, crop)
    assert out.shape == crop
    assert out[0, 0] == x[offset]
    torch.testing.assert_close(center_crop(torch.from_numpy(x)[None], crop)[0], torch.from_numpy(out))
    with pytest.raises(ValueError):
        center_crop(x, (size[0] + 1, 1))


@pytest.mark.parametrize("shape", SIZES)
def test_natural_order_is_the_unshifted_dft_of_the_same_image(shape: tuple[int, int]) -> None:
    """fft2 is the plain unitary DFT (numpy's, index 0 first), and to_natural_order maps centred k-space onto it."""
    x = random_complex((2, *shape), seed=3)
    natural = fft2(torch.from_numpy(x))
    np.testing.assert_allclose(natural.numpy(), np.fft.fft2(x, norm="ortho"), atol=1e-5)
    np.testing.assert_allclose(to_natural_order(fft2c(torch.from_numpy(x))).numpy(), natural.numpy(), atol=1e-5)
    np.testing.assert_allclose(ifft2(natural).numpy(), x, atol=1e-5)


@pytest.mark.parametrize("shape", SIZES)
def test_a_pointwise_kspace_operation_commutes_with_the_change_of_order(shape: tuple[int, int]) -> None:
    """Masking then mapping equals mapping then masking with the permuted mask: why DC may run in natural order."""
    k = torch.from_numpy(random_complex((2, *shape), seed=4))
    mask = torch.from_numpy((np.random.default_rng(5).random(shape) < 0.4).astype(np.float32))
    torch.testing.assert_close(to_natural_order(mask * k), mask_to_natural_order(mask) * to_natural_order(k))
    # The permuted mask keeps the sampled points' count and puts the centre sample at index (0, 0).
    assert mask_to_natural_order(mask).sum() == mask.sum()
    assert mask_to_natural_order(mask)[0, 0] == mask[shape[0] // 2, shape[1] // 2]
