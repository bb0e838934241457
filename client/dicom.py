"""Reconstructions as DICOM MR Image Storage series, the format a hospital's PACS and viewers open.

One series per volume, one file per slice, 16-bit unsigned pixels with a rescale slope back to the
reconstruction's units. Every file carries the type 1 and type 2 attributes of the MR Image IOD (checked
with dicom3tools' ``dciodvfy`` in the tests) and says it is derived: ImageType DERIVED\\SECONDARY\\OTHER
and a DerivationDescription naming the exact model that made it.

Geometry comes from the input's own header, never a default: fastMRI HDF5 from its ISMRMRD header
(pixel spacing = reconstructed field of view / matrix, slice thickness = the slab's z field of view,
slices stacked along the axial normal, centred at the isocentre), NIfTI from its affine (converted from
RAS to DICOM's LPS). An input whose header lacks the geometry is refused rather than written at a
made-up 1 mm. The patient is pseudonymous by policy (:class:`PatientIdPolicy`); the input's file name is
never written. The folder is built under a hidden temporary name and renamed at the end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.artifact import ModelCard
from common.atomic import atomic_dir
from common.data.readers import NiftiInfo, to_display
from common.data.scanner_header import HeaderError, ScannerHeader, parse_scanner_header
from common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world coordinates are RAS; DICOM's are LPS
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to the patient's left, columns to posterior
MIN_SALT_BYTES = 16
PSEUDONYM_PREFIX = "FS"


# ------------------------------------------------------------------------------- patient identity


class PatientIdPolicy(BaseModel):
    """How the written PatientID is chosen; the input's name or identity is never written.

    ``random``: a fresh pseudonym per input identity in this run (series of one input group together,
    nothing links them to the input or to other runs). ``salted-hash``: HMAC-SHA-256 of the input's
    identity under a site secret, so the same patient gets the same pseudonym in every run while the
    pseudonym reveals nothing without the salt. ``given``: the id the user typed (e.g. the PACS's own).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["random", "salted-hash", "given"] = "random"
    salt: bytes | None = Field(default=None, repr=False)
    patient_id: str | None = None

    @field_validator("patient_id")
    @classmethod
    def _long_string(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not 0 < len(value) <= 64 or "\\" in value or not value.isprintable():
            raise ValueError("must be 1-64 printable characters without a backslash (DICOM LO)")
        return value

    @model_validator(mode="after")
    def _mode_needs(self) -> PatientIdPolicy:
        if self.mode == "salted-hash" and (self.salt is None or len(self.salt) < MIN_SALT_BYTES):
            raise ValueError(f"salted-hash needs a secret salt of at least {MIN_SALT_BYTES} bytes")
        if self.mode == "given" and self.patient_id is None:
            raise ValueError("given needs a patient_id")
        if self.mode != "given" and self.patient_id is not None:
            raise ValueError(f"patient_id is only used with mode 'given', not {self.mode!r}")
        return self

    @classmethod
    def from_options(cls, patient_id: str | None, salt_file: Path | None) -> PatientIdPolicy:
        """The policy from ``--patient-id`` / ``--pseudonym-salt-file`` (at most one); errors name the option."""
        if patient_id is not None and salt_file is not None:
            raise ConfigError("--patient-id, --pseudonym-salt-file: give at most one")
        if patient_id is not None:
            try:
                return cls(mode="given", patient_id=patient_id)
            except ValueError as exc:
                raise ConfigError(f"--patient-id: {_reason(exc)}") from None
        if salt_file is not None:
            try:
                salt = Path(salt_file).read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"{salt_file}: --pseudonym-salt-file: cannot read ({exc.strerror})") from None
            try:
                return cls(mode="salted-hash", salt=salt)
            except ValueError as exc:
                raise ConfigError(f"{salt_file}: --pseudonym-salt-file: {_reason(exc)}") from None
        return cls()


def _reason(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    return errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc)


class Pseudonymiser:
    """Applies a :class:`PatientIdPolicy` to input identities; random pseudonyms are stable within one run."""

    def __init__(self, policy: PatientIdPolicy) -> None:
        self.policy = policy
        self._random: dict[str, str] = {}

    def __call__(self, identity: str) -> str:
        if self.policy.mode == "given":
            assert self.policy.patient_id is not None
            return self.policy.patient_id
        if self.policy.mode == "salted-hash":
            assert self.policy.salt is not None
            digest = hmac.new(self.policy.salt, identity.encode("utf-8"), hashlib.sha256).hexdigest()
            return f"{PSEUDONYM_PREFIX}{digest[:24].upper()}"
        return self._random.setdefault(identity, f"{PSEUDONYM_PREFIX}{secrets.token_hex(12).upper()}")


# ------------------------------------------------------------------------------- what the series says


@dataclass(frozen=True)
class SeriesGeometry:
    """Where each slice lies: LPS positions (mm) of the first pixel, direction cosines and spacings."""

    positions: list[np.ndarray]
    cosines: tuple[float, ...]  # row direction then column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns), DICOM's order
    thickness: float
    slice_spacing: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.cosines[:3]), np.asarray(self.cosines[3:]))


