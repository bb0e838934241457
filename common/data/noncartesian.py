"""A non-Cartesian (radial, spiral) site's acquisition of a slice, and its training sample.

The scanner simulation of :mod:`common.data.acquisition` is reused up to the coil images (resampled
magnitude, smooth background phase, the site's coil sensitivities); the k-space is then *measured* along
the site's trajectory with the NUFFT of the coil images (not by gridding a Cartesian FFT), and complex
Gaussian noise of the site's ``noise_std`` is added to those samples. The coil maps the site uses are
estimated from the densely sampled centre of its own k-space, as a real radial/spiral site must.

A sample stores the non-Cartesian samples (C, K) as ``masked_kspace`` and, as ``mask``, the trajectory
tensor (K, 3) = (ky, kx, density weight); :func:`common.nufft.is_non_cartesian` tells the two apart.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from common.coils import rss
from common.config import ScannerConfig, SiteConfig
from common.data.acquisition import scanner_magnitude, site_coil_maps, smooth_phase
from common.data.readers import SliceMeta
from common.errors import DataError
from common.nufft import coil_images, density_compensation, estimate_maps_from_centre, nufft
from common.trajectories import TrajectorySpec, trajectory_spec

# Sub-streams of one slice's seed; the phase stream matches the Cartesian simulation's.
_PHASE_STREAM = 1
_NOISE_STREAM = 2


@lru_cache(maxsize=16)
def site_trajectory(spec: TrajectorySpec, shape: tuple[int, int]) -> torch.Tensor:
    """The site's trajectory tensor (K, 3): coordinates and Voronoi density weights, made once per site."""
    coords = spec.coords()
    dcf = density_compensation(coords, shape)
    return torch.cat((coords, dcf[:, None]), dim=-1)


def scanner_trajectory(scanner: ScannerConfig) -> torch.Tensor:
    """The trajectory tensor (K, 3) of a non-Cartesian scanner at its matrix."""
    shape = (int(scanner.matrix[0]), int(scanner.matrix[1]))
    return site_trajectory(trajectory_spec(scanner), shape)


def simulate_noncartesian(
    image: np.ndarray, scanner: ScannerConfig, seed: int, image_max: float | None = None
) -> dict[str, np.ndarray]:
    """Noisy non-Cartesian multi-coil samples of a magnitude ``image`` on ``scanner``.

    Returns ``samples`` (C, K) complex64, ``trajectory`` (K, 3) float32, ``sens_maps`` (C, H, W) estimated
    from the k-space centre, and ``target`` (H, W): the RSS of the noise-free coil images.
    """
    magnitude = scanner_magnitude(image, scanner, image_max)  # the Cartesian simulation's first step
    shape = (int(scanner.matrix[0]), int(scanner.matrix[1]))
    phase = smooth_phase(shape, np.random.default_rng([seed, _PHASE_STREAM]))
    coils = site_coil_maps(scanner.coils, shape) * (magnitude * np.exp(1j * phase))
    trajectory = scanner_trajectory(scanner)
    coords, dcf = trajectory[:, :2], trajectory[:, 2]
    samples = nufft(torch.from_numpy(coils.astype(np.complex64)), coords)
    if scanner.noise_std > 0:
        rng = np.random.default_rng([seed, _NOISE_STREAM])
        noise = rng.standard_normal(samples.shape) + 1j * rng.standard_normal(samples.shape)
        samples = samples + torch.from_numpy((noise * (scanner.noise_std / np.sqrt(2.0))).astype(np.complex64))
    maps = estimate_maps_from_centre(samples, coords, dcf, shape)
    return {
        "samples": samples.numpy().astype(np.complex64),
        "trajectory": trajectory.numpy(),
        "sens_maps": maps.numpy().astype(np.complex64),
        "target": rss(coils, dim=0).astype(np.float32),
    }


