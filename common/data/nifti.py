"""Typed entry points to the nibabel functions that ship without annotations.

nibabel has a ``py.typed`` marker, but its orientation helpers and most of ``Nifti1Image`` (constructor,
``as_reoriented``, the header setters) are unannotated, which ``common``'s strict mypy settings report as
untyped calls. These functions only call nibabel, stating what goes in and comes out, so their callers
stay typed and the untyped calls stay in this one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def aff2axcodes(affine: np.ndarray) -> tuple[str | None, ...]:
    """nibabel's ``aff2axcodes``: the direction code ("R", "A", "S", ...) of each voxel axis, None where
    the (singular) affine gives that axis none."""
    codes: tuple[str | None, ...] = nib.aff2axcodes(affine)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    return codes


def save_reoriented(volume: np.ndarray, affine: np.ndarray, axcodes: Sequence[str], path: Path) -> None:
    """Save ``volume`` (voxels in the orientation of ``affine``) as NIfTI-1 stored in ``axcodes`` voxel order,
    in mm, with both qform and sform set to the (reoriented) affine as scanner coordinates (code 1)."""
    img = nib.Nifti1Image(volume, affine)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    target = nib.orientations.axcodes2ornt(axcodes)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    current = nib.orientations.io_orientation(img.affine)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    ornt = nib.orientations.ornt_transform(current, target)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    stored: nib.Nifti1Image = img.as_reoriented(ornt)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    stored.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]  # nibabel: unannotated
    stored.set_qform(stored.affine, code=1)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    stored.set_sform(stored.affine, code=1)  # type: ignore[no-untyped-call]  # nibabel: unannotated
    nib.save(stored, path)
