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
    ref = scipy_stats.bootstrap(
        ((a - b),), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile", random_state=2
    ).confidence_interval
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


# ----------------------------------------------------------------------------- hierarchical bootstrap


def _frequencies(means: np.ndarray) -> dict[float, float]:
    values, counts = np.unique(np.round(means, 6), return_counts=True)
    return {float(v): c / means.size for v, c in zip(values, counts)}


@pytest.mark.parametrize("level", ["seeds", "subjects", "slices"])
def test_each_level_alone_gives_the_two_point_bootstrap_by_hand(level: str) -> None:
    """Differences 0 and 2 at one level, nothing else varying: means 0, 1, 2 with probability 1/4, 1/2, 1/4."""
    from common.stats import hierarchical_resamples

    diff, subjects = {
        "seeds": (np.array([[0.0], [2.0]]), ["s"]),  # two seeds, one subject, one slice
        "subjects": (np.array([[0.0, 2.0]]), ["p", "q"]),  # one seed, two subjects of one slice
        "slices": (np.array([[0.0, 2.0]]), ["p", "p"]),  # one seed, one subject of two slices
    }[level]
    freq = _frequencies(hierarchical_resamples(diff, subjects, resamples=40_000, seed=1))
    assert set(freq) == {0.0, 1.0, 2.0}
    for value, p in ((0.0, 0.25), (1.0, 0.5), (2.0, 0.25)):
        assert freq[value] == pytest.approx(p, abs=0.01)


def test_subjects_then_slices_match_the_hand_computed_mean_and_variance() -> None:
    """Subject p's slices (0, 0), subject q's (2, 4). By hand: draws pp / pq / qp / qq (1/4 each); q's two
    slice draws average 2, 3, 4 (1/4, 1/2, 1/4). Bootstrap mean 1.5 (the point estimate) and variance
    E[X²] − 1.5² with E[X²] = ½·(1·¼ + 2.25·½ + 4·¼) + ¼·E[(2 + Y/2)²], Y ~ Bin(4, ½): 1.1875 + 2.3125 = 3.5,
    so the variance is 1.25. (Slices resampled alone, ignoring subjects, would give 0.6875.)"""
    from common.stats import hierarchical_bootstrap, hierarchical_resamples

    diff = np.array([[0.0, 0.0, 2.0, 4.0]])
    subjects = ["p", "p", "q", "q"]
    means = hierarchical_resamples(diff, subjects, resamples=200_000, seed=2)
    assert means.mean() == pytest.approx(1.5, abs=0.01)
    assert means.var() == pytest.approx(1.25, abs=0.02)
    got = hierarchical_bootstrap(diff[0] + 10.0, np.full(4, 10.0), subjects, resamples=20_000)
    assert got.mean == pytest.approx(1.5) and got.subjects == 2 and got.seeds == 1 and got.n == 4
    assert got.low == pytest.approx(0.0) and got.high == pytest.approx(3.5)  # P(0) = 1/4, P(≥3.5) = 5/64 > 2.5 %


def test_seeds_pair_by_index_and_a_single_row_baseline_broadcasts() -> None:
    from common.stats import hierarchical_bootstrap

    a = np.array([[30.0, 31.0, 32.0, 33.0], [30.5, 31.5, 32.5, 33.5]])
    cs = np.array([29.0, 30.0, 31.0, 32.0])
    got = hierarchical_bootstrap(a, cs, ["p", "p", "q", "q"], resamples=5000)
    assert got.mean == pytest.approx(1.25) and got.seeds == 2
    assert 1.0 <= got.low <= got.mean <= got.high <= 1.5
    with pytest.raises(ValueError, match="seeds pair by index"):
        hierarchical_bootstrap(a, np.vstack([a, a[:1]]), ["p", "p", "q", "q"])
    with pytest.raises(ValueError, match="one id per slice"):
        hierarchical_bootstrap(a, cs, ["p", "q"])


def test_correlated_slices_widen_the_interval_over_the_slice_bootstrap() -> None:
    """Subjects with their own offsets: the hierarchical CI is wider than the slice-level one."""
    from common.stats import hierarchical_bootstrap

    rng = np.random.default_rng(0)
    offsets = np.repeat(rng.normal(0.5, 1.0, 8), 6)
    diff = offsets + rng.normal(0, 0.1, 48)
    subjects = [f"s{i}" for i in range(8) for _ in range(6)]
    flat = paired_bootstrap(diff, np.zeros(48))
    nested = hierarchical_bootstrap(diff, np.zeros(48), subjects)
    assert (nested.high - nested.low) > 2 * (flat.high - flat.low)


def test_join_verdict_reads_the_interval_not_the_mean() -> None:
    from common.stats import PairedDifference, join_verdict

    assert join_verdict(PairedDifference(1.2, 0.1, 2.0, 8, 0.95)) == "join"
    assert join_verdict(PairedDifference(1.2, -0.1, 2.0, 8, 0.95)) == "no benefit"
    assert join_verdict(PairedDifference(-0.5, -0.9, -0.2, 8, 0.95)) == "harmful"
    # One or two test subjects decide nothing either way (their slices are not the site's next patients).
    assert join_verdict(PairedDifference(1.2, 0.1, 2.0, 8, 0.95, subjects=2)) == "too few subjects"
    assert join_verdict(PairedDifference(-0.5, -0.9, -0.2, 8, 0.95, subjects=1)) == "too few subjects"
    assert join_verdict(PairedDifference(1.2, -0.1, 2.0, 8, 0.95, subjects=1)) == "no benefit"
    assert join_verdict(PairedDifference(1.2, 0.1, 2.0, 8, 0.95, subjects=3)) == "join"
