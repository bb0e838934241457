"""k-space undersampling masks with a uniform, seeded API.

Every pattern is tuned so the *achieved* acceleration (pixels / samples) lands within
``ACCELERATION_TOLERANCE`` of the requested one: comparing reconstructions across sites and
patterns is only fair when they see the same number of samples. The 1-D Cartesian patterns
follow fastMRI's ``data/subsample.py`` (ACS placement, equispaced spacing adjusted for the
centre); the 2-D patterns sample a fully sampled calibration box plus a variable-density
trajectory, with the trajectory density found by bisection and the last few samples trimmed so
the count is exact.

Conventions: DC sits at index ``n // 2`` (centred k-space, as fastMRI), masks are float32 (H, W)
in {0, 1}, and the phase-encode axis of the 1-D patterns is the last one (W).
"""

from __future__ import annotations

import logging
import math
import numbers
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common.errors import ConfigError

logger = logging.getLogger(__name__)

#: Largest allowed relative gap between achieved and requested acceleration.
ACCELERATION_TOLERANCE = 0.05
#: Gaussian variable-density std as a fraction of the axis length: edges get exp(-2) weight.
GAUSSIAN_SIGMA_FRACTION = 0.25
#: Poisson-disc radius grows linearly with normalised k-space radius: r = scale * (1 + g * rho).
POISSON_RADIUS_GROWTH = 2.0
#: Spiral interleaves (fixed; the number of turns is what gets tuned).
SPIRAL_INTERLEAVES = 8
#: Spiral radius = t ** power along each interleave; > 1 packs turns closer near the centre.
SPIRAL_DENSITY_POWER = 1.5
#: Stop tuning a continuous density once the over-shoot is this small; the rest is trimmed.
_TUNE_EXCESS = 0.01
#: Saturated density of grid dart throwing is about this / r**2 (measured); seeds the tuning.
_POISSON_PACKING = 0.6
#: Probes allowed when tuning a density parameter before settling for trimming a larger excess.
_MAX_TUNE_STEPS = 40
#: Rasterisation step along trajectories in pixels (< 1 keeps rasterised curves 8-connected).
_RASTER_STEP = 0.5
#: Spokes rasterised per batch, to bound memory when hundreds of spokes are needed.
_RASTER_CHUNK = 64

SeedLike = int | Sequence[int]


@dataclass(frozen=True)
class MaskResult:
    """A sampling mask and what it actually achieves (which may differ slightly from the request)."""

    mask: np.ndarray  # float32 (H, W) in {0, 1}
    acceleration: float  # achieved: H * W / number of sampled pixels
    num_low_frequencies: int  # fully sampled centre width along W (ACS columns / calibration box)


def seed_for(base_seed: int, fname: str, slice_idx: int) -> int:
    """Per-slice seed that is stable across processes and machines (unlike the salted ``hash()``)."""
    key = f"{int(base_seed)}:{fname}:{int(slice_idx)}".encode()
    return zlib.crc32(key)


def make_mask(
    pattern: str,
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float,
    seed: SeedLike,
    *,
    source: str = "mask",
) -> MaskResult:
    """Build one mask; ``source`` is the config path that prefixes any ``ConfigError`` message."""
    _check_pattern(pattern, source)
    _check_acceleration(acceleration, source)
    _check_center_fraction(center_fraction, source)
    shape = _check_shape(shape, source)
    rng = _make_rng(seed, source)
    return _build(pattern, shape, float(acceleration), float(center_fraction), rng, source)


class MaskFunc:
    """fastMRI-style mask function: each call picks one (center_fraction, acceleration) pair."""

    def __init__(
        self,
        pattern: str,
        center_fractions: Sequence[float],
        accelerations: Sequence[float],
        *,
        source: str = "mask",
    ) -> None:
        _check_pattern(pattern, source)
        if len(center_fractions) == 0 or len(center_fractions) != len(accelerations):
            raise ConfigError(
                f"{source}: center_fractions: need one centre fraction per acceleration, got "
                f"{len(center_fractions)} for {len(accelerations)} accelerations"
            )
        for cf in center_fractions:
            _check_center_fraction(cf, source)
        for r in accelerations:
            _check_acceleration(r, source)
        self.pattern = pattern
        self.center_fractions = tuple(float(cf) for cf in center_fractions)
        self.accelerations = tuple(float(r) for r in accelerations)
        self.source = source

    def __call__(self, shape: tuple[int, int], seed: SeedLike) -> MaskResult:
        """Draw the pair and the mask from one RNG so the seed fixes both."""
        shape = _check_shape(shape, self.source)
        rng = _make_rng(seed, self.source)
        choice = int(rng.integers(len(self.accelerations)))
        return _build(
            self.pattern,
            shape,
            self.accelerations[choice],
            self.center_fractions[choice],
            rng,
            self.source,
        )