def zero_filled_rss(samples: torch.Tensor, trajectory: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """RSS of the density-compensated coil images of one slice (C, K), (K, 3): its zero-filled image."""
    return rss(coil_images(samples, trajectory[:, :2], trajectory[:, 2], shape), dim=0)


def noncartesian_sample(config: SiteConfig, data: np.ndarray, meta: SliceMeta, seed: int) -> dict[str, object]:
    """The tensors of one training sample of a non-Cartesian site (the dataset adds its provenance).

    Magnitude images are re-acquired on the site's simulated scanner; raw non-Cartesian files
    (:mod:`common.data.noncartesian_h5`) are used as stored, with their own trajectory and reference.
    Scaled, as at Cartesian sites, so that the zero-filled image peaks at 1.
    """
    if meta.kind == "image":
        acquired = simulate_noncartesian(data, config.scanner, seed, image_max=meta.volume_max)
        samples = torch.from_numpy(acquired["samples"])
        trajectory = torch.from_numpy(acquired["trajectory"])
        maps, target = torch.from_numpy(acquired["sens_maps"]), acquired["target"]
        volume_max = 1.0  # the simulation divides by the volume maximum
    elif meta.kind == "noncartesian" and meta.trajectory is not None:
        if meta.target is None:
            raise DataError(
                f"{config.data_path}: a slice without 'reconstruction_rss': supervised training needs a reference image"
            )
        target = meta.target
        prepared = prepare_stored(data, meta.trajectory, meta.recon_size)
        volume_max = meta.volume_max if meta.volume_max is not None else float(target.max())
        scale = float(prepared["scale"])
        return {
            **prepared,
            "target": torch.from_numpy(np.asarray(target, dtype=np.float32) * np.float32(scale)),
            "max_value": float(volume_max * scale),
        }
    else:
        raise DataError(
            f"{config.data_path}: a {config.scanner.trajectory} site needs magnitude images or "
            "non-Cartesian HDF5 files; this file holds Cartesian k-space"
        )
    scale = _scale(samples, trajectory, (int(target.shape[-2]), int(target.shape[-1])))
    return {
        "masked_kspace": samples * scale,
        "mask": trajectory,
        "sens_maps": maps.to(torch.complex64),
        "target": torch.from_numpy(np.asarray(target, dtype=np.float32) * np.float32(scale)),
        "scale": float(scale),
        "max_value": float(volume_max * scale),
    }


def _scale(samples: torch.Tensor, trajectory: torch.Tensor, shape: tuple[int, int]) -> float:
    """1 / peak of the zero-filled image: every site's inputs are scaled the same way."""
    peak = float(zero_filled_rss(samples, trajectory, shape).max())
    return 1.0 / peak if peak > 0 else 1.0


def prepare_stored(samples: np.ndarray, coords: np.ndarray, shape: tuple[int, int]) -> dict[str, Any]:
    """Model inputs of one stored non-Cartesian slice (training and ``fedsense reconstruct`` alike).

    ``samples`` (C, K) and ``coords`` (K, 2) as read from the file; returns scaled samples, the trajectory
    tensor, coil maps estimated from the k-space centre and the ``scale`` applied.
    """
    samples_t = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.complex64))
    trajectory = file_trajectory(coords, shape)
    maps = estimate_maps_from_centre(samples_t, trajectory[:, :2], trajectory[:, 2], shape)
    scale = _scale(samples_t, trajectory, shape)
    return {
        "masked_kspace": samples_t * scale,
        "mask": trajectory,
        "sens_maps": maps.to(torch.complex64),
        "scale": float(scale),
    }


_FILE_TRAJECTORIES: dict[tuple[bytes, tuple[int, int]], torch.Tensor] = {}


def file_trajectory(coords: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Trajectory tensor (K, 3) of a stored trajectory; density weights cached per distinct trajectory.

    A site's files normally share one protocol, so the Voronoi weights are computed once, not per slice.
    """
    key = (hashlib.sha1(np.ascontiguousarray(coords, dtype=np.float32).tobytes()).digest(), shape)
    if key not in _FILE_TRAJECTORIES:
        if len(_FILE_TRAJECTORIES) >= 16:
            _FILE_TRAJECTORIES.pop(next(iter(_FILE_TRAJECTORIES)))
        coords_t = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32))
        _FILE_TRAJECTORIES[key] = torch.cat((coords_t, density_compensation(coords_t, shape)[:, None]), dim=-1)
    return _FILE_TRAJECTORIES[key]
