"""Reconstruction models: the forward contract, parameter counts, end-to-end training and DC consistency."""

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from common.coils import birdcage_maps, rss, sense_adjoint
from common.dc import DataConsistency
from common.errors import ConfigError
from common.fft import fft2c, fft2c_np, ifft2c_np
from common.models import MODEL_NAMES, build_model, count_parameters
from common.models.unet import Unet
from common.models.unrolled import UnrolledNet
from common.models.varnet import VarNet

TINY: dict[str, dict[str, object]] = {
    "unet": {"chans": 8, "num_pool_layers": 2},
    "unrolled": {"num_cascades": 2, "chans": 8, "num_layers": 3},
    "varnet": {"num_cascades": 2, "chans": 4, "num_pool_layers": 2, "sens_chans": 4, "sens_pool_layers": 1},
}
# The unrolled net starts close to the target (zero-filled image + DC), so it needs a larger step to move.
LEARNING_RATE = {"unet": 3e-3, "unrolled": 1e-2, "varnet": 3e-3}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """The test machine is shared; one thread keeps these tests from starving other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def phantom(height: int, width: int) -> np.ndarray:
    """Two overlapping ellipses with a smooth phase: enough structure for undersampling artefacts."""
    yy, xx = np.mgrid[:height, :width]
    y = (yy - height / 2) / (height / 2)
    x = (xx - width / 2) / (width / 2)
    image = ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1).astype(np.float64)
    image += 0.5 * (((x - 0.2) / 0.25) ** 2 + ((y + 0.1) / 0.4) ** 2 < 1)
    return image * np.exp(1j * 0.5 * x)


def synthetic_batch(
    batch: int, coils: int, height: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked_kspace, mask, sens_maps, target) following the sample contract of ARCHITECTURE.md."""
    rng = np.random.default_rng(seed)
    maps = birdcage_maps(coils, (height, width)) if coils > 1 else np.ones((1, height, width), np.complex64)
    kspace, masks, targets = [], [], []
    for b in range(batch):
        image = np.roll(phantom(height, width), b, axis=-1)
        full = fft2c_np(maps * image)
        cols = (rng.random(width) < 0.25).astype(np.float32)
        cols[width // 2 - 3 : width // 2 + 3] = 1
        mask = np.broadcast_to(cols, (1, height, width))
        noise = 0.01 * (rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape))
        masked = mask * (full + noise)
        scale = 1.0 / rss(ifft2c_np(masked), dim=0).max()
        kspace.append(masked * scale)
        masks.append(mask)
        targets.append(rss(ifft2c_np(full), dim=0) * scale)
    maps_b = torch.from_numpy(np.broadcast_to(maps, (batch, *maps.shape)).copy())
    return stacked(kspace, np.complex64), stacked(masks, np.float32), maps_b, stacked(targets, np.float32)


def stacked(arrays: list[np.ndarray], dtype: type) -> torch.Tensor:
    """Stack per-slice numpy arrays into one batch tensor, as the default collate does."""
    return torch.from_numpy(np.stack(arrays).astype(dtype))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("coils", "height", "width"), [(1, 32, 32), (4, 32, 32), (1, 35, 29), (3, 33, 36)])
def test_forward_contract_shapes(name: str, coils: int, height: int, width: int) -> None:
    kspace, mask, maps, _ = synthetic_batch(2, coils, height, width)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(kspace, mask, maps)
    assert out.shape == (2, height, width)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts(name: str) -> None:
    model = build_model(name)
    count = count_parameters(model)
    # Independently: the length of the flat vector the weights are exchanged as.
    assert count == torch.nn.utils.parameters_to_vector(model.parameters()).numel() > 0
    assert count_parameters(build_model(name, **TINY[name])) < count


