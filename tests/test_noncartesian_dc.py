"""Non-Cartesian DC (CG-SENSE and gradient step) against dense linear algebra, and through every model."""

import math

import numpy as np
import pytest
import torch

from common.dc import DataConsistency
from common.fft import fft2c
from common.models import MODEL_NAMES, build_model
from common.noncartesian_dc import cg_sense_dc, gradient_dc
from common.nufft import SenseNufft, density_compensation
from common.trajectories import golden_angle_radial


def _dense_operator(maps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Dense A (C*K, H*W) from the NDFT formula: the independent reference for small problems."""
    coils, height, width = maps.shape
    rows = np.arange(height) - height // 2
    cols = np.arange(width) - width // 2
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    fourier = np.exp(-2j * np.pi * coords.astype(np.float64) @ grid.T) / math.sqrt(height * width)
    return np.concatenate([fourier * maps[c].reshape(1, -1) for c in range(coils)])


def _problem(dtype=torch.complex64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    height, width, coils, count = 8, 6, 2, 70
    maps = torch.randn(1, coils, height, width, dtype=dtype, generator=generator)
    maps = maps / torch.linalg.vector_norm(maps, dim=1, keepdim=True)
    coords = torch.rand(1, count, 2, generator=generator, dtype=torch.float64).float() - 0.5
    dcf = torch.rand(1, count, generator=generator) + 0.5
    image = torch.randn(1, height, width, dtype=dtype, generator=generator)
    samples = torch.randn(1, coils, count, dtype=dtype, generator=generator)
    return SenseNufft(maps, coords, dcf.to(maps.real.dtype)), maps, coords, dcf, image, samples


def _dense_solution(maps, coords, dcf, image, samples, lam):
    a = _dense_operator(maps[0].numpy(), coords[0].numpy())
    d = np.tile(dcf[0].numpy().astype(np.float64), maps.shape[1])
    normal = a.conj().T @ (d[:, None] * a)
    rhs = image[0].numpy().reshape(-1) + lam * a.conj().T @ (d * samples[0].numpy().reshape(-1))
    return np.linalg.solve(np.eye(normal.shape[0]) + lam * normal, rhs), a, d


def test_cg_sense_solves_the_regularised_normal_equations():
    operator, maps, coords, dcf, image, samples = _problem()
    lam = 0.7
    expected, _, _ = _dense_solution(maps, coords, dcf, image, samples, lam)
    got = cg_sense_dc(image, operator.gridded(samples), operator, torch.tensor(lam), iterations=60).numpy().reshape(-1)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


def test_gradient_dc_is_one_weighted_gradient_step():
    operator, maps, coords, dcf, image, samples = _problem(seed=1)
    lam = 2.0
    _, a, d = _dense_solution(maps, coords, dcf, image, samples, lam)
    x = image[0].numpy().reshape(-1)
    expected = x - lam / (1 + lam) * a.conj().T @ (d * (a @ x - samples[0].numpy().reshape(-1)))
    got = gradient_dc(image, operator.gridded(samples), operator, torch.tensor(lam)).numpy().reshape(-1)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


def test_both_equal_the_cartesian_closed_form_on_a_full_grid():
    """On the full Cartesian grid with D = 1 and one coil, both reduce to eq. 4 of the Cartesian layer."""
    height, width = 8, 8
    rows, cols = torch.meshgrid(
        (torch.arange(height) - height // 2) / height, (torch.arange(width) - width // 2) / width, indexing="ij"
    )
    coords = torch.stack((rows.reshape(-1), cols.reshape(-1)), dim=-1)[None]
    maps = torch.ones(1, 1, height, width, dtype=torch.complex64)
    operator = SenseNufft(maps, coords, torch.ones(1, height * width))
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, height, width, dtype=torch.complex64, generator=generator)
    truth = torch.randn(1, height, width, dtype=torch.complex64, generator=generator)
    kspace = fft2c(truth)[:, None]
    expected = DataConsistency(lam=1.5)(image, kspace, torch.ones(1, 1, height, width))
    samples = kspace.reshape(1, 1, -1)
    data_adjoint = operator.gridded(samples)
    for got in (
        gradient_dc(image, data_adjoint, operator, torch.tensor(1.5)),
        cg_sense_dc(image, data_adjoint, operator, torch.tensor(1.5), iterations=3),
    ):
        assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-5


def test_gradcheck_through_cg_sense_dc():
    operator, *_, image, samples = _problem(dtype=torch.complex128, seed=4)
    operator.dcf = operator.dcf.double()
    image = image.requires_grad_()
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    data_adjoint = operator.gridded(samples)
    assert torch.autograd.gradcheck(
        lambda x, weight: cg_sense_dc(x, data_adjoint, operator, weight, iterations=3),
        (image, lam),
        atol=1e-6,
        fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda x, weight: gradient_dc(x, data_adjoint, operator, weight), (image, lam), atol=1e-6, fast_mode=True
    )


def test_unrolled_model_runs_both_kinds_of_site_with_one_state():
    torch.manual_seed(0)
    model = build_model("unrolled", num_cascades=2, chans=4, num_layers=3, lam=1.0)
    cartesian = model(
        torch.randn(2, 3, 16, 16, dtype=torch.complex64),
        torch.ones(2, 1, 16, 16),
        torch.ones(2, 3, 16, 16, dtype=torch.complex64) / math.sqrt(3),
    )
    coords = (torch.rand(50, 2) - 0.5)[None].expand(2, -1, -1)
    trajectory = torch.cat((coords, torch.ones(2, 50, 1)), dim=-1)
    radial = model(
        torch.randn(2, 3, 50, dtype=torch.complex64),
        trajectory,
        torch.ones(2, 3, 16, 16, dtype=torch.complex64) / math.sqrt(3),
    )
    assert cartesian.shape == radial.shape == (2, 16, 16)
    radial.sum().backward()
    lam_grads = [cascade.dc.log_lam.grad for cascade in model.cascades]
    assert all(g is not None and torch.isfinite(g) and g != 0 for g in lam_grads)


def test_varnet_non_cartesian_cascades_equal_the_cartesian_ones_on_a_full_grid():
    """On the full grid (D = 1) with maps that have S^H S = 1 everywhere, the image-domain twin is exact."""
    torch.manual_seed(1)
    size, coils = 16, 2
    model = build_model("varnet", num_cascades=2, chans=4, num_pool_layers=2, estimate_maps=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    maps = torch.stack([torch.ones(size, size), torch.exp(1j * (xx + 0.5 * yy))]).to(torch.complex64)[None]
    maps = maps / math.sqrt(coils)
    truth = torch.randn(1, size, size, dtype=torch.complex64)
    kspace = fft2c(maps * truth[:, None])
    with torch.no_grad():
        for cascade in model.cascades:
            cascade.dc.eta.fill_(0.7)
        expected = model(kspace, torch.ones(1, 1, size, size), maps)
        rows, cols = torch.meshgrid(
            (torch.arange(size) - size // 2) / size, (torch.arange(size) - size // 2) / size, indexing="ij"
        )
        coords = torch.stack((rows.reshape(-1), cols.reshape(-1)), dim=-1)
        trajectory = torch.cat((coords, torch.ones(size * size, 1)), dim=-1)[None]
        got = model(kspace.reshape(1, coils, -1), trajectory, maps)
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_at_radial_and_cartesian_sites_with_one_state(name: str):
    """Which models a radial site may use is every registered one: a new model must support it too."""
    torch.manual_seed(0)
    small = {
        "unet": {"chans": 4, "num_pool_layers": 2},
        "unrolled": {"num_cascades": 2, "chans": 4, "lam": 1.0},
        "varnet": {"num_cascades": 2, "chans": 4, "num_pool_layers": 2},
    }
    model = build_model(name, **small[name])
    maps = torch.ones(2, 3, 16, 16, dtype=torch.complex64) / math.sqrt(3)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., ::2] = 1.0
    mask[..., 6:10] = 1.0
    cartesian = model(torch.randn(2, 3, 16, 16, dtype=torch.complex64) * mask, mask, maps)
    coords = golden_angle_radial(8, 32, 16, 2.0)
    trajectory = torch.cat((coords, density_compensation(coords, (16, 16))[:, None]), dim=-1)[None].expand(2, -1, -1)
    radial = model(torch.randn(2, 3, coords.shape[0], dtype=torch.complex64), trajectory, maps)
    assert cartesian.shape == radial.shape == (2, 16, 16)
    radial.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
