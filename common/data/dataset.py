"""The site's training data as a torch Dataset of undersampled slices (the sample dict of ARCHITECTURE.md).

Magnitude-only data (BraTS, IXI) is re-acquired with the site's simulated scanner; fastMRI k-space is used
as stored, with coil maps estimated from its calibration lines. Either way the site's own mask is applied,
seeded by (site seed, file name, slice) so a slice always gets the same mask, as fastMRI does for
validation, and a run is reproducible. Training slices can instead draw a fresh mask (and, for simulated
acquisitions, fresh noise and background phase) on every pass over the data, as fastMRI's training does:
:meth:`SiteDataset.set_epoch` names the pass, and the draw is seeded by (per-slice seed, epoch), so an
augmented run is reproducible too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.coils import estimate_maps_from_acs, rss
from common.config import SiteConfig
from common.data.acquisition import acquire_magnitude, scanner_magnitude, simulate_acquisition
from common.data.noncartesian import noncartesian_sample
from common.data.readers import SliceMeta, SliceReader, open_reader
from common.data.slice_cache import new_owner, shared_cache
from common.data.splits import SPLITS, Split, split_subjects
from common.errors import DataError
from common.fft import center_crop, ifft2c_np
from common.masks import make_mask, seed_for

log = logging.getLogger(__name__)

#: One slice as a dataset item: the sample dict of ARCHITECTURE.md (tensors, and the slice's file name and index).
Sample = dict[str, Any]


class SiteDataset(Dataset[Sample]):
    """Slices of one split (by subject) of one site, undersampled with the site's mask.

    ``reader`` lets several splits share one index of the site's files. With ``config.skip_bad_files`` a
    file that fails while being read is skipped from then on (the next good slice is returned instead) and
    listed in ``skipped`` with the files the reader skipped while indexing.
    """

    def __init__(self, config: SiteConfig, split: Split, reader: SliceReader | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.config = config
        self.split = split
        self.reader = reader if reader is not None else open_reader(config)
        parts = split_subjects(
            self.reader.subjects, config.split.seed, config.split.val_fraction, config.split.test_fraction
        )
        self.subjects = parts[split]
        members = set(self.subjects)
        self.indices = [i for i, ex in enumerate(self.reader.examples) if ex.subject in members]
        self._read_failures: list[tuple[Path, str]] = []
        self._bad_files: set[Path] = set()
        self.epoch: tuple[int, ...] | None = None
        self._cache_owner = new_owner()

    def set_epoch(self, epoch: int | Sequence[int] | None) -> None:
        """Augment training slices for the pass over the data named ``epoch`` (ints); None: fixed draw.

        Only the train split is augmented: validation and test keep their fixed per-slice seeds, so
        scores stay comparable across rounds and runs.
        """
        if epoch is None:
            self.epoch = None
        else:
            self.epoch = (int(epoch),) if isinstance(epoch, int) else tuple(int(e) for e in epoch)

    def fixed_draw(self) -> bool:
        """Whether every read of a slice gives the same sample (no augmented pass), so it can be cached whole."""
        return not (self.split == "train" and self.epoch is not None)

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """Bad files left out, with the reason: at indexing (reader) and while reading (this dataset)."""
        return [*self.reader.skipped, *self._read_failures]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.indices):
            raise IndexError(f"index {index} out of range for {len(self.indices)} slices")
        for offset in range(len(self.indices)):
            example_index = self.indices[(index + offset) % len(self.indices)]
            path = self.reader.examples[example_index].path
            if path in self._bad_files:
                continue
            try:
                return self._cached_sample(example_index)
            except DataError as exc:
                if not self.config.skip_bad_files:
                    raise
                log.warning("skipping bad file: %s", exc)
                self._bad_files.add(path)
                self._read_failures.append((path, str(exc)))
        raise DataError(f"{self.config.data_path}: no readable slice left in the {self.split} split")

    def _cached_sample(self, example_index: int) -> dict[str, Any]:
        """A fixed draw from the slice cache (tensors copied: a caller may change them), else a fresh one."""
        cache = shared_cache()
        if cache is None or not self.fixed_draw():
            return self._sample(example_index)
        sample = cache.get((self._cache_owner, "sample", example_index), lambda: self._sample(example_index))
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}

    def _source(self, example_index: int) -> tuple[np.ndarray, SliceMeta]:
        """The slice as read, a magnitude image already on the scanner's matrix; from the slice cache.

        This is what every augmented draw of the slice starts from: only the mask, noise and phase differ.
        """

        def read() -> tuple[np.ndarray, SliceMeta]:
            data, meta = self.reader.read_slice(example_index)
            if meta.kind == "image":
                data = scanner_magnitude(data, self.config.scanner, meta.volume_max)
            data.setflags(write=False)
            return data, meta

        cache = shared_cache()
        return read() if cache is None else cache.get((self._cache_owner, "source", example_index), read)

    def _sample(self, example_index: int) -> dict[str, Any]:
        example = self.reader.examples[example_index]
        data, meta = self._source(example_index)
        fname = example.path.name
        seed = seed_for(self.config.seed, fname, example.slice_idx)
        if self.split == "train" and self.epoch is not None:
            seed = augmentation_seed(seed, self.epoch)
        if self.config.scanner.trajectory != "cartesian":
            sample = noncartesian_sample(self.config, data, meta, seed)
            return {
                **sample,
                "fname": fname,
                "subject": example.subject,
                "site": self.config.name,
                "slice_idx": int(example.slice_idx),
            }
        acquired = acquire(self.config, data, meta, seed, on_matrix=True)
        masked, mask, sens_maps = acquired.masked, acquired.mask, acquired.sens_maps
        if acquired.simulated is not None:
            full_target = acquired.simulated
            # The simulation divides by the volume maximum, so the clean target volume peaks at (about) 1.
            volume_max: float | None = 1.0
        else:
            volume_max = meta.volume_max
            full_target = meta.target if meta.target is not None else rss(ifft2c_np(acquired.kspace), dim=0)
        crop = _crop_size(meta, full_target.shape, masked.shape[-2:])

        zero_filled = center_crop(rss(ifft2c_np(masked), dim=0), crop)
        peak = float(zero_filled.max())
        scale = 1.0 / peak if peak > 0 else 1.0
        target = center_crop(np.asarray(full_target, dtype=np.float32), crop) * scale
        if volume_max is None:
            log.debug("%s: no volume maximum recorded; using the slice maximum", example.path)
            max_value = float(target.max())
        else:
            max_value = volume_max * scale

        return {
            "masked_kspace": torch.from_numpy(masked * np.float32(scale)),
            "mask": torch.from_numpy(mask[np.newaxis].astype(np.float32)),
            "sens_maps": torch.from_numpy(np.ascontiguousarray(sens_maps)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "scale": float(scale),
            "max_value": float(max_value),
            "fname": fname,
            "subject": example.subject,
            "site": self.config.name,
            "slice_idx": int(example.slice_idx),
        }


@dataclass(frozen=True)
class Acquisition:
    """One slice as the site's scanner acquires it: full and masked k-space, the mask, coil maps."""

    kspace: np.ndarray  # (C, H, W) complex64, before the mask
    masked: np.ndarray  # (C, H, W) complex64
    mask: np.ndarray  # (H, W) float32 in {0, 1}
    sens_maps: np.ndarray  # (C, H, W) complex64
    simulated: np.ndarray | None  # the simulated magnitude object (image data only)


