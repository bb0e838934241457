"""Gain of ``fedsense reconstruct`` over zero-filled on a real MR volume no model was trained on.

The demo data is synthesised from the MNI template, so a model trained on it has never seen a real
subject. nibabel ships one: ``nibabel/tests/data/anatomical.nii`` (a T1 head scan, 2 mm isotropic).
This re-acquires it with a site's scanner simulation (the NIfTI path of ``fedsense reconstruct``),
reconstructs it with an exported model and with zero-filling, and reports PSNR / SSIM against the
original volume over the slices that hold anatomy. Run from the repository root::

    python -m bench.real_images --model model/ --site-config deploy/sites/site-b.toml
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from client.reconstruct import Reconstructor, reconstruct_files
from common.artifact import load_artifact
from common.config import load_site_config
from common.metrics import psnr, ssim

logger = logging.getLogger("bench.real_images")


def real_volume() -> Path:
    """nibabel's bundled real T1 volume."""
    return Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="exported model folder")
    parser.add_argument("--site-config", required=True, type=Path, help="site whose scanner re-acquires the volume")
    parser.add_argument("--allow-untrained-mask", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    loaded = load_artifact(args.model)
    site = load_site_config(args.site_config)
    source = real_volume()
    target = np.asarray(nib.load(source).dataobj, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for label, zero in (("model", False), ("zero-filled", True)):
            reconstructor = Reconstructor(
                loaded,
                device=torch.device("cpu"),
                site=site,
                zero_filled_only=zero,
                allow_untrained_mask=args.allow_untrained_mask,
            )
            path = reconstruct_files(reconstructor, [source], Path(tmp) / label, "nifti")[0]
            outputs[label] = nib.load(path).get_fdata(dtype=np.float32)
    axial = 2  # anatomical.nii is LAS: the third voxel axis is inferior-superior
    keep = [k for k in range(target.shape[axial]) if (target[..., k] > 0.1 * target.max()).mean() > 0.05]
    gt = np.moveaxis(target[..., keep], axial, 0)
    scores = {
        label: (psnr(gt, np.moveaxis(v[..., keep], axial, 0)), ssim(gt, np.moveaxis(v[..., keep], axial, 0)))
        for label, v in outputs.items()
    }
    print(
        f"real volume {source.name} {target.shape}, {len(keep)} slices with anatomy; model {loaded.card.id}; "
        f"site {site.name} ({site.scanner.coils} coils, {site.scanner.mask} R={site.scanner.acceleration:g}, "
        f"matrix {site.scanner.matrix})"
    )
    for label, (p, s) in scores.items():
        print(f"{label:<12} PSNR {p:6.2f} dB  SSIM {s:.4f}")
    print(
        f"gain over zero-filled: {scores['model'][0] - scores['zero-filled'][0]:+.2f} dB PSNR, "
        f"{scores['model'][1] - scores['zero-filled'][1]:+.4f} SSIM"
    )


if __name__ == "__main__":
    main()
