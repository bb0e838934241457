"""Real MR images that FedSense never trains on, for an honest check of a trained model.

The demo data is synthetic (MNI-template anatomy), so a model that only ever saw it may have learned
the synthesis rather than MRI. Two PyPI packages FedSense already installs ship real MR test images:
nibabel (``tests/data/example4d.nii.gz``: an axial EPI brain volume) and pydicom
(``data/test_files/MR_small.dcm``: a 64² head slice). They are never used for training or model
selection. Each image is "acquired" exactly as a magnitude-only site re-acquires its images
(:func:`common.data.acquisition.simulate_acquisition`: the site's coils, background phase, noise) and
undersampled with the site's mask, and comes out as the sample dict :class:`SiteDataset` yields, so any
FedSense model reconstructs it unchanged.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from common.coils import rss
from common.config import ScannerConfig
from common.data.acquisition import simulate_acquisition
from common.errors import DataError
from common.fft import center_crop, ifft2c_np
from common.masks import make_mask, seed_for
from common.metrics import psnr
from common.training import predict, zero_filled

# Slices of the EPI volume with at least this fraction of foreground pixels (the top and bottom
# slices hold only a sliver of head).
_MIN_FOREGROUND = 0.15
SITE = "held-out"


@dataclass(frozen=True)
class HeldOutImage:
    """One real magnitude MR image (H, W) float32, and where it came from."""

    name: str
    image: np.ndarray


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"{package}: not installed; the held-out MR images ship with it")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package}")
    return path


def _nibabel_epi() -> list[HeldOutImage]:
    import nibabel as nib

    path = _package_file("nibabel", "tests", "data", "example4d.nii.gz")
    try:
        volume = np.asarray(cast(nib.Nifti1Image, nib.load(path)).dataobj, dtype=np.float32)[..., 0]  # first time point
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    threshold = 0.1 * float(volume.max())
    out = []
    for z in range(volume.shape[2]):
        axial = np.ascontiguousarray(np.flipud(volume[:, :, z].T))
        if (axial > threshold).mean() >= _MIN_FOREGROUND:
            out.append(HeldOutImage(f"nibabel:example4d.nii.gz#z{z}", axial))
    return out


def _pydicom_mr() -> list[HeldOutImage]:
    path = _package_file("pydicom", "data", "test_files", "MR_small.dcm")
    import pydicom  # dev extra only; imported once its file is known to be there

    try:
        image = pydicom.dcmread(path).pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for unreadable files
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return [HeldOutImage("pydicom:MR_small.dcm", image)]


def load_heldout_images() -> list[HeldOutImage]:
    """Every held-out real MR image, in a fixed order; ``DataError`` if a source package lacks its file."""
    images = _nibabel_epi() + _pydicom_mr()
    for item in images:
        if item.image.ndim != 2 or not np.isfinite(item.image).all() or item.image.max() <= 0:
            raise DataError(f"{item.name}: not a usable 2-D magnitude image")
    return images


def heldout_sample(item: HeldOutImage, scanner: ScannerConfig, seed: int = 0) -> dict[str, Any]:
    """``item`` acquired on ``scanner`` and undersampled by its mask: the sample dict a site dataset yields.

    Scaling follows :class:`common.data.dataset.SiteDataset` for magnitude data: the image is divided by
    its maximum before simulation and every array is scaled so the zero-filled image peaks at 1.
    """
    slice_seed = seed_for(seed, item.name, 0)
    acquisition = simulate_acquisition(item.image, scanner, slice_seed, image_max=float(item.image.max()))
    shape = acquisition.kspace.shape[-2:]
    assert scanner.mask is not None and scanner.center_fraction is not None  # a Cartesian scanner
    mask = make_mask(scanner.mask, shape, scanner.acceleration, scanner.center_fraction, slice_seed).mask
    masked = (acquisition.kspace * mask).astype(np.complex64)
    zero_filled = rss(ifft2c_np(masked), dim=0)
    peak = float(zero_filled.max())
    scale = 1.0 / peak if peak > 0 else 1.0
    target = center_crop(acquisition.target, shape) * scale
    return {
        "masked_kspace": torch.from_numpy(masked * np.float32(scale)),
        "mask": torch.from_numpy(mask[np.newaxis].astype(np.float32)),
        "sens_maps": torch.from_numpy(np.ascontiguousarray(acquisition.sens_maps)),
        "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
        "scale": float(scale),
        "max_value": float(scale),  # the simulated volume peaks at 1 before scaling
        "fname": item.name,
        "subject": item.name,
        "site": SITE,
        "slice_idx": 0,
    }


@dataclass(frozen=True)
class HeldOutScore:
    """PSNR (dB, data range = the image's target max) of zero-filled and model reconstructions."""

    name: str
    zero_filled_psnr: float
    model_psnr: float

    @property
    def gain(self) -> float:
        """What the model adds over the zero-filled inverse FFT, in dB."""
        return self.model_psnr - self.zero_filled_psnr


@torch.no_grad()
def score_heldout(
    model: torch.nn.Module, scanner: ScannerConfig, seed: int = 0, images: list[HeldOutImage] | None = None
) -> list[HeldOutScore]:
    """Reconstruct every held-out image (acquired on ``scanner``) with ``model``; score it and zero-filled."""
    model.eval()
    scores = []
    for item in images if images is not None else load_heldout_images():
        sample = heldout_sample(item, scanner, seed)
        batch: dict[str, object] = {
            k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v]) for k, v in sample.items()
        }
        target = sample["target"].numpy()
        maxval = float(target.max())
        scores.append(
            HeldOutScore(
                item.name,
                float(psnr(target, zero_filled(batch)[0].numpy(), maxval)),
                float(psnr(target, predict(model, batch)[0].float().numpy(), maxval)),
            )
        )
    return scores
