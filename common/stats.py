"""Paired differences with bootstrap confidence intervals: is a gap between two methods real or noise?

With a few dozen test slices a 0.3 dB gap can be either; the benchmarks therefore report every target
comparison as the mean of per-slice differences (both methods scored on the same slices) with a 95 %
percentile-bootstrap interval over slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired samples, with its ``level`` bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Percentile bootstrap of the mean paired difference ``a[i] - b[i]``.

    Resampling the *pairs* (not the two methods separately) keeps what the slices share (anatomy,
    site, noise), so the interval measures the difference between methods, not between slices.
    Deterministic for a ``seed``.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or np.asarray(a).shape != np.asarray(b).shape:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {np.shape(a)} and {np.shape(b)}")
    if diff.size == 0:
        raise ValueError("paired samples are empty")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), int(diff.size), level)
