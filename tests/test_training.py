"""Local training: FedProx's proximal term, mu = 0 equals FedAvg, and volume-level evaluation."""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.fft import fft2c
from common.models import build_model
from common.training import evaluate, proximal_term, train


def synthetic_samples(n: int = 6, size: int = 24, seed: int = 0) -> list[dict[str, object]]:
    """Single-coil slices of smooth random images, undersampled by random columns + centre."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    samples = []
    for i in range(n):
        blobs = sum(
            torch.rand((), generator=g)
            * torch.exp(
                -((xx - torch.rand((), generator=g) + 0.5) ** 2 + (yy - torch.rand((), generator=g) + 0.5) ** 2) / 0.1
            )
            for _ in range(3)
        )
        image = (blobs * (xx**2 + yy**2 < 0.8)).to(torch.complex64)
        mask = (torch.rand(size, generator=g) < 0.3).float()
        mask[size // 2 - 2 : size // 2 + 2] = 1
        mask2d = mask.expand(size, size).unsqueeze(0)
        kspace = fft2c(image).unsqueeze(0) * mask2d
        samples.append(
            {
                "masked_kspace": kspace,
                "mask": mask2d,
                "sens_maps": torch.ones(1, size, size, dtype=torch.complex64),
                "target": image.abs(),
                "scale": 1.0,
                "max_value": float(image.abs().max()),
                "fname": f"vol{i // 3}.h5",
                "subject": f"s{i // 3}",
                "site": "synthetic",
                "slice_idx": i % 3,
            }
        )
    return samples


def loader(samples: list[dict[str, object]]) -> DataLoader:
    return DataLoader(samples, batch_size=2, shuffle=False)


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", chans=4, num_pool_layers=2)


def test_proximal_term_is_the_squared_norm() -> None:
    model = fresh_model()
    global_params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    n = sum(p.numel() for p in model.parameters())
    assert float(proximal_term(model, global_params).detach()) == pytest.approx(0.25 * n, rel=1e-5)


def _plain_adam_l1(model: torch.nn.Module, batches: list[dict[str, object]], lr: float) -> None:
    """An independent FedAvg local step loop: Adam on the L1 of the centre-cropped output, nothing else."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        opt.zero_grad()
        out = model(batch["masked_kspace"], batch["mask"], batch["sens_maps"])
        h, w = batch["target"].shape[-2:]
        top, left = (out.shape[-2] - h) // 2, (out.shape[-1] - w) // 2
        torch.nn.functional.l1_loss(out[..., top : top + h, left : left + w], batch["target"]).backward()
        opt.step()


def test_mu_zero_gives_exactly_a_plain_training_run() -> None:
    data = synthetic_samples()
    a, b = fresh_model(), fresh_model()
    train(
        a,
        loader(data),
        steps=3,
        lr=1e-2,
        proximal_mu=0.0,
        global_params=[p.detach().clone() - 1.0 for p in a.parameters()],
    )
    _plain_adam_l1(b, list(loader(data)), lr=1e-2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


class _GradientSpy(torch.optim.Adam):
    """Adam that records the gradients it is asked to apply."""

    seen: ClassVar[list[list[torch.Tensor]]] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        _GradientSpy.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def test_proximal_gradient_is_mu_times_the_distance(monkeypatch: pytest.MonkeyPatch) -> None:
    """d/dw of the FedProx objective minus the data gradient equals mu·(w − w_global), numerically."""
    monkeypatch.setattr(torch.optim, "Adam", _GradientSpy)
    data, mu = synthetic_samples(), 0.3
    grads = []
    for proximal_mu in (0.0, mu):
        _GradientSpy.seen = []
        model = fresh_model()
        away = [p.detach().clone() - 0.25 * (i + 1) for i, p in enumerate(model.parameters())]
        train(model, loader(data), steps=1, lr=1e-2, proximal_mu=proximal_mu, global_params=away)
        grads.append(_GradientSpy.seen[0])
    start = [p.detach() for p in fresh_model().parameters()]
    for i, (g0, g1, w) in enumerate(zip(*grads, start)):
        w_global = w - 0.25 * (i + 1)
        torch.testing.assert_close(g1 - g0, mu * (w - w_global), rtol=1e-4, atol=1e-6)


def test_positive_mu_pulls_the_update_toward_the_global_weights() -> None:
    data = synthetic_samples()
    distances = []
    for mu in (0.0, 0.01, 0.1):
        model = fresh_model()
        start = [p.detach().clone() for p in model.parameters()]
        train(model, loader(data), steps=10, lr=1e-2, proximal_mu=mu)
        distances.append(float(proximal_term(model, start).detach()) ** 0.5)
    assert distances[0] > 2 * distances[1] > 0 and distances[1] > distances[2] > 0


def test_training_reduces_the_loss_and_evaluate_is_volume_level() -> None:
    data = synthetic_samples()
    model = fresh_model()
    before = evaluate(model, loader(data))
    train(model, loader(data), steps=30, lr=3e-3)
    after = evaluate(model, loader(data))
    assert after.metrics["loss"] < before.metrics["loss"]
    assert after.num_volumes == 2 and after.num_examples == 6
    # Independent check of the volume-level PSNR: stack each volume, fastMRI formula, mean over volumes.
    zf = evaluate(None, loader(data))
    vols = {}
    for s in data:
        k = s["masked_kspace"]
        img = torch.fft.fftshift(
            torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1)
        ).abs()[0]
        vols.setdefault(s["fname"], []).append((img.numpy(), s["target"].numpy()))
    expected = []
    for pairs in vols.values():
        pred, gt = np.stack([p for p, _ in pairs]), np.stack([t for _, t in pairs])
        mse = np.mean((gt - pred) ** 2)
        expected.append(10 * np.log10(gt.max() ** 2 / mse))
    assert zf.metrics["psnr"] == pytest.approx(float(np.mean(expected)), rel=1e-4)


def test_on_step_is_called_once_after_each_optimiser_step() -> None:
    model = fresh_model()
    seen: list[torch.Tensor] = []
    first = next(model.parameters())
    # Each call sees the weights after one more step: a different value every time, as many calls as steps.
    result = train(model, loader(synthetic_samples(4)), steps=5, on_step=lambda: seen.append(first.detach().clone()))
    assert result.steps == len(seen) == 5
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(seen))