def acquired_mask(
    pattern: str,
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float,
    seed: int,
    acquired_columns: tuple[int, int] | None,
) -> np.ndarray:
    """The sampling mask of one slice, never over k-space columns the scanner did not acquire."""
    mask = make_mask(pattern, (shape[0], shape[1]), acceleration, center_fraction, seed).mask.copy()
    if acquired_columns is not None:
        left, right = acquired_columns
        mask[:, :left] = 0.0
        mask[:, right:] = 0.0
    return mask


def acquire(
    config: SiteConfig, data: np.ndarray, meta: SliceMeta, seed: int, *, on_matrix: bool = False
) -> Acquisition:
    """The site's acquisition of one slice: magnitude data through the scanner simulation, stored
    k-space as it is; the site's mask (never over columns the scanner did not acquire); coil maps
    simulated, or estimated from the calibration region of the masked k-space.

    ``on_matrix``: magnitude ``data`` is already :func:`~common.data.acquisition.scanner_magnitude`'s output.
    """
    scanner = config.scanner
    simulated = None
    if meta.kind == "image":
        simulation = (
            acquire_magnitude(data, scanner, seed)
            if on_matrix
            else simulate_acquisition(data, scanner, seed, image_max=meta.volume_max)
        )
        kspace, simulated = simulation.kspace, simulation.target
    else:
        kspace = data
    assert scanner.mask is not None and scanner.center_fraction is not None  # a Cartesian scanner
    mask = acquired_mask(
        scanner.mask, kspace.shape[-2:], scanner.acceleration, scanner.center_fraction, seed, meta.acquired_columns
    )
    masked = (kspace * mask).astype(np.complex64)
    if meta.kind == "image":
        sens_maps = simulation.sens_maps
    else:
        sens_maps = estimate_maps_from_acs(masked, mask=mask).astype(np.complex64)
    return Acquisition(kspace, masked, mask, sens_maps, simulated)


def augmentation_seed(slice_seed: int, epoch: tuple[int, ...]) -> int:
    """The seed of one slice's draw in one epoch: independent streams for every (slice, epoch) pair."""
    words = [slice_seed, *(e % (1 << 64) for e in epoch)]  # SeedSequence takes ints >= 0
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _crop_size(meta: SliceMeta, target_shape: tuple[int, ...], kspace_shape: tuple[int, int]) -> tuple[int, int]:
    """The target's size, clipped to the image as fastMRI does for scans narrower than their recon matrix.

    Simulated data is reconstructed at the full matrix; fastMRI data at the stored reconstruction's size,
    or the header's recon matrix when there is none.
    """
    if meta.kind == "image":
        return kspace_shape
    size = target_shape[-2:] if meta.target is not None else meta.recon_size
    return min(int(size[0]), kspace_shape[0]), min(int(size[1]), kspace_shape[1])


def build_site_datasets(config: SiteConfig) -> dict[Split, SiteDataset]:
    """train/val/test datasets of a site, sharing one index of its files."""
    reader = open_reader(config)
    return {split: SiteDataset(config, split, reader=reader) for split in SPLITS}
