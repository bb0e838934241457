"""The privacy benchmarks' maths: the pooled membership AUC, σ for a target ε, the dense-layer inversion."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from bench.gradient_inversion import (
    DenseRecon,
    candidates,
    secagg_message,
    update_of,
    zero_filled,
)
from bench.privacy_audit import pooled_auc, sigma_for
from common.dp import PrivacyLedger
from common.fft import ifft2c_np
from common.metrics import psnr
from common.runconfig import RunConfig


def test_pooled_auc_is_the_mean_mann_whitney_auc_with_a_ci_around_it() -> None:
    rng = np.random.default_rng(0)
    runs = [(rng.normal(0.5, 1, 30), rng.normal(0, 1, 40)), (rng.normal(1.0, 1, 25), rng.normal(0, 1, 35))]
    expected = np.mean([mannwhitneyu(m, o).statistic / (len(m) * len(o)) for m, o in runs])
    point, low, high = pooled_auc(runs, rounds=500, seed=0)
    assert abs(point - expected) < 1e-12
    assert 0.0 <= low < point < high <= 1.0


def test_pooled_auc_of_indistinguishable_groups_covers_one_half() -> None:
    rng = np.random.default_rng(1)
    runs = [(rng.normal(0, 1, 60), rng.normal(0, 1, 60)) for _ in range(3)]
    _, low, high = pooled_auc(runs, rounds=1000, seed=0)
    assert low < 0.5 < high


def test_sigma_for_is_the_smallest_noise_within_the_target_epsilon() -> None:
    sigma = sigma_for(4.0, 0.05, 300)
    assert PrivacyLedger([(sigma, 0.05, 300)]).epsilon(1e-5) <= 4.0
    assert PrivacyLedger([(sigma / 1.02, 0.05, 300)]).epsilon(1e-5) > 4.0


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kspace = torch.complex(torch.randn(1, 3, 8, 8, generator=gen), torch.randn(1, 3, 8, 8, generator=gen))
    return {"masked_kspace": kspace, "target": torch.rand(1, 8, 8, generator=gen)}


def test_a_single_slice_update_gives_its_input_away_but_its_secagg_message_does_not() -> None:
    torch.manual_seed(0)
    model, batch = DenseRecon(8, 16).double(), _batch(0)
    batch = {"masked_kspace": batch["masked_kspace"].to(torch.complex128), "target": batch["target"].double()}
    truth = np.sqrt((np.abs(ifft2c_np(batch["masked_kspace"].numpy()[0])) ** 2).sum(0))  # independent RSS
    np.testing.assert_allclose(zero_filled(batch)[0].numpy(), truth, rtol=1e-10)
    update = update_of(model, batch)
    found = candidates(update, (8, 8))
    assert len(found) > 0
    np.testing.assert_allclose(found, np.broadcast_to(truth, found.shape), rtol=1e-6)
    message = secagg_message({k: v.float() for k, v in update.items()}, RunConfig(), seed=0)
    assert max(psnr(truth, c, float(truth.max())) for c in candidates(message, (8, 8))) < 20.0
