"""What ``fedsense data partition`` reads of a downloaded dataset: one :class:`Volume` per usable file.

Headers only, no pixel data: fastMRI's shape and ISMRMRD scanner facts, a NIfTI's axial slice count.
Each built-in dataset kind's ``Partitioner`` (:mod:`common.data.kinds`) names its function here; a new
kind's may live in its own module. Pure data code: no Flower, no PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import h5py
import nibabel as nib

from common.data import nifti
from common.data.readers import (
    H5_ERRORS,
    NIFTI_ERRORS,
    SourceFile,
    attr_str,
    find_brats_files,
    find_fastmri_files,
    find_ixi_files,
    parse_ixi_name,
)
from common.data.scanner_header import HeaderError, nominal_field, parse_scanner_header
from common.errors import DataError

log = logging.getLogger(__name__)

# IXI's acquisition sites as the IXI project documents them (brain-development.org/ixi-dataset):
# Hammersmith (HH) Philips 3 T, Guy's (Guys) Philips 1.5 T, Institute of Psychiatry (IOP) GE 1.5 T.
IXI_FIELD_STRENGTH_T = {"HH": 3.0, "Guys": 1.5, "IOP": 1.5}

#: The usable volumes of a dataset root, and the files left out as (relative path, reason).
Discovered = tuple[list["Volume"], list[tuple[str, str]]]


@dataclass(frozen=True)
class Volume:
    """One data file of the source dataset, with what partitioning and the summary need from it."""

    path: Path  # absolute
    rel: str  # path relative to the dataset root, POSIX style: kept in the site folder
    subject: str
    contrast: str
    slices: int
    keys: Mapping[str, str] = field(default_factory=dict)  # natural partition keys of this file
    field_strength_t: float | None = None
    coils: int | None = None
    matrix: tuple[int, int] | None = None


def discover_fastmri(root: Path, wanted: Sequence[str]) -> Discovered:
    """fastMRI files under ``root`` with one of the ``wanted`` acquisitions (all when empty)."""
    volumes, skipped = [], []
    for source in find_fastmri_files(root):
        rel = source.path.relative_to(root).as_posix()
        try:
            volume = fastmri_volume(source.path, rel)
        except (DataError, HeaderError) as exc:
            log.warning("%s: skipped: %s", source.path, exc)
            skipped.append((rel, str(exc)))
            continue
        if not wanted or volume.contrast in wanted:
            volumes.append(volume)
    return volumes, skipped


def fastmri_volume(path: Path, rel: str) -> Volume:
    """Shape from ``kspace``, acquisition from the attribute, scanner facts from the ISMRMRD header."""
    try:
        with h5py.File(path, "r") as f:
            kspace = f.get("kspace")
            if not isinstance(kspace, h5py.Dataset) or kspace.ndim not in (3, 4):
                raise DataError(f"{path}: no 3-D or 4-D 'kspace' dataset")
            shape = tuple(int(n) for n in kspace.shape)
            if "ismrmrd_header" not in f:
                raise DataError(f"{path}: no ismrmrd_header (scanner keys come from it)")
            header = parse_scanner_header(f["ismrmrd_header"][()])
            acquisition = attr_str(f.attrs.get("acquisition"), default="").upper()
            subject = attr_str(f.attrs.get("patient_id"), default=path.stem)
    except (DataError, HeaderError):
        raise
    except H5_ERRORS as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    contrast = acquisition or (header.protocol or "unknown").upper()
    coils = shape[1] if len(shape) == 4 else 1
    keys = {
        "scanner": header.scanner or "unknown",
        "field-strength": f"{nominal_field(header.field_strength_t):g}T" if header.field_strength_t else "unknown",
        "contrast": contrast,
    }
    field_t = nominal_field(header.field_strength_t) if header.field_strength_t else None
    return Volume(path, rel, subject, contrast, shape[0], keys, field_t, coils, (shape[-2], shape[-1]))


def discover_brats(root: Path, wanted: Sequence[str]) -> Discovered:
    """BraTS / FeTS volumes under ``root`` (no natural key of their own: institutions come from a CSV)."""
    return discover_nifti(find_brats_files(root, wanted), root, lambda _source: ({}, None))


def discover_ixi(root: Path, wanted: Sequence[str]) -> Discovered:
    """IXI volumes under ``root``, each keyed by the hospital its name carries (and that hospital's field)."""

    def hospital(source: SourceFile) -> tuple[dict[str, str], float | None]:
        parsed = parse_ixi_name(source.path.name)
        assert parsed is not None  # find_ixi_files only returns files with IXI names
        return {"hospital": parsed[1]}, IXI_FIELD_STRENGTH_T[parsed[1]]

    return discover_nifti(find_ixi_files(root, wanted), root, hospital)


def discover_nifti(
    sources: Sequence[SourceFile],
    root: Path,
    keys_of: Callable[[SourceFile], tuple[dict[str, str], float | None]],
) -> Discovered:
    """NIfTI ``sources`` as volumes (slice count from the header), with ``keys_of``'s natural keys and field
    strength per file; unreadable headers are skipped with the reason."""
    volumes, skipped = [], []
    for source in sources:
        rel = source.path.relative_to(root).as_posix()
        try:
            slices = nifti_axial_slices(source.path)
        except DataError as exc:
            log.warning("%s: skipped: %s", source.path, exc)
            skipped.append((rel, str(exc)))
            continue
        keys, field_t = keys_of(source)
        volumes.append(
            Volume(source.path, rel, source.subject or rel, source.contrast or "unknown", slices, keys, field_t)
        )
    return volumes, skipped


def nifti_axial_slices(path: Path) -> int:
    """Axial slice count from the header alone (the reader's full scan is ``data check``'s job)."""
    try:
        img = cast(nib.spatialimages.SpatialImage, nib.load(path))
        codes = nifti.aff2axcodes(img.affine)
    except NIFTI_ERRORS as exc:
        raise DataError(f"{path}: unreadable NIfTI header ({exc})") from exc
    if len(img.shape) not in (3, 4) or None in codes:
        raise DataError(f"{path}: not a 3-D volume with an orientation (shape {img.shape}, axes {codes})")
    return int(img.shape[next(i for i, c in enumerate(codes) if c in ("S", "I"))])
