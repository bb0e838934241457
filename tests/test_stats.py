"""The paired bootstrap against independent computations: a plain loop, scipy, and the normal approximation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from common.stats import paired_bootstrap


def test_matches_a_plain_loop_with_the_same_draws() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(25, 2, 30), rng.normal(24, 2, 30)
    got = paired_bootstrap(a, b, resamples=2000, seed=7)
    draws = np.random.default_rng(7).integers(0, 30, size=(2000, 30))
    means = sorted(sum(a[j] - b[j] for j in row) / 30 for row in draws)
    assert got.mean == pytest.approx(float(np.mean(a - b)))
    assert got.low == pytest.approx(float(np.quantile(means, 0.025)))
    assert got.high == pytest.approx(float(np.quantile(means, 0.975)))
    assert got.n == 30 and got.level == 0.95


def test_agrees_with_scipy_and_the_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(20, 3, 400)
    a = b + rng.normal(0.4, 1.0, 400)  # shared per-slice variation cancels in the pairs
    got = paired_bootstrap(a, b, resamples=20_000, seed=1)
    ref = scipy_stats.bootstrap(((a - b),), np.mean, confidence_level=0.95, n_resamples=20_000,
                                method="percentile", random_state=2).confidence_interval
    assert got.low == pytest.approx(ref.low, abs=0.02) and got.high == pytest.approx(ref.high, abs=0.02)
    half = 1.96 * np.std(a - b, ddof=1) / np.sqrt(400)
    assert got.low == pytest.approx(np.mean(a - b) - half, abs=0.02)
    assert got.high == pytest.approx(np.mean(a - b) + half, abs=0.02)
    assert got.low > 0  # a real 0.4 dB gain is detected despite 3 dB between-slice spread


def test_rejects_unpaired_or_empty_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], [0.0], level=1.5)