@dataclass(frozen=True)
class Acquisition:
    """Scanner and sequence facts the input's header gives; None is written as an empty type 2 value."""

    field_strength_t: float | None = None
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    flip_angle_deg: float | None = None
    imaging_frequency_mhz: float | None = None
    protocol: str | None = None
    manufacturer: str | None = None
    model: str | None = None


def read_fastmri_header(path: Path) -> ScannerHeader:
    """The ISMRMRD header of a fastMRI file; DICOM needs its geometry, so a file without one is refused."""
    try:
        with h5py.File(path, "r") as f:
            if "ismrmrd_header" not in f:
                raise DataError(
                    f"{path}: no 'ismrmrd_header'; DICOM output needs its field of view and matrix (use --format h5)"
                )
            header = parse_scanner_header(f["ismrmrd_header"][()])
    except HeaderError as exc:
        raise DataError(f"{path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable HDF5 ({exc})") from None
    if header.recon_fov_mm is None or header.recon_matrix is None:
        raise DataError(
            f"{path}: ismrmrd_header: encoding/reconSpace: fieldOfView_mm and matrixSize are needed "
            "for DICOM geometry (use --format h5)"
        )
    return header


def fastmri_identity(path: Path) -> str:
    """The input's identity for pseudonyms: the file's ``patient_id`` attribute, else its name."""
    with h5py.File(path, "r") as f:
        value = f.attrs.get("patient_id")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if value else path.name


def fastmri_acquisition(header: ScannerHeader) -> Acquisition:
    frequency = header.imaging_frequency_hz
    return Acquisition(
        field_strength_t=header.field_strength_t,
        echo_time_ms=header.echo_time_ms,
        repetition_time_ms=header.repetition_time_ms,
        inversion_time_ms=header.inversion_time_ms,
        flip_angle_deg=header.flip_angle_deg,
        imaging_frequency_mhz=frequency / 1e6 if frequency else None,
        protocol=header.protocol,
        manufacturer=header.vendor,
        model=header.model,
    )


def fastmri_geometry(header: ScannerHeader, shape: tuple[int, int], count: int) -> SeriesGeometry:
    """An axial stack from the reconstructed field of view: spacing = FOV / matrix, slices one slab apart.

    fastMRI images are (x, y) = (readout, phase encode) = (rows, columns), cropped to the recon matrix;
    the stack is centred at the isocentre, as the header gives no table position.
    """
    assert header.recon_fov_mm is not None and header.recon_matrix is not None  # read_fastmri_header checked
    fov, matrix = header.recon_fov_mm, header.recon_matrix
    spacing = (fov[0] / matrix[0], fov[1] / matrix[1])
    thickness = fov[2] / matrix[2]
    rows, cols = shape
    x0, y0 = -(cols - 1) / 2 * spacing[1], -(rows - 1) / 2 * spacing[0]
    positions = [np.array([x0, y0, (k - (count - 1) / 2) * thickness]) for k in range(count)]
    return SeriesGeometry(positions, _AXIAL, spacing, thickness, thickness)


def nifti_geometry(
    affine: np.ndarray, info: NiftiInfo, shape: tuple[int, int, int], slice_indices: list[int]
) -> SeriesGeometry:
    """Positions, cosines and spacings of display-oriented slices from the NIfTI affine (RAS -> LPS)."""
    axial = info.axial_axis
    in_plane = [i for i in range(3) if i != axial]
    # Voxel indices of each display pixel: to_display applied to index grids gives the exact mapping.
    grids = np.meshgrid(np.arange(shape[in_plane[0]]), np.arange(shape[in_plane[1]]), indexing="ij")
    shown = [to_display(g.astype(np.float64), info) for g in grids]

    def world(row: int, col: int, k: int) -> np.ndarray:
        voxel = np.zeros(4)
        voxel[3] = 1.0
        voxel[in_plane[0]], voxel[in_plane[1]] = shown[0][row, col], shown[1][row, col]
        voxel[axial] = k
        return _LPS @ (affine @ voxel)[:3]

    origin0 = world(0, 0, slice_indices[0])
    along_row = world(0, 1, slice_indices[0]) - origin0  # next column
    along_col = world(1, 0, slice_indices[0]) - origin0  # next row
    spacing = (float(np.linalg.norm(along_col)), float(np.linalg.norm(along_row)))
    cosines = tuple(float(c) for c in (*(along_row / spacing[1]), *(along_col / spacing[0])))
    positions = [world(0, 0, k) for k in slice_indices]
    thickness = float(np.linalg.norm(world(0, 0, slice_indices[0] + 1) - origin0))
    step = float(np.linalg.norm(positions[1] - positions[0])) if len(positions) > 1 else thickness
    return SeriesGeometry(positions, cosines, spacing, thickness, step)


