"""Paired differences with bootstrap confidence intervals: is a gap between two methods real or noise?

With a few dozen test slices a 0.3 dB gap can be either; the benchmarks therefore report every target
comparison as the mean of per-slice differences (both methods scored on the same slices) with a 95 %
percentile-bootstrap interval.

Slices of one subject are not independent, and a method trained with another seed is another sample of
the method, so the benchmarks' intervals come from :func:`hierarchical_bootstrap`: resample training seeds,
then test subjects, then slices within each drawn subject. :func:`paired_bootstrap` (slices only) is the
special case of one seed and one slice per subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired samples, with its ``level`` bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float
    seeds: int = 1  # training seeds the difference averages over (hierarchical_bootstrap)
    subjects: int = field(default=0)  # test subjects it was resampled by (0: slices resampled alone)

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


def _seeds_by_slices(values: Sequence[float] | Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name}: expected (slices,) or (seeds, slices) values, got shape {np.shape(values)}")
    return array


def hierarchical_resamples(diff: np.ndarray, subjects: Sequence[str], *, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means of ``diff`` (seeds, slices): seeds, then subjects, then slices within subjects.

    Each resample draws as many seeds as there are (with replacement) and averages the drawn seeds' rows;
    then as many subjects as there are, and for each drawn subject as many of its slices as it has. The
    statistic is the mean over all drawn slices, i.e. the point estimate's formula on the resample. Test
    subjects are the same for every seed (crossed, not nested), so one subject/slice draw serves all seeds.
    """
    if diff.ndim != 2 or diff.shape[1] != len(subjects):
        raise ValueError(f"subjects: one id per slice expected, got {len(subjects)} for {diff.shape[1]} slices")
    rng = np.random.default_rng(seed)
    names = sorted(set(subjects))
    members = [np.flatnonzero(np.asarray(subjects, dtype=object) == name) for name in names]
    counts = np.array([len(m) for m in members])
    padded = np.zeros((len(names), counts.max()), dtype=np.int64)
    for row, m in enumerate(members):
        padded[row, : len(m)] = m
    seed_rows = rng.integers(0, diff.shape[0], size=(resamples, diff.shape[0]))
    by_seed = diff[seed_rows].mean(axis=1)  # (resamples, slices)
    drawn = rng.integers(0, len(names), size=(resamples, len(names)))  # (resamples, subjects drawn)
    k = counts[drawn]  # slices of each drawn subject
    picks = np.floor(rng.random((resamples, len(names), counts.max())) * k[..., None]).astype(np.int64)
    columns = padded[drawn[..., None], picks]  # slice columns, (resamples, subjects, max slices)
    valid = np.arange(counts.max()) < k[..., None]
    values = np.take_along_axis(by_seed, columns.reshape(resamples, -1), axis=1).reshape(columns.shape)
    means: np.ndarray = (values * valid).sum(axis=(1, 2)) / valid.sum(axis=(1, 2))
    return means


def hierarchical_bootstrap(
    a: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    subjects: Sequence[str],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Mean paired difference ``a - b`` with a hierarchical percentile-bootstrap interval.

    ``a`` and ``b`` are per-slice scores, (slices,) or (seeds, slices), on the same test slices in the same
    order; ``subjects`` names each slice's subject. Seeds pair by index (seed s of one method against seed s
    of the other); a method with one row (a deterministic baseline such as CS) is compared with every seed.
    The point estimate is the mean over seeds of the mean over slices; the interval resamples seeds, then
    subjects, then slices within subjects (:func:`hierarchical_resamples`). Deterministic for a ``seed``.
    """
    left, right = _seeds_by_slices(a, "a"), _seeds_by_slices(b, "b")
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"paired samples must cover the same slices, got {left.shape[1]} and {right.shape[1]}")
    if left.shape[0] != right.shape[0] and 1 not in (left.shape[0], right.shape[0]):
        raise ValueError(f"seeds pair by index: got {left.shape[0]} and {right.shape[0]} seeds")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = left - right
    means = hierarchical_resamples(diff, subjects, resamples=resamples, seed=seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(
        float(diff.mean()),
        float(low),
        float(high),
        int(diff.shape[1]),
        level,
        seeds=int(diff.shape[0]),
        subjects=len(set(subjects)),
    )


#: Fewer test subjects than this give no join / harmful verdict: a bootstrap over one or two patients' slices
#: says how those patients fare, not the site's next patient.
MIN_VERDICT_SUBJECTS = 3


def join_verdict(gain: PairedDifference) -> str:
    """Should a site join? ``gain`` = its best personalised federated model − its own local model (PSNR).

    "join" when the whole interval is above zero, "harmful" when it is all below, else "no benefit": a
    site's data-governance board should not be asked to join on a gain its own test data cannot tell from 0.
    An interval resampled over fewer than :data:`MIN_VERDICT_SUBJECTS` test subjects (``gain.subjects`` 1
    or 2) decides nothing: "too few subjects" (0 = slices were resampled without subjects, as before).
    """
    if (gain.low > 0 or gain.high < 0) and 0 < gain.subjects < MIN_VERDICT_SUBJECTS:
        return "too few subjects"
    if gain.low > 0:
        return "join"
    if gain.high < 0:
        return "harmful"
    return "no benefit"
