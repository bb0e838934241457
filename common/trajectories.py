"""Non-Cartesian k-space trajectories of radial and spiral sites, and what acceleration they give.

Coordinates follow :mod:`common.nufft`: (K, 2) float32 (ky, kx) in cycles per pixel, |k| <= 0.5 at the
edge of the matrix. A trajectory is fixed per site (its scanner protocol), so its density weights and
Toeplitz kernel are computed once. Accelerations are defined, as for radial scans in the literature,
by the sampling density at the edge of k-space relative to Nyquist:

- golden-angle radial: N pi / 2 spokes sample the edge at Nyquist, so R = (N pi / 2) / spokes;
- variable-density spiral k(t) = k_max t^p exp(i (2 pi T t + 2 pi l / L)), t in (0, 1], L interleaves of
  T turns each: the rings are p k_max / (T L) apart at the edge against Nyquist's 1 / N, so
  R = p N / (2 T L); T is set by the readout so that samples along it are 1 / (N * oversampling) apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Angle between successive spokes: 180 deg / golden ratio (Winkelmann et al. 2007).
GOLDEN_ANGLE_DEG = 180.0 / ((1.0 + math.sqrt(5.0)) / 2.0)
#: Spiral radius grows as t ** power: > 1 samples the centre more densely (variable density).
SPIRAL_DENSITY_POWER = 1.5
TRAJECTORIES = ("radial-ga", "spiral")
#: Largest allowed relative gap between the acceleration asked for and the one spokes/interleaves give.
ACCELERATION_TOLERANCE = 0.05


def radial_spokes_for(matrix: int, acceleration: float) -> int:
    """Spokes that give ``acceleration`` at an N = ``matrix`` image: round(N pi / 2 / R), at least 1."""
    return max(1, round(matrix * math.pi / 2.0 / acceleration))


def radial_acceleration(matrix: int, spokes: int) -> float:
    """R = (N pi / 2) / spokes."""
    return matrix * math.pi / 2.0 / spokes


def spiral_turns(matrix: int, readout_samples: int, oversampling: float) -> float:
    """Turns per interleave that keep samples 1 / (N oversampling) apart along the readout.

    The arc length of t^p spiral turns out to k_max = 1/2 is about pi T / 2 cycles per pixel (exact for
    p = 1), spread over ``readout_samples`` samples.
    """
    return 2.0 * readout_samples / (math.pi * matrix * oversampling)


def spiral_interleaves_for(matrix: int, acceleration: float, readout_samples: int, oversampling: float) -> int:
    """Interleaves that give ``acceleration``: round(p N / (2 T R)), at least 1."""
    turns = spiral_turns(matrix, readout_samples, oversampling)
    return max(1, round(SPIRAL_DENSITY_POWER * matrix / (2.0 * turns * acceleration)))


def spiral_acceleration(matrix: int, interleaves: int, readout_samples: int, oversampling: float) -> float:
    """R = p N / (2 T L)."""
    turns = spiral_turns(matrix, readout_samples, oversampling)
    return SPIRAL_DENSITY_POWER * matrix / (2.0 * turns * interleaves)


def golden_angle_radial(spokes: int, readout_samples: int, matrix: int, oversampling: float) -> Tensor:
    """Golden-angle radial spokes: (spokes * readout_samples, 2), spoke-major.

    Each spoke passes through the centre (sample readout_samples // 2 is k = 0, as scanners sample it)
    with samples 1 / (N oversampling) apart; spoke s is rotated by s * 111.25 deg, so any run of
    consecutive spokes covers k-space nearly uniformly.
    """
    if spokes < 1 or readout_samples < 2 or matrix < 1 or oversampling <= 0:
        raise ValueError("need spokes >= 1, readout_samples >= 2, matrix >= 1 and oversampling > 0")
    radius = (np.arange(readout_samples) - readout_samples // 2) / (matrix * oversampling)
    if np.max(np.abs(radius)) > 0.5 + 1e-9:
        raise ValueError(
            f"readout_samples = {readout_samples} at oversampling {oversampling} reaches |k| = "
            f"{np.max(np.abs(radius)):.3f} > 0.5 (beyond the matrix of {matrix}); use at most "
            f"{int(matrix * oversampling)} samples"
        )
    angles = np.deg2rad(GOLDEN_ANGLE_DEG) * np.arange(spokes)
    ky = np.outer(np.sin(angles), radius)
    kx = np.outer(np.cos(angles), radius)
    return torch.from_numpy(np.stack((ky.ravel(), kx.ravel()), axis=-1).astype(np.float32))


def variable_density_spiral(interleaves: int, readout_samples: int, matrix: int, oversampling: float) -> Tensor:
    """Variable-density spiral interleaves: (interleaves * readout_samples, 2), interleave-major.

    Interleave l is the same spiral rotated by 2 pi l / L. The first sample of every interleave is k = 0
    (they coincide; the density weights share that cell among them), the last reaches |k| = 0.5.
    """
    if interleaves < 1 or readout_samples < 2 or matrix < 1 or oversampling <= 0:
        raise ValueError("need interleaves >= 1, readout_samples >= 2, matrix >= 1 and oversampling > 0")
    turns = spiral_turns(matrix, readout_samples, oversampling)
    t = np.arange(readout_samples) / (readout_samples - 1)
    radius = 0.5 * t**SPIRAL_DENSITY_POWER
    phase = 2.0 * np.pi * turns * t
    offsets = 2.0 * np.pi * np.arange(interleaves) / interleaves
    angle = phase[None, :] + offsets[:, None]
    ky = radius[None, :] * np.sin(angle)
    kx = radius[None, :] * np.cos(angle)
    # sin/cos of a nonzero angle at radius 0 are exact zeros, so the centre duplicates are exact.
    return torch.from_numpy(np.stack((ky.ravel(), kx.ravel()), axis=-1).astype(np.float32))


def make_trajectory(kind: str, count: int, readout_samples: int, matrix: int, oversampling: float) -> Tensor:
    """The site's trajectory by name: ``count`` spokes (radial-ga) or interleaves (spiral)."""
    if kind == "radial-ga":
        return golden_angle_radial(count, readout_samples, matrix, oversampling)
    if kind == "spiral":
        return variable_density_spiral(count, readout_samples, matrix, oversampling)
    raise ValueError(f"unknown trajectory {kind!r}; expected one of {', '.join(TRAJECTORIES)}")


@dataclass(frozen=True)
class TrajectorySpec:
    """A site's non-Cartesian protocol, fully resolved from its scanner settings."""

    kind: str
    count: int  # spokes (radial-ga) or interleaves (spiral)
    readout_samples: int
    matrix: int  # the larger image side: the Nyquist reference N
    oversampling: float
    acceleration: float  # achieved

    @property
    def num_samples(self) -> int:
        """K, samples per coil and slice."""
        return self.count * self.readout_samples

    def coords(self) -> Tensor:
        """The trajectory (K, 2); cached, so every slice of a site shares one tensor."""
        return _coords(self)


@lru_cache(maxsize=16)
def _coords(spec: TrajectorySpec) -> Tensor:
    return make_trajectory(spec.kind, spec.count, spec.readout_samples, spec.matrix, spec.oversampling)


def trajectory_spec(scanner: Any) -> TrajectorySpec:
    """Resolve a non-Cartesian :class:`common.config.ScannerConfig` (duck-typed: no config import here).

    Readout: ``matrix * oversampling`` samples per radial spoke (the full diameter), twice that per spiral
    interleave, unless ``readout_samples`` is given. Spokes / interleaves come from ``acceleration`` unless
    given; given ones must reproduce ``acceleration`` within 5 %. Raises ValueError naming the setting.
    """
    kind = scanner.trajectory
    matrix = int(max(scanner.matrix))
    oversampling = float(scanner.oversampling)
    if kind == "radial-ga":
        readout = scanner.readout_samples or round(matrix * oversampling)
        count = scanner.spokes or radial_spokes_for(matrix, scanner.acceleration)
        achieved = radial_acceleration(matrix, count)
        name = "spokes"
    elif kind == "spiral":
        readout = scanner.readout_samples or round(2 * matrix * oversampling)
        count = scanner.interleaves or spiral_interleaves_for(matrix, scanner.acceleration, readout, oversampling)
        achieved = spiral_acceleration(matrix, count, readout, oversampling)
        name = "interleaves"
    else:
        raise ValueError(f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {kind!r}")
    if kind == "radial-ga" and readout > matrix * oversampling + 1e-9:
        raise ValueError(
            f"readout_samples = {readout} reaches beyond the matrix edge at oversampling {oversampling:g}; "
            f"use at most {int(matrix * oversampling)}"
        )
    if abs(achieved - scanner.acceleration) > ACCELERATION_TOLERANCE * scanner.acceleration:
        given = getattr(scanner, name) is not None
        raise ValueError(
            f"{name} = {count} gives R = {achieved:.2f} at matrix {matrix}, not acceleration = "
            f"{scanner.acceleration:g}" + ("; set one of them to agree" if given else " (too few samples to tune)")
        )
    return TrajectorySpec(kind, int(count), int(readout), matrix, oversampling, float(achieved))


def non_cartesian_check(scanner: Any) -> None:
    """Validation hook for the site config: resolving the protocol raises on an impossible one."""
    trajectory_spec(scanner)


__all__ = [
    "GOLDEN_ANGLE_DEG",
    "TRAJECTORIES",
    "TrajectorySpec",
    "golden_angle_radial",
    "make_trajectory",
    "radial_acceleration",
    "radial_spokes_for",
    "spiral_acceleration",
    "spiral_interleaves_for",
    "trajectory_spec",
    "variable_density_spiral",
]
