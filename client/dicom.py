"""Reconstructions as DICOM MR Image Storage series, the format a hospital's PACS and viewers open.

One series per volume, one file per slice, 16-bit unsigned pixels with a rescale slope back to the
reconstruction's units. The series description carries the model card's id, so every image names the
exact model that made it. NIfTI inputs keep their patient geometry (position, orientation and spacing
from the affine, converted from RAS to DICOM's LPS); k-space inputs, which carry none here, get an
axial stack at 1 mm spacing. The folder is built under a hidden temporary name and renamed at the end.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.artifact import ModelCard
from common.atomic import atomic_dir
from common.data.readers import to_display
from common.errors import DataError

if TYPE_CHECKING:
    from client.reconstruct import Volume

_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world coordinates are RAS; DICOM's are LPS


def _geometry(volume: "Volume") -> tuple[list[np.ndarray], list[float], np.ndarray, list[float]]:
    """Per-slice position (mm, LPS), orientation cosines (row, column), pixel spacing and slice spacing."""
    count = len(volume.slice_indices)
    if volume.nifti is None or volume.info is None:
        positions = [np.array([0.0, 0.0, float(k)]) for k in range(count)]
        return positions, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], np.array([1.0, 1.0]), [1.0] * count
    info, affine = volume.info, volume.nifti.affine
    axial = info.axial_axis
    plane = [volume.image.shape[i] for i in range(3) if i != axial]
    # Voxel indices of each display pixel: to_display applied to index grids gives the exact mapping.
    grids = np.meshgrid(np.arange(plane[0]), np.arange(plane[1]), indexing="ij")
    shown = [to_display(g.astype(np.float64), info) for g in grids]
    in_plane = [i for i in range(3) if i != axial]

    def world(row: int, col: int, k: int) -> np.ndarray:
        voxel = np.zeros(4)
        voxel[3] = 1.0
        voxel[in_plane[0]], voxel[in_plane[1]] = shown[0][row, col], shown[1][row, col]
        voxel[axial] = k
        return _LPS @ (affine @ voxel)[:3]

    origin0 = world(0, 0, volume.slice_indices[0])
    along_row = world(0, 1, volume.slice_indices[0]) - origin0  # next column
    along_col = world(1, 0, volume.slice_indices[0]) - origin0  # next row
    spacing = np.array([np.linalg.norm(along_col), np.linalg.norm(along_row)])
    cosines = [*(along_row / spacing[1]), *(along_col / spacing[0])]
    positions = [world(0, 0, k) for k in volume.slice_indices]
    step = float(np.linalg.norm(positions[1] - positions[0])) if count > 1 else 1.0
    return positions, [float(c) for c in cosines], spacing, [step] * count


def write_series(volume: "Volume", target: Path, card: ModelCard) -> Path:
    """Write ``volume`` as a DICOM series in the folder ``target`` (refused if it exists)."""
    from client.reconstruct import display_stack

    if target.exists():
        raise DataError(f"{target}: already exists; choose another --out")
    images = volume.image if volume.kind == "fastmri" else display_stack(volume)
    if not np.all(np.isfinite(images)):
        raise DataError(f"{volume.source}: reconstruction contains NaN or Inf; nothing written")
    images = np.maximum(images, 0.0)
    peak = float(images.max())
    slope = peak / 65535.0 if peak > 0 else 1.0
    pixels = np.round(images / slope).astype(np.uint16)
    positions, cosines, spacing, thickness = _geometry(volume)
    now = dt.datetime.now(dt.timezone.utc)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    with atomic_dir(target) as tmp:  # target is absent, checked above
        for number, (plane, position) in enumerate(zip(pixels, positions), start=1):
            instance = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = instance
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = tmp / f"IM{number:04d}.dcm"
            ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, instance
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.Modality, ds.Manufacturer = "MR", "FedSense"
            ds.PatientName, ds.PatientID = "ANONYMOUS", volume.source.name[:64]
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.SeriesDescription = f"FedSense {card.id}"[:64]
            ds.ImageComments = f"reconstructed by FedSense model {card.id} ({card.architecture.name}, round {card.round})"
            ds.SeriesNumber, ds.InstanceNumber = 1, number
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"
            ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in cosines]
            ds.PixelSpacing = [f"{spacing[0]:.4f}", f"{spacing[1]:.4f}"]
            ds.SliceThickness = f"{thickness[number - 1]:.4f}"
            ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.8g}", "0", "US"
            ds.WindowCenter, ds.WindowWidth = f"{peak / 2:.6g}", f"{peak:.6g}"
            ds.PixelData = np.ascontiguousarray(plane).tobytes()
            ds.save_as(path, enforce_file_format=True)
    return target
