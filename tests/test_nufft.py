"""NUFFT operator (common.nufft) against independent computations: exact NDFT, torchkbnufft, fft2c."""

import math

import numpy as np
import pytest
import torch

from common.fft import fft2c
from common.nufft import (
    SenseNufft,
    density_compensation,
    estimate_maps_from_centre,
    nufft,
    nufft_adjoint,
    toeplitz_kernel,
    toeplitz_normal,
    voronoi_areas,
    weight_caps,
)


def _rand_complex(*shape: int, seed: int = 0, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _rand_coords(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 2, generator=torch.Generator().manual_seed(seed)) - 0.5


def _ndft(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Direct sum y_j = sum_n x[n] exp(-2 pi i k_j . (n - N//2)) / sqrt(HW), in float64."""
    height, width = image.shape
    rows = np.arange(height) - height // 2
    cols = np.arange(width) - width // 2
    phase_y = np.exp(-2j * np.pi * np.outer(coords[:, 0], rows))  # (K, H)
    phase_x = np.exp(-2j * np.pi * np.outer(coords[:, 1], cols))  # (K, W)
    return np.einsum("kh,hw,kw->k", phase_y, image, phase_x) / math.sqrt(height * width)


def _radial(spokes: int, readout: int) -> torch.Tensor:
    angles = torch.arange(spokes, dtype=torch.float64) * math.radians(111.246)
    radius = (torch.arange(readout, dtype=torch.float64) - readout / 2 + 0.5) / readout
    ky = torch.outer(torch.sin(angles), radius)
    kx = torch.outer(torch.cos(angles), radius)
    return torch.stack((ky.reshape(-1), kx.reshape(-1)), dim=-1).float()


def test_forward_matches_exact_ndft_at_32():
    image = _rand_complex(32, 32)
    coords = _rand_coords(500)
    expected = _ndft(image.numpy().astype(np.complex128), coords.numpy().astype(np.float64))
    got = nufft(image, coords).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-4


def test_adjointness_to_1e5():
    image = _rand_complex(3, 32, 24, seed=2)
    samples = _rand_complex(3, 700, seed=3)
    coords = _rand_coords(700, seed=4)
    lhs = torch.sum(nufft(image, coords) * samples.conj())
    rhs = torch.sum(image * nufft_adjoint(samples, coords, (32, 24)).conj())
    assert abs(complex(lhs - rhs)) / abs(complex(lhs)) <= 1e-5


def test_cartesian_grid_equals_fft2c():
    height, width = 16, 12
    image = _rand_complex(height, width, seed=5)
    rows, cols = torch.meshgrid(
        (torch.arange(height) - height // 2) / height, (torch.arange(width) - width // 2) / width, indexing="ij"
    )
    coords = torch.stack((rows.reshape(-1), cols.reshape(-1)), dim=-1)
    got = nufft(image, coords).reshape(height, width)
    expected = fft2c(image)
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-5


def test_agrees_with_torchkbnufft():
    tkbn = pytest.importorskip("torchkbnufft")
    size = 32
    image = _rand_complex(1, 2, size, size, seed=6)
    coords = _rand_coords(400, seed=7)
    omega = (2.0 * math.pi * coords).T.contiguous()
    # torchkbnufft's unnormalised transform over the same centred image; our scale is 1/sqrt(HW).
    reference = tkbn.KbNufft(im_size=(size, size))(image, omega) / size
    got = nufft(image, coords)
    assert torch.linalg.vector_norm(got - reference) / torch.linalg.vector_norm(reference) < 5e-3
    samples = _rand_complex(1, 2, 400, seed=8)
    reference_adj = tkbn.KbNufftAdjoint(im_size=(size, size))(samples, omega) / size
    got_adj = nufft_adjoint(samples, coords, (size, size))
    assert torch.linalg.vector_norm(got_adj - reference_adj) / torch.linalg.vector_norm(reference_adj) < 5e-3


def test_gradcheck_forward_and_adjoint():
    coords = _rand_coords(40, seed=9)
    image = _rand_complex(2, 6, 5, seed=10, dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: nufft(x, coords), (image,), atol=1e-7)
    samples = _rand_complex(2, 40, seed=11, dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda y: nufft_adjoint(y, coords, (6, 5)), (samples,), atol=1e-7)


def test_toeplitz_normal_equals_adjoint_of_forward():
    coords = _radial(21, 48)
    weights = torch.rand(coords.shape[0], generator=torch.Generator().manual_seed(12))
    image = _rand_complex(2, 24, 20, seed=13)
    direct = nufft_adjoint(weights * nufft(image, coords), coords, (24, 20))
    fast = toeplitz_normal(image, toeplitz_kernel(coords, (24, 20), weights))
    assert torch.linalg.vector_norm(fast - direct) / torch.linalg.vector_norm(direct) < 1e-4


def test_voronoi_density_is_a_radial_ramp():
    """For radial spokes the ideal density weight is proportional to |k| (away from the centre)."""
    coords = _radial(128, 128)  # dense enough that no weight reaches its cap
    dcf = density_compensation(coords, (64, 64))
    radius = torch.linalg.vector_norm(coords, dim=-1)
    inner = dcf[(radius > 0.18) & (radius < 0.22)].mean()
    outer = dcf[(radius > 0.38) & (radius < 0.42)].mean()
    assert float(outer / inner) == pytest.approx(2.0, rel=0.15)
    assert torch.all(dcf > 0)


def test_weight_caps_are_the_readout_step_in_nyquist_cells():
    """A radial spoke with 2x readout oversampling: each sample stands for at most half a Nyquist cell."""
    from common.trajectories import golden_angle_radial

    coords = golden_angle_radial(8, 64, 32, 2.0)
    assert torch.allclose(weight_caps(coords, (32, 32)), torch.full((coords.shape[0],), 0.5), atol=1e-5)
    sparse = golden_angle_radial(8, 16, 32, 0.5)  # readout step 2 / N: only the one-cell cap binds
    assert torch.allclose(weight_caps(sparse, (32, 32)), torch.ones(sparse.shape[0]))
    dcf = density_compensation(golden_angle_radial(6, 64, 32, 2.0), (32, 32))  # R = 8: sparse edge
    assert float(dcf.max()) <= 0.5 + 1e-6


def test_gridded_recovers_smooth_image_and_maps_are_normalised():
    """A^H D A on a well-sampled radial scan is close to identity for a smooth, band-limited object."""
    size = 32
    coords = _radial(80, 64)
    dcf = density_compensation(coords, (size, size))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    obj = torch.exp(-(xx**2 + yy**2) / 0.2).to(torch.complex64)
    maps = torch.stack([torch.ones(size, size), torch.exp(1j * xx)]).to(torch.complex64) / math.sqrt(2.0)
    operator = SenseNufft(maps[None], coords[None], dcf[None])
    recon = operator.gridded(operator.forward(obj[None]))[0]
    assert torch.linalg.vector_norm(recon - obj) / torch.linalg.vector_norm(obj) < 0.06
    normal = operator.normal(obj[None])[0]
    assert torch.linalg.vector_norm(normal - recon) / torch.linalg.vector_norm(recon) < 1e-4
    estimated = estimate_maps_from_centre(operator.forward(obj[None])[0], coords, dcf, (size, size))
    energy = (estimated.abs() ** 2).sum(dim=0)
    assert torch.allclose(energy[8:24, 8:24], torch.ones(16, 16), atol=1e-4)


def test_refuses_bad_shapes():
    with pytest.raises(ValueError, match="coords must be"):
        nufft(_rand_complex(8, 8), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="complex"):
        nufft(torch.zeros(8, 8), torch.zeros(5, 2))


def test_voronoi_areas_of_a_grid_and_of_coincident_samples():
    """Interior cells of a Cartesian grid are 1/N^2; coincident samples split their cell evenly."""
    size = 16
    grid = np.stack(np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2, indexing="ij"), -1)
    points = grid.reshape(-1, 2) / size
    areas = voronoi_areas(points, guard_spacing=1.0 / size)
    interior = np.all(np.abs(grid.reshape(-1, 2)) <= size // 2 - 2, axis=1)
    assert np.allclose(areas[interior], 1.0 / size**2)
    doubled = voronoi_areas(np.concatenate((points, points[:1])), guard_spacing=1.0 / size)
    assert doubled[0] == pytest.approx(areas[0] / 2) and doubled[-1] == pytest.approx(areas[0] / 2)


def test_density_weights_on_a_cartesian_subset_reproduce_cartesian_zero_filling():
    """A trajectory on the grid (calibration rows + every 4th row) is zero-filled exactly as fft2c would be.

    Cartesian zero-filling keeps weight 1 on every sampled line at any R; uncapped Voronoi weights gave
    the outer rows weight 4 (their cell spans the gap), multiplying their aliasing fourfold.
    """
    size = 32
    rows = [r for r in range(size) if abs(r - size // 2) < 4 or r % 4 == 0]
    ky, kx = torch.meshgrid(
        (torch.tensor(rows) - size // 2) / size, (torch.arange(size) - size // 2) / size, indexing="ij"
    )
    coords = torch.stack((ky.reshape(-1), kx.reshape(-1)), dim=-1)
    dcf = density_compensation(coords, (size, size))
    assert torch.allclose(dcf, torch.ones_like(dcf), atol=1e-3)
    image = _rand_complex(size, size, seed=14)
    mask = torch.zeros(size, 1)
    mask[rows] = 1.0
    expected = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(mask * fft2c(image)), norm="ortho"))
    got = nufft_adjoint(dcf * nufft(image, coords), coords, (size, size))
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-3


def _sharp_phantom(size: int) -> torch.Tensor:
    """An ellipse with a darker inner ellipse and small bright squares: edges at every scale, like anatomy."""
    yy, xx = np.mgrid[:size, :size] - size // 2
    obj = ((yy / (0.38 * size)) ** 2 + (xx / (0.3 * size)) ** 2 < 1).astype(np.float64)
    obj -= 0.5 * ((((yy - size // 10) / (0.12 * size)) ** 2 + (xx / (0.09 * size)) ** 2) < 1)
    for row, col in ((-8, -6), (-8, 4), (6, -8), (10, 6)):
        r, c = size // 2 + row * size // 64, size // 2 + col * size // 64
        obj[r : r + max(2, size // 32), c : c + max(2, size // 32)] = 1.5
    return torch.from_numpy(obj).to(torch.complex64)


@pytest.mark.parametrize("acceleration", [4.0, 8.0])
def test_undersampled_radial_zero_filled_matches_or_beats_pipe_menon(acceleration: float):
    """At R = 4 and 8 the zero-filled image has the object's intensity and is no worse than torchkbnufft's.

    The reference is torchkbnufft's adjoint with its own Pipe-Menon weights, given the best possible
    (least-squares) intensity scale, an independent computation. Uncapped Voronoi weights were 2.6 dB
    (R = 4) and 4.5 dB (R = 8) worse than it on this phantom, and 5 % and 11 % too bright.
    """
    tkbn = pytest.importorskip("torchkbnufft")
    from common.trajectories import golden_angle_radial, radial_spokes_for

    size = 64
    image = _sharp_phantom(size)
    coords = golden_angle_radial(radial_spokes_for(size, acceleration), 2 * size, size, 2.0)
    samples = nufft(image, coords)
    ours = nufft_adjoint(density_compensation(coords, (size, size)) * samples, coords, (size, size))
    omega = (2.0 * math.pi * coords).T.contiguous()
    pipe_menon = tkbn.calc_density_compensation_function(ktraj=omega, im_size=(size, size))[0, 0]
    reference = nufft_adjoint(pipe_menon * samples, coords, (size, size)).abs()
    target = image.abs()
    reference = reference * torch.sum(reference * target) / torch.sum(reference**2)

    def nmse(x: torch.Tensor) -> float:
        return float(torch.sum((x - target) ** 2) / torch.sum(target**2))

    assert nmse(ours.abs()) <= nmse(reference)
    scale = float(torch.sum(ours.abs() * target) / torch.sum(ours.abs() ** 2))
    assert scale == pytest.approx(1.0, abs=0.03)
