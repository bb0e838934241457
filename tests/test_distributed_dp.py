"""Client-level DP under SecAgg+: each site's clipping and noise share (``common.distributed_dp``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.distributed_dp import clip_and_add_noise_share, clip_update, noise_share_std
from common.errors import ConfigError
from common.runconfig import RunConfig


def test_clip_update_matches_torch_clip_grad_norm() -> None:
    rng = np.random.default_rng(0)
    update = [rng.normal(size=(4, 5)), rng.normal(size=7)]
    tensors = [torch.nn.Parameter(torch.zeros(u.shape, dtype=torch.float64)) for u in update]
    for t, u in zip(tensors, update):
        t.grad = torch.from_numpy(u.copy())
    expected_norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm=0.5))
    clipped, norm = clip_update(update, 0.5)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    for c, t in zip(clipped, tensors):
        np.testing.assert_allclose(c, t.grad.numpy(), rtol=1e-5)  # torch adds 1e-6 to the norm
    small, _ = clip_update([0.01 * u for u in update], 0.5)
    for s, u in zip(small, update):
        np.testing.assert_array_equal(s, 0.01 * u)


@pytest.mark.parametrize("sites", [4, 6])
def test_the_noise_shares_of_the_sites_sum_to_the_calibrated_noise(sites: int) -> None:
    sigma, clip, min_sites, entries = 1.3, 0.2, 4, 200_000
    rng = np.random.default_rng(1)
    shares = [
        clip_and_add_noise_share([np.zeros(entries)], clip=clip, noise_multiplier=sigma, min_sites=min_sites, rng=rng)[
            0
        ][0]
        for _ in range(sites)
    ]
    total = np.sum(shares, axis=0)
    # m = min_sites shares give N(0, σ²C²); every further site only adds variance.
    expected = sigma * clip * np.sqrt(sites / min_sites)
    assert total.std() == pytest.approx(expected, rel=0.01)
    assert abs(total.mean()) < 5 * expected / np.sqrt(entries)
    assert noise_share_std(sigma, clip, min_sites) == pytest.approx(sigma * clip / 2)


def test_a_clipped_site_is_flagged_and_bounded() -> None:
    update = [np.full(100, 1.0)]  # norm 10
    out, clipped = clip_and_add_noise_share(
        update, clip=1.0, noise_multiplier=0.0, min_sites=3, rng=np.random.default_rng(0)
    )
    assert clipped and np.linalg.norm(out[0]) == pytest.approx(1.0)
    _, clipped = clip_and_add_noise_share(
        update, clip=20.0, noise_multiplier=0.0, min_sites=3, rng=np.random.default_rng(0)
    )
    assert not clipped


def _config(**extra: object) -> RunConfig:
    return RunConfig.from_flat(
        {
            "secagg": True,
            "min-train-nodes": 3,
            "min-available-nodes": 3,
            "dp-client-clip": 0.1,
            "dp-client-noise": 1.0,
            **extra,
        }
    )


def test_secagg_allows_client_side_clipping_only() -> None:
    assert _config(**{"dp-client-level": "client-fixed"}).dp_client_level == "client-fixed"
    with pytest.raises(ConfigError, match="server-fixed"):
        _config(**{"dp-client-level": "server-fixed"})
    # 0.1 + 6 x 1.0 x 0.1 / √3 ≈ 0.45 > 0.3: SecAgg+'s clipping range would cut the noise's tails.
    with pytest.raises(ConfigError, match="secagg-clipping-range"):
        _config(**{"dp-client-level": "client-fixed", "secagg-clipping-range": 0.3})
