"""A self-supervised site's data: what its scanner acquired, and nothing fully sampled.

:class:`AcquiredDataset` is the training data of a site with ``supervision = "self"``. It reads every slice
through :meth:`SliceReader.read_acquisition`, which never opens a stored reference, and its samples have no
``target`` or ``max_value``: the training step has nothing fully sampled to touch, by construction. The
sample is the supervised one (ARCHITECTURE.md) without those two keys: ``masked_kspace`` is the acquired
k-space Ω, ``mask`` is Ω, ``sens_maps`` come from the calibration region (or the simulated scanner).

:class:`ReferencedDataset` is for validation and test only: the same acquisition plus, when every file of
the split has one (a simulation: NIfTI images, fastMRI files with a stored reconstruction), the reference,
so PSNR/SSIM/NMSE can be reported beside the held-out k-space loss.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from common.coils import rss
from common.config import SiteConfig
from common.data.dataset import SiteDataset, _crop_size, acquire
from common.data.readers import SliceMeta, SliceReader, open_reader
from common.data.splits import SPLITS, Split
from common.fft import center_crop, ifft2c_np
from common.masks import seed_for

log = logging.getLogger(__name__)


class AcquiredDataset(SiteDataset):
    """Slices of one split as acquired: undersampled k-space Ω, its mask and coil maps; no reference."""

    def fixed_draw(self) -> bool:
        """An acquisition is what it is: every read is the same sample."""
        return True

    def _sample(self, example_index: int) -> dict[str, Any]:
        data, meta = self.reader.read_acquisition(example_index)
        sample, _ = self._acquire(example_index, data, meta)
        return sample

    def _acquire(
        self, example_index: int, data: np.ndarray, meta: SliceMeta
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """The acquired sample, and for simulated (image) data the simulated object itself, which only
        :class:`ReferencedDataset` uses."""
        example = self.reader.examples[example_index]
        fname = example.path.name
        # An acquisition is what it is: always the slice's fixed draw, never an augmented one.
        acquired = acquire(self.config, data, meta, seed_for(self.config.seed, fname, example.slice_idx))
        masked, mask, sens_maps, simulated = acquired.masked, acquired.mask, acquired.sens_maps, acquired.simulated
        height, width = masked.shape[-2:]
        # The supervised dataset's scale: 1 / max of the zero-filled image cropped to the recon size.
        crop = _crop_size(meta, meta.target.shape if meta.target is not None else meta.recon_size, (height, width))
        peak = float(center_crop(rss(ifft2c_np(masked), dim=0), crop).max())
        scale = 1.0 / peak if peak > 0 else 1.0
        sample = {
            "masked_kspace": torch.from_numpy(masked * np.float32(scale)),
            "mask": torch.from_numpy(mask[np.newaxis].astype(np.float32)),
            "sens_maps": torch.from_numpy(np.ascontiguousarray(sens_maps)),
            "scale": float(scale),
            "fname": fname,
            "subject": example.subject,
            "site": self.config.name,
            "slice_idx": int(example.slice_idx),
        }
        return sample, simulated


class ReferencedDataset(AcquiredDataset):
    """Validation/test slices of a self-supervised site, with the reference when the files have one.

    ``has_reference`` is decided once for the split: all its slices have a reference, or none is used
    (a batch cannot mix both).
    """

    def __init__(self, config: SiteConfig, split: Split, reader: SliceReader | None = None) -> None:
        if split == "train":
            raise ValueError("the training split of a self-supervised site never carries a reference")
        super().__init__(config, split, reader)
        self.has_reference = bool(self.indices) and all(self.reader.has_reference(i) for i in self.indices)

    def _sample(self, example_index: int) -> dict[str, Any]:
        if not self.has_reference:
            return super()._sample(example_index)
        data, meta = self.reader.read_slice(example_index)
        sample, simulated = self._acquire(example_index, data, meta)
        volume_max: float | None
        if simulated is not None:
            full_target, volume_max = simulated, 1.0  # simulate_acquisition divides by the volume maximum
        else:
            assert meta.target is not None  # has_reference: a stored reconstruction
            full_target, volume_max = meta.target, meta.volume_max
        height, width = sample["masked_kspace"].shape[-2:]
        crop = _crop_size(meta, full_target.shape, (height, width))
        scale = sample["scale"]
        target = center_crop(np.asarray(full_target, dtype=np.float32), crop) * np.float32(scale)
        sample["target"] = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
        sample["max_value"] = float(target.max()) if volume_max is None else float(volume_max * scale)
        return sample


def build_selfsup_datasets(config: SiteConfig) -> dict[Split, SiteDataset]:
    """train (acquired only) and val/test (with the reference where the files have one), one file index."""
    reader = open_reader(config)
    datasets: dict[Split, SiteDataset] = {
        split: AcquiredDataset(config, split, reader) if split == "train" else ReferencedDataset(config, split, reader)
        for split in SPLITS
    }
    for split, dataset in datasets.items():
        if isinstance(dataset, ReferencedDataset) and not dataset.has_reference:
            log.info(
                "site %s: %s split has no reference; only the held-out k-space loss is reported", config.name, split
            )
    return datasets
