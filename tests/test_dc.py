"""Closed-form and gradient data consistency, checked against numpy hand computations of eq. 4."""

import math

import numpy as np
import pytest
import torch

from common.coils import birdcage_maps
from common.dc import DataConsistency, GradientDC
from common.fft import fft2c, fft2c_np, ifft2c_np, mask_to_natural_order, to_natural_order

H, W = 24, 20


def random_complex(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded complex64 Gaussian data: no structure the code under test could accidentally rely on."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def column_mask(batch: int = 2, seed: int = 0) -> np.ndarray:
    """(B, 1, H, W) mask: random columns plus four centre lines, as an undersampling mask would be."""
    rng = np.random.default_rng(seed)
    cols = (rng.random((batch, 1, 1, W)) < 0.3).astype(np.float32)
    cols[..., W // 2 - 2 : W // 2 + 2] = 1
    return np.broadcast_to(cols, (batch, 1, H, W)).copy()


def single_coil_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimate image (B,H,W), measured k-space (B,1,H,W) and mask (B,1,H,W) for a noisy single-coil scan."""
    truth = random_complex((2, H, W), seed)
    mask = column_mask(seed=seed)
    noise = 0.05 * random_complex((2, 1, H, W), seed + 1)
    measured = (mask * (fft2c_np(truth)[:, None] + noise)).astype(np.complex64)
    estimate = truth + 0.3 * random_complex((2, H, W), seed + 2)
    return estimate, measured, mask


def as_torch(*arrays: np.ndarray) -> list[torch.Tensor]:
    """Zero-copy numpy -> torch, so the reference and the code under test see identical inputs."""
    return [torch.from_numpy(a) for a in arrays]


def test_hard_dc_replaces_sampled_kspace_exactly_and_keeps_the_rest() -> None:
    estimate, measured, mask = as_torch(*single_coil_problem())
    k = fft2c(estimate)[:, None].expand(-1, 3, -1, -1)
    y = measured.expand(-1, 3, -1, -1)
    out = DataConsistency().kspace_dc(k, y, mask)
    sampled = mask.expand_as(k) > 0
    assert torch.equal(out[sampled], y[sampled])
    assert torch.equal(out[~sampled], k[~sampled])

    image_out = DataConsistency()(estimate, measured, mask)
    k_out = fft2c(image_out)
    torch.testing.assert_close(k_out[mask[:, 0] > 0], measured[:, 0][mask[:, 0] > 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(k_out[mask[:, 0] == 0], fft2c(estimate)[mask[:, 0] == 0], atol=1e-5, rtol=0)


def test_large_lambda_approaches_hard_replacement() -> None:
    estimate, measured, mask = as_torch(*single_coil_problem(seed=3))
    soft = DataConsistency(lam=1e6)(estimate, measured, mask)
    hard = DataConsistency()(estimate, measured, mask)
    torch.testing.assert_close(soft, hard, atol=1e-4, rtol=0)


def test_hard_dc_twice_equals_once() -> None:
    estimate, measured, mask = as_torch(*single_coil_problem(seed=4))
    dc = DataConsistency()
    once = dc(estimate, measured, mask)
    torch.testing.assert_close(dc(once, measured, mask), once, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lam", [0.1, 2.0, 37.0])
def test_soft_dc_matches_hand_computed_closed_form(lam: float) -> None:
    estimate, measured, mask = single_coil_problem(seed=5)
    xf = fft2c_np(estimate)
    y = measured[:, 0]
    sampled = mask[:, 0] > 0
    expected_k = np.where(sampled, (xf + lam * y) / (1 + lam), xf)
    expected = ifft2c_np(expected_k)
    for learnable in (False, True):
        out = DataConsistency(lam=lam, learnable=learnable)(*as_torch(estimate, measured, mask))
        np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-5)
        k_out = fft2c(out.detach()).numpy()
        np.testing.assert_allclose(k_out[~sampled], xf[~sampled], atol=1e-5)
        # Soft DC is a weighted average, not a projection: a second pass moves the sampled points again.
        twice = fft2c(DataConsistency(lam=lam)(out.detach(), *as_torch(measured, mask))).numpy()
        assert not np.allclose(twice[sampled], k_out[sampled], atol=1e-4)


def test_multicoil_dc_matches_per_coil_numpy_loop() -> None:
    lam = 3.0
    coils = 4
    maps = np.broadcast_to(birdcage_maps(coils, (H, W)), (2, coils, H, W)).copy()
    truth = random_complex((2, H, W), seed=6)
    mask = column_mask(seed=6)
    measured = (mask * fft2c_np(maps * truth[:, None])).astype(np.complex64)
    estimate = truth + 0.5 * random_complex((2, H, W), seed=7)

    expected = np.zeros((2, H, W), dtype=np.complex128)
    for c in range(coils):
        kc = fft2c_np(maps[:, c] * estimate)
        kc = np.where(mask[:, 0] > 0, (kc + lam * measured[:, c]) / (1 + lam), kc)
        expected += np.conj(maps[:, c]) * ifft2c_np(kc)
    out = DataConsistency(lam=lam)(*as_torch(estimate, measured, mask, maps))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("lam", [None, 3.0])
@pytest.mark.parametrize(("height", "width"), [(H, W), (15, 18)])
def test_natural_order_dc_gives_the_centred_result(lam: float | None, height: int, width: int) -> None:
    """The layer with natural-order data (no shifts inside) returns the same image, value and gradient."""
    coils = 3
    maps = np.broadcast_to(birdcage_maps(coils, (height, width)), (2, coils, height, width)).copy()
    rng = np.random.default_rng(13)
    mask = np.broadcast_to((rng.random((2, 1, 1, width)) < 0.4).astype(np.float32), (2, 1, height, width)).copy()
    measured = (mask * random_complex((2, coils, height, width), seed=14)).astype(np.complex64)
    estimate, measured_t, mask_t, maps_t = as_torch(random_complex((2, height, width), seed=15), measured, mask, maps)
    outputs, grads = [], []
    for order, data, sampling in (
        ("centred", measured_t, mask_t),
        ("natural", to_natural_order(measured_t), mask_to_natural_order(mask_t)),
    ):
        dc = DataConsistency(lam=lam, learnable=lam is not None, kspace_order=order)
        x = estimate.clone().requires_grad_(True)
        out = dc(x, data, sampling, maps_t)
        out.abs().sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad, *(p.grad for p in dc.parameters())])
        single = dc(x.detach(), data[:, :1], sampling)  # the single-coil path too
        outputs.append(single)
    for centred, natural in zip(outputs[:2], outputs[2:], strict=True):
        torch.testing.assert_close(natural, centred, atol=1e-5, rtol=1e-5)
    for centred, natural in zip(*grads, strict=True):
        torch.testing.assert_close(natural, centred, atol=1e-4, rtol=1e-4)


def test_unknown_kspace_order_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="kspace_order"):
        DataConsistency(kspace_order="shifted")


@pytest.mark.parametrize("lam", [None, 0.5])
def test_multicoil_with_one_unit_coil_reproduces_single_coil(lam: float | None) -> None:
    estimate, measured, mask = as_torch(*single_coil_problem(seed=8))
    ones = torch.ones(2, 1, H, W, dtype=torch.complex64)
    dc = DataConsistency(lam=lam)
    torch.testing.assert_close(dc(estimate, measured, mask, ones), dc(estimate, measured, mask), atol=1e-6, rtol=0)


def test_single_coil_path_refuses_multicoil_kspace() -> None:
    estimate, measured, mask = as_torch(*single_coil_problem())
    with pytest.raises(ValueError, match="C = 1"):
        DataConsistency()(estimate, measured.expand(-1, 2, -1, -1), mask)


def test_gradient_flows_to_learnable_lambda_and_lambda_stays_positive() -> None:
    estimate, measured, mask = as_torch(*single_coil_problem(seed=9))
    target = torch.from_numpy(random_complex((2, H, W), seed=10))
    dc = DataConsistency(lam=1.5, learnable=True)
    assert [name for name, _ in dc.named_parameters()] == ["log_lam"]
    loss = (dc(estimate, measured, mask) - target).abs().pow(2).sum()
    loss.backward()
    assert dc.log_lam.grad is not None and dc.log_lam.grad.abs() > 0
    with torch.no_grad():
        dc.log_lam.fill_(-60.0)
    assert dc.lam > 0


def test_fixed_lambda_is_saved_but_not_trained() -> None:
    dc = DataConsistency(lam=2.0)
    assert list(dc.parameters()) == []
    assert math.isclose(float(dc.state_dict()["log_lam"].exp()), 2.0, rel_tol=1e-6)
    assert DataConsistency().hard and DataConsistency().lam is None


@pytest.mark.parametrize(("lam", "learnable"), [(None, True), (0.0, False), (-1.0, True), (math.inf, False)])
def test_invalid_lambda_is_rejected(lam: float | None, learnable: bool) -> None:
    with pytest.raises(ValueError):
        DataConsistency(lam=lam, learnable=learnable)


def test_gradient_dc_matches_hand_formula_and_trains_eta() -> None:
    k = random_complex((2, 3, H, W), seed=11)
    y = random_complex((2, 3, H, W), seed=12)
    mask = column_mask(seed=11)
    y = y * mask
    eta = 0.7
    expected = k - eta * mask * (k - y)
    step = GradientDC(eta=eta)
    out = step(*as_torch(k, y, mask))
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-6)
    out.abs().sum().backward()
    assert step.eta.grad is not None and step.eta.grad.abs() > 0

    full_step = GradientDC(eta=1.0, learnable=False)
    out = full_step(*as_torch(k, y, mask)).numpy()
    sampled = np.broadcast_to(mask > 0, k.shape)
    np.testing.assert_allclose(out[sampled], y[sampled], atol=1e-6)
    np.testing.assert_array_equal(out[~sampled], k[~sampled])
    assert list(full_step.parameters()) == []