# --------------------------------------------------------------------------- validation


def _check_pattern(pattern: str, source: str) -> None:
    if pattern not in PATTERNS:
        raise ConfigError(f"{source}: pattern: unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _check_acceleration(acceleration: float, source: str) -> None:
    ok = isinstance(acceleration, numbers.Real) and not isinstance(acceleration, bool)
    if not ok or not math.isfinite(acceleration) or acceleration < 1:
        raise ConfigError(
            f"{source}: acceleration: must be a finite number >= 1 (a mask cannot sample more "
            f"than every pixel), got {acceleration!r}"
        )


def _check_center_fraction(center_fraction: float, source: str) -> None:
    ok = isinstance(center_fraction, numbers.Real) and not isinstance(center_fraction, bool)
    if not ok or not 0.0 <= center_fraction < 1.0:
        raise ConfigError(f"{source}: center_fraction: must lie in [0, 1), got {center_fraction!r}")


def _check_shape(shape: tuple[int, int], source: str) -> tuple[int, int]:
    valid = (
        isinstance(shape, Sequence)
        and len(shape) == 2
        and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape)
    )
    if not valid:
        raise ConfigError(f"{source}: shape: must be two positive integers (H, W), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _make_rng(seed: SeedLike, source: str) -> np.random.Generator:
    """Only explicit seeds: ``None`` (fresh OS entropy) would silently break reproducibility."""
    parts = seed if isinstance(seed, (tuple, list)) else (seed,)
    valid = len(parts) > 0 and all(
        isinstance(p, numbers.Integral) and not isinstance(p, bool) and int(p) >= 0 for p in parts
    )
    if not valid:
        raise ConfigError(f"{source}: seed: must be a non-negative int or a tuple of them, got {seed!r}")
    return np.random.default_rng([int(p) for p in parts])


# --------------------------------------------------------------------------- dispatch


def _build(
    pattern: str,
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float,
    rng: np.random.Generator,
    source: str,
) -> MaskResult:
    height, width = shape
    nlf = round(width * center_fraction)
    if acceleration == 1.0:  # the fully sampled baseline: no trajectory could do better
        return MaskResult(np.ones(shape, dtype=np.float32), 1.0, nlf)
    if pattern in _BUILDERS_1D:
        if nlf > width / acceleration:
            raise ConfigError(
                f"{source}: acceleration: R={acceleration:g} allows {width / acceleration:.1f} of "
                f"{width} columns but the ACS (center_fraction={center_fraction:g}) alone needs "
                f"{nlf}; lower center_fraction or acceleration"
            )
        columns = _BUILDERS_1D[pattern].build(width, acceleration, nlf, rng)
        mask = np.broadcast_to(columns, shape)
    else:
        calib = _calibration_box(shape, center_fraction)
        budget = round(height * width / acceleration)
        calib_count = int(calib.sum())
        if calib_count > budget:
            raise ConfigError(
                f"{source}: acceleration: R={acceleration:g} allows {budget} of {height * width} "
                f"samples but the calibration box (center_fraction={center_fraction:g}) alone "
                f"has {calib_count}; lower center_fraction or acceleration"
            )
        mask = _BUILDERS_2D[pattern].build(shape, budget, calib, rng)

    sampled = int(np.count_nonzero(mask))
    achieved = height * width / sampled if sampled else math.inf
    if abs(achieved - acceleration) > ACCELERATION_TOLERANCE * acceleration:
        raise ConfigError(
            f"{source}: acceleration: {pattern} on {shape} can only reach R={achieved:.3f}, not "
            f"within {ACCELERATION_TOLERANCE:.0%} of the requested {acceleration:g} (the grid is "
            f"too small for this rate)"
        )
    logger.debug("mask %s %s R=%g -> achieved %.4f", pattern, shape, acceleration, achieved)
    return MaskResult(mask.astype(np.float32), achieved, nlf)


def _center_slice(n: int, num: int) -> slice:
    """fastMRI's ACS placement: ``num`` entries around index n // 2."""
    pad = (n - num + 1) // 2
    return slice(pad, pad + num)


def _calibration_box(shape: tuple[int, int], center_fraction: float) -> np.ndarray:
    """Fully sampled centre box, round(H*cf) x round(W*cf), for coil-sensitivity estimation."""
    height, width = shape
    box = np.zeros(shape, dtype=bool)
    rows = _center_slice(height, round(height * center_fraction))
    box[rows, _center_slice(width, round(width * center_fraction))] = True
    return box


def _weighted_pick(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` draws without replacement, each draw proportional to ``weights``.

    Efraimidis-Spirakis: the ``count`` smallest Exp(1) / w keys are distributed exactly like
    sequential weighted draws, but in O(n) numpy instead of a Python loop.
    """
    if count <= 0:
        return np.empty(0, dtype=np.intp)
    with np.errstate(divide="ignore"):
        keys = rng.exponential(size=weights.size) / weights
    return np.argpartition(keys, count - 1)[:count]


def _trim(mask: np.ndarray, calib: np.ndarray, budget: int, order: np.ndarray) -> np.ndarray:
    """Drop the over-shoot beyond ``budget``, highest ``order`` first, never from the calibration box."""
    excess = int(mask.sum()) - budget
    if excess <= 0:
        return mask
    removable = np.flatnonzero(mask & ~calib)
    drop = removable[np.argsort(order.ravel()[removable], kind="stable")[-excess:]]
    trimmed = mask.copy()
    trimmed.flat[drop] = False
    return trimmed


def _normalised_radius(shape: tuple[int, int]) -> np.ndarray:
    """Elliptical k-space radius: 1 at the middle of each edge, sqrt(2) in the corners."""
    height, width = shape
    ky = (np.arange(height) - height // 2) / max(height / 2, 1)
    kx = (np.arange(width) - width // 2) / max(width / 2, 1)
    return np.hypot(ky[:, None], kx[None, :])


def _pixel_radius(shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    return np.hypot((np.arange(height) - height // 2)[:, None], (np.arange(width) - width // 2)[None, :])


# --------------------------------------------------------------------------- 1-D Cartesian


def _acs_columns(width: int, nlf: int) -> np.ndarray:
    cols = np.zeros(width, dtype=bool)
    cols[_center_slice(width, nlf)] = True
    return cols


def _random_1d(width: int, acceleration: float, nlf: int, rng: np.random.Generator) -> np.ndarray:
    """fastMRI RandomMaskFunc, but with the exact expected column count instead of Bernoulli draws.

    fastMRI samples each outer column with p = (W/R - nlf) / (W - nlf); drawing exactly
    round(W/R) - nlf of them uniformly has the same expectation and always hits the requested R.
    """
    cols = _acs_columns(width, nlf)
    outer = np.flatnonzero(~cols)
    cols[rng.choice(outer, size=round(width / acceleration) - nlf, replace=False)] = True
    return cols


def _equispaced_1d(width: int, acceleration: float, nlf: int, rng: np.random.Generator) -> np.ndarray:
    """fastMRI EquispacedMaskFractionFunc: spacing stretched so ACS + lines give R overall.

    fastMRI draws the offset uniformly; on narrow grids some offsets put an extra line inside
    the ACS (or one more at the edge) and miss R by up to ~7 %, so the draw is restricted to
    the offsets that stay within tolerance (all of them on typical widths).
    """
    acs = _acs_columns(width, nlf)
    denominator = nlf * acceleration - width
    if denominator == 0:  # the ACS alone already spends the whole budget
        return acs
    adjusted = acceleration * (nlf - width) / denominator
    candidates = []
    for offset in range(round(adjusted)):
        cols = acs.copy()
        cols[np.around(np.arange(offset, width - 1, adjusted)).astype(np.intp)] = True
        candidates.append(cols)
    achieved = np.array([width / np.count_nonzero(cols) for cols in candidates])
    fits = np.flatnonzero(np.abs(achieved - acceleration) <= ACCELERATION_TOLERANCE * acceleration)
    pool = fits if fits.size else np.arange(len(candidates))
    return candidates[int(rng.choice(pool))]


def _gaussian_1d(width: int, acceleration: float, nlf: int, rng: np.random.Generator) -> np.ndarray:
    """Outer columns drawn with probability proportional to a Gaussian of the distance from DC."""
    cols = _acs_columns(width, nlf)
    outer = np.flatnonzero(~cols)
    sigma = GAUSSIAN_SIGMA_FRACTION * width
    weights = np.exp(-0.5 * ((outer - width // 2) / sigma) ** 2)
    cols[outer[_weighted_pick(weights, round(width / acceleration) - nlf, rng)]] = True
    return cols


# --------------------------------------------------------------------------- 2-D patterns


def _gaussian_2d(shape: tuple[int, int], budget: int, calib: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixels outside the box drawn with probability proportional to a 2-D Gaussian around DC."""
    weights = np.exp(-0.5 * (_normalised_radius(shape) / (2 * GAUSSIAN_SIGMA_FRACTION)) ** 2)
    outer = np.flatnonzero(~calib)
    mask = calib.copy()
    mask.flat[outer[_weighted_pick(weights.flat[outer], budget - int(calib.sum()), rng)]] = True
    return mask


def poisson_radius(shape: tuple[int, int], scale: float) -> np.ndarray:
    """Local Poisson-disc radius in pixels: small at DC, growing outwards (variable density)."""
    return scale * (1.0 + POISSON_RADIUS_GROWTH * _normalised_radius(shape))


def poisson_disc(radius: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Maximal dart throwing on the pixel grid with a variable minimum distance.

    Darts are the candidate pixels in a random order; a dart is kept unless a kept pixel lies
    closer than max(r(p), r(q)), so every kept pixel's disc of its local radius is empty.
    Throwing every grid pixel once makes the set maximal (what Bridson's k-tries approximate).
    The sequential result is computed exactly by the parallel greedy independent-set rounds:
    a dart whose conflicting live darts all come later is kept, its conflicts are removed.
    """
    height, width = radius.shape
    n = height * width
    flat_r = radius.ravel()
    priority = rng.permutation(n)
    r_max = float(radius.max())
    reach = math.ceil(r_max)
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.intp).reshape(height, width)
    first, second = [], []
    for dy in range(0, reach + 1):
        for dx in range(-reach, reach + 1):
            dist = math.hypot(dy, dx)
            if (dy == 0 and dx <= 0) or dist >= r_max:  # one of each +-d pair; beyond any radius
                continue
            src = idx[: height - dy, max(0, -dx) : width - max(0, dx)].ravel()
            dst = src + dy * width + dx
            conflict = candidates.flat[src] & candidates.flat[dst]
            conflict &= np.maximum(flat_r[src], flat_r[dst]) > dist
            first.append(src[conflict])
            second.append(dst[conflict])
    first_arr = np.concatenate(first) if first else np.empty(0, np.intp)
    second_arr = np.concatenate(second) if second else np.empty(0, np.intp)

    alive = candidates.ravel().copy()
    kept = np.zeros(n, dtype=bool)
    while alive.any():
        later = np.where(priority[first_arr] > priority[second_arr], first_arr, second_arr)
        dominated = np.zeros(n, dtype=bool)
        dominated[later] = True
        accepted = alive & ~dominated
        kept |= accepted
        blocked = np.zeros(n, dtype=bool)
        blocked[first_arr[accepted[second_arr]]] = True
        blocked[second_arr[accepted[first_arr]]] = True
        alive &= ~(accepted | blocked)
        live = alive[first_arr] & alive[second_arr]
        first_arr, second_arr = first_arr[live], second_arr[live]
    return kept.reshape(height, width)


def poisson_mask(
    shape: tuple[int, int], budget: int, calib: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Variable-density Poisson-disc mask with exactly ``budget`` samples, and its radius scale.

    The scale is searched with one fixed dart order (so the count is monotone in practice),
    starting from the packing-density model and narrowing a bracket by log-log interpolation;
    the few darts above budget are then dropped at random, which keeps the minimum distance.
    """
    target = budget - int(calib.sum())
    if target <= 0:  # the calibration box is the whole budget: no darts, any radius would do
        return calib.copy(), math.inf
    candidates = ~calib
    order_seed = int(rng.integers(2**63))

    def throw(scale: float) -> tuple[np.ndarray, int]:
        darts = poisson_disc(poisson_radius(shape, scale), candidates, np.random.default_rng(order_seed))
        return darts, int(darts.sum())

    lo, lo_darts, lo_count = 0.0, candidates.copy(), int(candidates.sum())
    hi, hi_count = math.inf, 0
    scale = _poisson_scale_guess(shape, candidates, target)
    for _ in range(_MAX_TUNE_STEPS):
        darts, count = throw(scale)
        if count >= target:
            lo, lo_darts, lo_count = scale, darts, count
        else:
            hi, hi_count = scale, count
        if lo_count <= target * (1 + _TUNE_EXCESS) or hi - lo <= 1e-9 * hi:
            break
        scale = _next_scale(lo, lo_count, hi, hi_count, target)
    logger.debug("poisson %s: scale %.4f gives %d darts for %d wanted", shape, lo, lo_count, target)
    return _trim(lo_darts | calib, calib, budget, rng.random(shape)), lo


def _poisson_scale_guess(shape: tuple[int, int], candidates: np.ndarray, target: int) -> float:
    """Scale at which the packing model (density min(1, c / r**2)) predicts ``target`` darts."""
    growth = (1.0 + POISSON_RADIUS_GROWTH * _normalised_radius(shape))[candidates]

    def predicted(scale: float) -> float:
        return float(np.minimum(1.0, _POISSON_PACKING / (scale * growth) ** 2).sum())

    lo, hi = 0.0, 1.0
    while predicted(hi) > target:
        lo, hi = hi, 2.0 * hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if predicted(mid) > target else (lo, mid)
    return hi


def _next_scale(lo: float, lo_count: int, hi: float, hi_count: int, target: int) -> float:
    """Next probe inside the bracket; the count falls roughly like 1 / scale**2."""
    if math.isinf(hi):
        return lo * math.sqrt(lo_count / target) * 1.02
    if lo == 0.0:
        guess = hi * math.sqrt(hi_count / target) / 1.02
    else:
        weight = math.log(lo_count / target) / math.log(lo_count / max(hi_count, 1))
        guess = lo * (hi / lo) ** weight
    margin = 0.05 * (hi - lo)
    return min(max(guess, lo + margin), hi - margin)


def _poisson(shape: tuple[int, int], budget: int, calib: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Builder-table adapter: callers of ``make_mask`` need the mask, not the tuned scale."""
    return poisson_mask(shape, budget, calib, rng)[0]


def _rasterise(mask: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
    """Mark in ``mask`` the pixels nearest to offsets (dy, dx) from DC; rounding is
    odd-symmetric, so a trajectory symmetric about DC stays symmetric on the grid."""
    height, width = mask.shape
    rows = np.round(dy).astype(np.intp) + height // 2
    cols = np.round(dx).astype(np.intp) + width // 2
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    mask[rows[inside], cols[inside]] = True


def _tune_trajectory(
    shape: tuple[int, int],
    budget: int,
    calib: np.ndarray,
    draw: Callable[[float], np.ndarray],
    integer: bool,
) -> np.ndarray:
    """Smallest density parameter whose trajectory (plus calibration) reaches ``budget``;
    the over-shoot is trimmed from the outermost k-space radius."""

    def count(param: float) -> tuple[np.ndarray, int]:
        mask = draw(param) | calib
        return mask, int(mask.sum())

    lo, hi = 0.0, 1.0
    hi_mask, hi_count = count(hi)
    limit = 8.0 * (shape[0] + shape[1])
    while hi_count < budget and hi < limit:
        lo, hi = hi, 2.0 * hi
        hi_mask, hi_count = count(hi)
    while hi_count > budget * (1 + _TUNE_EXCESS) and hi - lo > (1.0 if integer else 1e-6 * hi):
        mid = math.floor((lo + hi) / 2) if integer else 0.5 * (lo + hi)
        mid_mask, mid_count = count(mid)
        if mid_count >= budget:
            hi, hi_mask, hi_count = mid, mid_mask, mid_count
        else:
            lo = mid
    return _trim(hi_mask, calib, budget, _pixel_radius(shape))


def _radial(shape: tuple[int, int], budget: int, calib: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Equally spaced full spokes through DC with a random rotation; the spoke count is tuned."""
    height, width = shape
    steps = math.ceil((math.hypot(height / 2, width / 2) + 1) / _RASTER_STEP)
    t = _RASTER_STEP * np.arange(-steps, steps + 1)  # symmetric about 0, so spokes are too
    rotation = rng.random()

    def draw(spokes: float) -> np.ndarray:
        n = max(int(spokes), 1)
        angles = (np.arange(n) + rotation) * math.pi / n
        mask = np.zeros(shape, dtype=bool)
        for chunk in np.array_split(angles, math.ceil(n / _RASTER_CHUNK)):  # bounded memory
            _rasterise(mask, np.outer(np.sin(chunk), t), np.outer(np.cos(chunk), t))
        return mask

    return _tune_trajectory(shape, budget, calib, draw, integer=True)


def _spiral(shape: tuple[int, int], budget: int, calib: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Variable-density spiral interleaves (radius ~ t**power) reaching the k-space corners;
    the number of turns is tuned."""
    height, width = shape
    rho_max = math.sqrt(2.0)
    semi_y, semi_x = height / 2, width / 2
    rotation = 2 * math.pi * rng.random()
    offsets = rotation + 2 * math.pi * np.arange(SPIRAL_INTERLEAVES) / SPIRAL_INTERLEAVES

    def draw(turns: float) -> np.ndarray:
        # |d position / dt| is bounded by this, so this many points keep the step below _RASTER_STEP
        speed = max(semi_y, semi_x) * rho_max * (SPIRAL_DENSITY_POWER + 2 * math.pi * turns)
        t = np.linspace(0.0, 1.0, max(math.ceil(speed / _RASTER_STEP), 2))
        rho = rho_max * t**SPIRAL_DENSITY_POWER
        mask = np.zeros(shape, dtype=bool)
        for offset in offsets:  # one interleave at a time bounds memory for dense spirals
            phi = 2 * math.pi * turns * t + offset
            _rasterise(mask, semi_y * rho * np.sin(phi), semi_x * rho * np.cos(phi))
        return mask

    return _tune_trajectory(shape, budget, calib, draw, integer=False)


_Builder1D = Callable[[int, float, int, np.random.Generator], np.ndarray]
_Builder2D = Callable[[tuple[int, int], int, np.ndarray, np.random.Generator], np.ndarray]


class _Pattern1D(NamedTuple):
    build: _Builder1D
    description: str  # one line, for the docs (common.docs_gen)


class _Pattern2D(NamedTuple):
    build: _Builder2D
    description: str


_BUILDERS_1D: dict[str, _Pattern1D] = {
    "random": _Pattern1D(
        _random_1d,
        "Cartesian columns: the ACS centre plus outer columns drawn uniformly "
        "(fastMRI's RandomMaskFunc, exact column count)",
    ),
    "equispaced": _Pattern1D(
        _equispaced_1d,
        "Cartesian columns: the ACS centre plus equally spaced lines (fastMRI's EquispacedMaskFractionFunc)",
    ),
    "gaussian1d": _Pattern1D(
        _gaussian_1d, "Cartesian columns: the ACS centre plus outer columns drawn with a Gaussian density around DC"
    ),
}
_BUILDERS_2D: dict[str, _Pattern2D] = {
    "gaussian2d": _Pattern2D(
        _gaussian_2d, "2-D points: a calibration box plus points drawn with a Gaussian density around DC"
    ),
    "poisson": _Pattern2D(
        _poisson, "2-D points: a calibration box plus variable-density Poisson-disc points (denser at DC)"
    ),
    "radial": _Pattern2D(
        _radial,
        "non-Cartesian: a calibration box plus equally spaced full spokes through DC, randomly rotated, rasterised",
    ),
    "spiral": _Pattern2D(
        _spiral, "non-Cartesian: a calibration box plus variable-density spiral interleaves, rasterised"
    ),
}
#: Every sampling pattern a site config may name: the builders' keys, so the two cannot disagree.
PATTERNS: tuple[str, ...] = (*_BUILDERS_1D, *_BUILDERS_2D)
#: Each pattern's one-line description (the docs' list of patterns), from the same tables.
PATTERN_DESCRIPTIONS: dict[str, str] = {
    **{name: pattern.description for name, pattern in _BUILDERS_1D.items()},
    **{name: pattern.description for name, pattern in _BUILDERS_2D.items()},
}