# ------------------------------------------------------------------------------- writing


def _ds(value: float | None, digits: int = 6) -> str:
    """A DICOM decimal string (16 characters at most), empty for an unknown type 2 value."""
    return "" if value is None else f"{value:.{digits}g}"


def write_series(
    images: np.ndarray,
    geometry: SeriesGeometry,
    acquisition: Acquisition,
    patient_id: str,
    target: Path,
    card: ModelCard,
) -> Path:
    """Write ``images`` (S, rows, cols) as one DICOM series in the folder ``target`` (refused if it exists)."""
    if target.exists():
        raise DataError(f"{target}: already exists; choose another --out")
    if not np.all(np.isfinite(images)):
        raise DataError(f"{target}: reconstruction contains NaN or Inf; nothing written")
    if len(images) != len(geometry.positions):
        raise ValueError(f"{len(images)} images but {len(geometry.positions)} slice positions")
    images = np.maximum(images, 0.0)
    peak = float(images.max())
    slope = peak / 65535.0 if peak > 0 else 1.0
    pixels = np.round(images / slope).astype(np.uint16)
    now = dt.datetime.now(dt.UTC)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = geometry.normal
    derivation = (
        f"reconstructed from undersampled k-space by FedSense model {card.id} "
        f"({card.architecture.name}, round {card.round})"
    )
    with atomic_dir(target) as tmp:  # target is absent, checked above
        for number, (plane, position) in enumerate(zip(pixels, geometry.positions), start=1):
            instance = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = instance
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = tmp / f"IM{number:04d}.dcm"
            ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, instance
            ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
            ds.DerivationDescription = derivation[:1024]
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
            ds.Modality = "MR"
            ds.Manufacturer = (acquisition.manufacturer or "")[:64]
            if acquisition.model:
                ds.ManufacturerModelName = acquisition.model[:64]
            ds.SoftwareVersions = "FedSense"
            ds.SeriesDescription = f"FedSense {card.id}"[:64]
            if acquisition.protocol:
                ds.ProtocolName = acquisition.protocol[:64]
            ds.PatientName, ds.PatientID = "", patient_id  # name: type 2, left empty
            ds.PatientBirthDate, ds.PatientSex = "", ""
            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = "FedSense: pseudonymous PatientID, no identifiers"
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "2D"
            ds.SliceThickness = _ds(geometry.thickness)
            ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
            ds.RepetitionTime = _ds(acquisition.repetition_time_ms)
            ds.EchoTime = _ds(acquisition.echo_time_ms)
            if acquisition.inversion_time_ms is not None:
                ds.InversionTime = _ds(acquisition.inversion_time_ms)
            ds.EchoTrainLength = ""
            if acquisition.imaging_frequency_mhz is not None:
                ds.ImagingFrequency = _ds(acquisition.imaging_frequency_mhz, 9)
            if acquisition.field_strength_t is not None:
                ds.MagneticFieldStrength = _ds(acquisition.field_strength_t)
            if acquisition.flip_angle_deg is not None:
                ds.FlipAngle = _ds(acquisition.flip_angle_deg)
            ds.Laterality, ds.PatientPosition = "", "HFS"  # laterality: type 2C, unknown for paired parts
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SeriesNumber, ds.InstanceNumber = 1, number
            ds.ImagePositionPatient = [_ds(float(v), 10) for v in position]
            ds.ImageOrientationPatient = [_ds(v, 10) for v in geometry.cosines]
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
            ds.SliceLocation = _ds(float(np.dot(position, normal)), 10)
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
            ds.PixelSpacing = [_ds(s, 10) for s in geometry.pixel_spacing]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
            ds.WindowCenter, ds.WindowWidth = _ds(peak / 2), _ds(peak)
            ds.VOILUTFunction = "LINEAR_EXACT"  # the window is in rescaled units, where the peak may be < 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", _ds(slope, 8), "US"
            ds.ImageComments = derivation[:10240]
            ds.PixelData = np.ascontiguousarray(plane).tobytes()
            ds.save_as(path, enforce_file_format=True)
    logger.debug(
        "%s: %d images, spacing %s mm, thickness %g mm", target, len(pixels), geometry.pixel_spacing, geometry.thickness
    )
    return target