def test_learnable_lambda_adds_one_parameter_per_cascade() -> None:
    hard = UnrolledNet(num_cascades=3, chans=4, num_layers=3, lam=None, learnable_lam=False)
    learned = UnrolledNet(num_cascades=3, chans=4, num_layers=3, lam=5.0, learnable_lam=True)
    assert count_parameters(learned) - count_parameters(hard) == 3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_adam_steps_reduce_loss(name: str) -> None:
    torch.manual_seed(0)
    kspace, mask, maps, target = synthetic_batch(2, 4, 32, 32, seed=1)
    model = build_model(name, **TINY[name])
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE[name])
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.l1_loss(model(kspace, mask, maps), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.l1_loss(model(kspace, mask, maps), target).item()
    assert final < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_empty_slice_gives_finite_output_and_gradients(name: str) -> None:
    model = build_model(name, **TINY[name])
    _, mask, maps, _ = synthetic_batch(1, 2, 32, 32)
    out = model(torch.zeros(1, 2, 32, 32, dtype=torch.complex64), mask, maps)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hard_dc_unrolled_output_matches_measured_kspace_single_coil() -> None:
    kspace, mask, maps, _ = synthetic_batch(2, 1, 32, 30, seed=2)
    model = UnrolledNet(num_cascades=2, chans=8, num_layers=3, lam=None, learnable_lam=False)
    with torch.no_grad():
        recon = model.reconstruct(kspace, mask, maps)
        out = model(kspace, mask, maps)
    torch.testing.assert_close(out, recon.abs())
    sampled = mask[:, 0] > 0
    torch.testing.assert_close(fft2c(recon)[sampled], kspace[:, 0][sampled], atol=1e-5, rtol=0)


def test_unrolled_ends_with_per_coil_hard_dc_multicoil() -> None:
    kspace, mask, maps, _ = synthetic_batch(2, 4, 32, 32, seed=3)
    model = UnrolledNet(num_cascades=2, chans=8, num_layers=3, lam=None, learnable_lam=False)
    seen: dict[str, torch.Tensor] = {}
    model.cascades[-1].dc.register_forward_hook(lambda _m, args, out: seen.update(pre=args[0], post=out))
    with torch.no_grad():
        out = model(kspace, mask, maps)
    pre, k, m, s = seen["pre"].numpy(), kspace.numpy(), mask.numpy()[:, 0] > 0, maps.numpy()
    expected = np.zeros_like(pre)
    for c in range(4):
        kc = np.where(m, k[:, c], fft2c_np(s[:, c] * pre))
        expected += np.conj(s[:, c]) * ifft2c_np(kc)
    np.testing.assert_allclose(seen["post"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), np.abs(expected), atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (33, 30)])
def test_unrolled_equals_cascades_of_centred_dc(height: int, width: int) -> None:
    """The network runs its DC in natural k-space order; the output and every gradient are the centred loop's."""
    kspace, mask, maps, target = synthetic_batch(2, 3, height, width, seed=5)
    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=3, chans=8, num_layers=3, lam=2.0, learnable_lam=True)
    fast = torch.nn.functional.l1_loss(model(kspace, mask, maps), target)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    image = sense_adjoint(kspace, maps)
    for cascade in model.cascades:
        dc = DataConsistency(lam=2.0, learnable=True)
        dc.log_lam = cascade.dc.log_lam  # the same parameter, so its gradient lands in the model
        image = dc(cascade.cnn(image), kspace, mask, maps)
    reference = torch.nn.functional.l1_loss(image.abs(), target)
    reference.backward()
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)
    for got, expected in zip(fast_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_varnet_estimates_normalised_maps_and_ignores_given_ones() -> None:
    kspace, mask, maps, _ = synthetic_batch(2, 4, 32, 32, seed=4)
    model = VarNet(**TINY["varnet"]).eval()
    with torch.no_grad():
        estimated = model.sensitivity_maps(kspace, mask, maps)
        energy = (estimated.abs() ** 2).sum(dim=1)
        torch.testing.assert_close(energy, torch.ones_like(energy), atol=1e-4, rtol=0)
        torch.testing.assert_close(model(kspace, mask, maps), model(kspace, mask, torch.zeros_like(maps)))


def test_varnet_can_use_given_maps() -> None:
    kspace, mask, maps, _ = synthetic_batch(1, 4, 32, 32, seed=5)
    model = VarNet(**TINY["varnet"], estimate_maps=False).eval()
    assert model.sens_net is None
    with torch.no_grad():
        assert torch.equal(model.sensitivity_maps(kspace, mask, maps), maps)
        assert not torch.allclose(model(kspace, mask, maps), model(kspace, mask, maps.conj()))


@pytest.mark.parametrize(("height", "width"), [(16, 16), (17, 23), (31, 18)])
def test_unet_keeps_odd_sizes(height: int, width: int) -> None:
    net = Unet(3, 2, chans=4, num_pool_layers=3)
    assert net(torch.randn(2, 3, height, width)).shape == (2, 2, height, width)


def test_unet_rejects_images_too_small_for_its_depth() -> None:
    with pytest.raises(ValueError, match="too small"):
        Unet(1, 1, chans=4, num_pool_layers=3)(torch.randn(1, 1, 15, 40))


def test_build_model_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^site\.toml: model: unknown model 'resnet'"):
        build_model("resnet", source="site.toml")
    with pytest.raises(ConfigError, match=r"model\.depth: not an option of model 'unet'"):
        build_model("unet", depth=3)
    with pytest.raises(ConfigError, match="num_cascades"):
        build_model("varnet", num_cascades=0)
    with pytest.raises(ConfigError, match="lam"):
        build_model("unrolled", lam=-1.0)
