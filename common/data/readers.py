"""Lazy slice readers for the formats hospitals actually hold: fastMRI HDF5, BraTS and IXI NIfTI.

A reader indexes a site's files once (cheap: headers, attributes, and for NIfTI one streaming pass to find
the non-empty slices) and then reads one 2-D slice per request, never a whole volume: fastMRI volumes are
hundreds of megabytes and a training step needs one slice. Every bad-input failure is a
:class:`~common.errors.DataError` whose message starts with the offending path; with
``skip_bad_files`` such files are logged, listed in ``skipped`` and left out instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import xml.etree.ElementTree as ET
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack, cast

import h5py
import nibabel as nib
import numpy as np

from common.config import BRATS_ALIASES, SiteConfig
from common.data import h5check, index_cache, nifti
from common.errors import DataError

log = logging.getLogger(__name__)

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
# A NIfTI slice counts as anatomy when this fraction of it is brighter than 10 % of the volume maximum.
DEFAULT_MIN_FOREGROUND = 0.05
_FOREGROUND_LEVEL = 0.10
# Slices per read while scanning a NIfTI volume: bounded memory, sequential (gzip-friendly) reads.
_SCAN_SLAB = 16

NIFTI_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,  # a damaged header (unknown data type code, bad vox_offset)
)
# What h5py raises for a damaged file: libhdf5 errors surface as OSError, RuntimeError or ValueError, and a
# damaged object table can turn a dataset into another kind of object (TypeError when indexed).
H5_ERRORS = (OSError, RuntimeError, ValueError, TypeError, KeyError)

# FeTS releases (FeTS2022_00000_flair.nii.gz) name BraTS scans the same way, with their own prefix.
_BRATS_UNDERSCORE = re.compile(r"^((?:BraTS|FeTS).+?)_(t1|t1ce|t2|flair)\.nii(?:\.gz)?$")
_BRATS_DASH = re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+-(t1n|t1c|t2w|t2f)\.nii(?:\.gz)?$")
_IXI = re.compile(r"^(IXI\d+)-(Guys|HH|IOP)-\d+-(T1|T2|PD)\.nii(?:\.gz)?$")


@dataclass(frozen=True)
class SourceFile:
    """A candidate data file; ``subject``/``contrast`` come from the name where the format encodes them."""

    path: Path
    subject: str | None = None
    contrast: str | None = None


@dataclass(frozen=True)
class Example:
    """One 2-D training example: a slice of a file, with its provenance."""

    path: Path
    slice_idx: int
    subject: str
    contrast: str


@dataclass(frozen=True)
class SliceMeta:
    """What a reader knows about a slice besides its pixels.

    ``kind`` is ``"kspace"`` for (C, H, W) complex64 k-space (fastMRI; single-coil gets C = 1) and
    ``"image"`` for an (H, W) float32 magnitude (NIfTI). ``volume_max`` is the maximum of the volume's
    target (fastMRI ``max`` attribute) or magnitude (NIfTI); None when the file does not record it.
    ``target`` is the stored reconstruction slice (fastMRI ``reconstruction_*``), if any.
    ``acquired_columns`` is the [left, right) range of k-space columns the scanner acquired; columns
    outside it are zero padding and must not count as sampled (fastMRI ``encodingLimits``).
    ``"noncartesian"`` slices are radial/spiral samples (C, K) taken at ``trajectory``
    (:mod:`common.data.noncartesian_h5`).
    """

    kind: Literal["kspace", "image", "noncartesian"]
    recon_size: tuple[int, int]
    volume_max: float | None
    target: np.ndarray | None = None
    acquired_columns: tuple[int, int] | None = None
    trajectory: np.ndarray | None = None  # (K, 2) sample coordinates of "noncartesian" samples (C, K)


class ReaderOptions(TypedDict, total=False):
    """The keyword options of :class:`SliceReader` that its subclasses pass on."""

    max_slices_per_volume: int | None
    skip_bad_files: bool


class SliceReader(ABC):
    """Index of a site's (file, slice) examples plus on-demand slice reading."""

    format_name: str = "data"
    expected_names: str = ""
    # What the index keeps per file besides its examples (a frozen dataclass), for the index cache.
    _info_type: type
    _info: dict[Path, Any]

    def __init__(
        self,
        root: Path,
        files: Sequence[SourceFile],
        *,
        max_slices_per_volume: int | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        self.root = root
        self.examples: list[Example] = []
        self.skipped: list[tuple[Path, str]] = []
        if not files:
            raise DataError(f"{root}: no {self.format_name} files found ({self.expected_names})")
        for source in files:
            try:
                examples = self._index_file(source)
            except DataError as exc:
                if not skip_bad_files:
                    raise
                log.warning("skipping bad file: %s", exc)
                self.skipped.append((source.path, str(exc)))
                continue
            self.examples.extend(_central(examples, max_slices_per_volume))
        if self.skipped:
            log.warning("%s: skipped %d bad file(s) of %d", root, len(self.skipped), len(files))
        if not self.examples:
            raise DataError(
                f"{root}: no usable slices in {len(files)} {self.format_name} file(s)"
                f" ({len(self.skipped)} skipped as bad)"
            )

    @abstractmethod
    def _index_file(self, source: SourceFile) -> list[Example]:
        """Validate one file cheaply and list its examples; raise DataError (path first) if unusable."""

    def index_state(self) -> dict[str, Any]:
        """The index as JSON-able data (paths relative to the root), for :mod:`common.data.index_cache`."""

        def rel(path: Path) -> str:
            return os.path.relpath(path, self.root)

        return {
            "examples": [[rel(e.path), e.slice_idx, e.subject, e.contrast] for e in self.examples],
            "skipped": [[rel(path), reason] for path, reason in self.skipped],
            "info": {rel(path): dataclasses.asdict(info) for path, info in self._info.items()},
        }

    @classmethod
    def restore(cls, root: Path, state: dict[str, Any]) -> SliceReader:
        """A reader with the index of :meth:`index_state`, without opening any file."""
        reader = cls.__new__(cls)
        reader.root = root
        reader.examples = [Example(root / p, int(k), str(s), str(c)) for p, k, s, c in state["examples"]]
        reader.skipped = [(root / p, str(reason)) for p, reason in state["skipped"]]
        reader._info = {root / p: index_cache.dataclass_from_json(cls._info_type, d) for p, d in state["info"].items()}
        if not reader.examples or any(e.path not in reader._info for e in reader.examples):
            raise ValueError("index state without examples, or an example without its file's info")
        return reader

    @abstractmethod
    def read_slice(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        """Read example ``index`` from disk: k-space (C, H, W) or magnitude (H, W), and its metadata."""

    @abstractmethod
    def read_acquisition(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        """Like :meth:`read_slice` but never opening a stored reference (``meta.target`` is None).

        The path of a self-supervised site (:mod:`common.data.selfsup`), which must not see one.
        """

    def has_reference(self, index: int) -> bool:
        """Whether example ``index`` has a reference image to score against (evaluation only)."""
        return True

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def subjects(self) -> list[str]:
        """Distinct subject ids, sorted: the unit of the train/val/test split."""
        return sorted({example.subject for example in self.examples})


def _central(examples: list[Example], limit: int | None) -> list[Example]:
    """Keep the ``limit`` middle slices of a volume: edge slices carry little anatomy and much noise."""
    if limit is None or len(examples) <= limit:
        return examples
    start = (len(examples) - limit) // 2
    return examples[start : start + limit]


# --------------------------------------------------------------------------- fastMRI HDF5


def _et_query(root: ET.Element, path: Sequence[str], namespace: str = ISMRMRD_NAMESPACE) -> str:
    """Text of the element at ``path`` under ``root`` in the ISMRMRD namespace (fastMRI's ``et_query``)."""
    query = "/".join(f"ns:{tag}" for tag in path)
    element = root.find(f"./{query}", {"ns": namespace})
    if element is None or element.text is None:
        raise KeyError("/".join(path))
    return element.text


@dataclass(frozen=True)
class IsmrmrdGeometry:
    """The parts of an ISMRMRD header the data pipeline needs."""

    encoded_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    acquired_columns: tuple[int, int] | None
    field_strength_t: float | None


def parse_ismrmrd_header(xml: bytes | str) -> IsmrmrdGeometry:
    """Encoding/recon matrix sizes and the acquired phase-encode range, as fastMRI's SliceDataset reads them.

    Raises ValueError or KeyError on malformed XML or missing required elements.
    """
    root = ET.fromstring(xml)
    enc = ["encoding", "encodedSpace", "matrixSize"]
    rec = ["encoding", "reconSpace", "matrixSize"]
    ex, ey, ez = (int(_et_query(root, [*enc, axis])) for axis in "xyz")
    rx, ry, rz = (int(_et_query(root, [*rec, axis])) for axis in "xyz")
    limits = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    try:
        centre = int(_et_query(root, [*limits, "center"]))
        maximum = int(_et_query(root, [*limits, "maximum"])) + 1
        left = ey // 2 - centre
        acquired: tuple[int, int] | None = (left, left + maximum)
    except KeyError:
        acquired = None
    try:
        field = float(_et_query(root, ["acquisitionSystemInformation", "systemFieldStrength_T"]))
    except KeyError:
        field = None
    return IsmrmrdGeometry((ex, ey, ez), (rx, ry, rz), acquired, field)


@dataclass(frozen=True)
class _H5Info:
    num_slices: int
    target_key: str | None
    recon_size: tuple[int, int]
    volume_max: float | None
    acquired_columns: tuple[int, int] | None


class FastMRIReader(SliceReader):
    """fastMRI single- or multi-coil ``.h5``: ``kspace`` (slices, [coils,] H, W) complex, read per slice."""

    format_name = "fastMRI HDF5"
    expected_names = "*.h5 with a 'kspace' dataset"
    _info_type: type = _H5Info

    def __init__(
        self,
        root: Path,
        files: Sequence[SourceFile],
        *,
        contrasts: Sequence[str] = (),
        check_seconds: float = h5check.DEFAULT_TIMEOUT,
        **kwargs: Unpack[ReaderOptions],
    ) -> None:
        self._contrasts = {c.upper() for c in contrasts}
        self._info: dict[Path, Any] = {}  # _H5Info, or a subclass's own record
        # Every file is first read in a child process with a time limit: a file that hangs or crashes
        # libhdf5 is a DataError here (or skipped), never a site that stops answering.
        try:
            self._verdicts = h5check.check_files([s.path for s in files], timeout=check_seconds)
        except OSError as exc:
            raise DataError(f"{root}: cannot check the HDF5 files in a child process: {exc}") from exc
        super().__init__(root, files, **kwargs)

    def _checked_path(self, source: SourceFile) -> Path:
        """``source``'s path, once its child-process check passed; else that check's ``DataError``."""
        verdict = self._verdicts.get(source.path)
        if verdict is not None:
            raise DataError(f"{source.path}: {verdict}")
        return source.path

    def _index_file(self, source: SourceFile) -> list[Example]:
        path = self._checked_path(source)
        try:
            with h5py.File(path, "r") as f:
                kspace = f.get("kspace")
                if not isinstance(kspace, h5py.Dataset):
                    raise DataError(f"{path}: missing dataset 'kspace'")
                if kspace.ndim not in (3, 4):
                    raise DataError(
                        f"{path}: 'kspace' has {kspace.ndim} dimensions {kspace.shape}; expected 3 "
                        "(slices, H, W) for single-coil or 4 (slices, coils, H, W) for multi-coil"
                    )
                if kspace.dtype.kind != "c":
                    raise DataError(f"{path}: 'kspace' has dtype {kspace.dtype}; expected complex")
                if 0 in kspace.shape:
                    raise DataError(f"{path}: 'kspace' is empty {kspace.shape}")
                acquisition = attr_str(f.attrs.get("acquisition"), default="")
                if self._contrasts and acquisition.upper() not in self._contrasts:
                    log.debug("%s: acquisition %r is not one of the site's contrasts", path, acquisition)
                    return []
                height, width = (int(n) for n in kspace.shape[-2:])
                target_key = _target_key(f, multicoil=kspace.ndim == 4)
                geometry = None
                if "ismrmrd_header" in f:
                    try:
                        geometry = parse_ismrmrd_header(f["ismrmrd_header"][()])
                    except (ET.ParseError, KeyError, ValueError) as exc:
                        raise DataError(f"{path}: unreadable ismrmrd_header: {exc}") from exc
                if target_key is not None:
                    recon_size = (int(f[target_key].shape[-2]), int(f[target_key].shape[-1]))
                elif geometry is not None:
                    recon_size = (min(geometry.recon_size[0], height), min(geometry.recon_size[1], width))
                else:
                    recon_size = (height, width)
                volume_max = float(f.attrs["max"]) if "max" in f.attrs else None
                subject = source.subject or attr_str(f.attrs.get("patient_id"), default=path.stem)
                num_slices = int(kspace.shape[0])
        except DataError:
            raise
        except H5_ERRORS as exc:
            raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
        acquired = geometry.acquired_columns if geometry is not None else None
        if acquired is not None and not 0 <= acquired[0] < acquired[1] <= width:
            acquired = None
        self._info[path] = _H5Info(num_slices, target_key, recon_size, volume_max, acquired)
        contrast = acquisition or "unknown"
        return [Example(path, k, subject, contrast) for k in range(num_slices)]

    def read_slice(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        return self._read(index, reference=True)

    def read_acquisition(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        return self._read(index, reference=False)

    def has_reference(self, index: int) -> bool:
        """Only a stored reconstruction counts: a self-supervised site's k-space may be undersampled,
        so the RSS of its k-space is no reference."""
        return self._info[self.examples[index].path].target_key is not None

    def _read(self, index: int, reference: bool) -> tuple[np.ndarray, SliceMeta]:
        example = self.examples[index]
        info = self._info[example.path]
        try:
            with h5py.File(example.path, "r") as f:
                kspace = np.asarray(f["kspace"][example.slice_idx])
                target = None
                if reference and info.target_key is not None:
                    target = np.asarray(f[info.target_key][example.slice_idx], dtype=np.float32)
        except H5_ERRORS as exc:
            raise DataError(f"{example.path}: cannot read slice {example.slice_idx}: {exc}") from exc
        if kspace.ndim == 2:
            kspace = kspace[np.newaxis]
        if not np.all(np.isfinite(kspace)):
            raise DataError(f"{example.path}: slice {example.slice_idx}: k-space contains NaN or Inf")
        if target is not None and not np.all(np.isfinite(target)):
            raise DataError(f"{example.path}: slice {example.slice_idx}: {info.target_key} contains NaN or Inf")
        meta = SliceMeta(
            kind="kspace",
            recon_size=info.recon_size,
            volume_max=info.volume_max,
            target=target,
            acquired_columns=info.acquired_columns,
        )
        return kspace.astype(np.complex64, copy=False), meta


def attr_str(value: object, default: str) -> str:
    """An HDF5 attribute as text (h5py returns bytes or str depending on how it was written)."""
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _target_key(f: h5py.File, multicoil: bool) -> str | None:
    """The stored reference reconstruction: RSS for multi-coil, ESC for single-coil (fastMRI's choice)."""
    preferred = (
        ("reconstruction_rss", "reconstruction_esc") if multicoil else ("reconstruction_esc", "reconstruction_rss")
    )
    for key in preferred:
        if isinstance(f.get(key), h5py.Dataset) and f[key].ndim == 3:
            return key
    return None


# --------------------------------------------------------------------------- NIfTI (BraTS, IXI)


def parse_brats_name(name: str) -> tuple[str, str] | None:
    """(subject, canonical contrast) from a BraTS 2019-2021 or 2023+ file name; None for other files.

    The 2023+ timepoint suffix is dropped from the subject so all scans of a patient share one split.
    """
    match = _BRATS_UNDERSCORE.match(name)
    if match:
        return match.group(1), match.group(2)
    match = _BRATS_DASH.match(name)
    if match:
        return match.group(1), BRATS_ALIASES[match.group(2)]
    return None


def parse_ixi_name(name: str) -> tuple[str, str, str] | None:
    """(subject, hospital, contrast) from an IXI file name such as ``IXI002-Guys-0828-T1.nii.gz``."""
    match = _IXI.match(name)
    return (match.group(1), match.group(2), match.group(3)) if match else None


@dataclass(frozen=True)
class NiftiInfo:
    """Result of the one-off scan of a NIfTI volume."""

    axial_axis: int  # voxel axis along the patient's inferior-superior direction
    row_axis: int  # in-plane voxel axis shown as image rows (anterior -> posterior)
    flip_rows: bool
    flip_cols: bool
    nonempty: tuple[int, ...]  # slice indices along ``axial_axis`` with anatomy
    volume_max: float


_SCAN_CACHE: dict[tuple[str, int, int, float], NiftiInfo] = {}


def _load_nifti(path: Path) -> nib.spatialimages.SpatialImage:
    try:
        return cast(nib.spatialimages.SpatialImage, nib.load(path))
    except NIFTI_ERRORS as exc:
        raise DataError(f"{path}: unreadable NIfTI ({exc})") from exc


def scan_nifti(path: Path, min_foreground: float = DEFAULT_MIN_FOREGROUND) -> NiftiInfo:
    """Orientation, non-empty axial slices and maximum of a NIfTI volume, cached per file version.

    The volume is streamed in slabs of axial slices (bounded memory; sequential reads suit gzip). The cache
    key includes the file's size and mtime so a replaced file is scanned again.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, min_foreground)
    if key in _SCAN_CACHE:
        return _SCAN_CACHE[key]
    img = _load_nifti(path)
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"{path}: NIfTI has shape {shape}; expected a 3-D volume")
    if min(shape) < 1:
        raise DataError(f"{path}: NIfTI has shape {shape}; every dimension must be >= 1")
    if not np.all(np.isfinite(img.affine)):
        raise DataError(f"{path}: NIfTI affine contains NaN or Inf")
    codes = nifti.aff2axcodes(img.affine)
    if None in codes:  # a singular affine: some voxel axis points nowhere
        raise DataError(f"{path}: NIfTI affine gives no orientation to every axis (axis codes {codes})")
    axial = next(i for i, c in enumerate(codes) if c in ("S", "I"))
    in_plane = [i for i in range(3) if i != axial]
    row_axis = next(i for i in in_plane if codes[i] in ("A", "P"))
    col_axis = next(i for i in in_plane if i != row_axis)

    num_slices = shape[axial]
    maxima = np.zeros(num_slices)
    thumbnails = []
    for start in range(0, num_slices, _SCAN_SLAB):
        block = slice(start, min(start + _SCAN_SLAB, num_slices))
        index: list[slice | int] = [slice(None)] * len(shape)
        index[axial] = block
        if len(shape) == 4:
            index[3] = 0
        try:
            slab = np.asarray(img.dataobj[tuple(index)], dtype=np.float32)
        except NIFTI_ERRORS as exc:
            raise DataError(f"{path}: unreadable NIfTI data ({exc})") from exc
        if not np.all(np.isfinite(slab)):
            raise DataError(f"{path}: NIfTI contains NaN or Inf voxels")
        slab = np.moveaxis(slab, axial, 0)
        maxima[block] = slab.reshape(slab.shape[0], -1).max(axis=1)
        # Half-resolution copies suffice for the foreground fraction and keep the scan's memory small.
        thumbnails.append(slab[:, ::2, ::2])
    volume_max = float(maxima.max()) if maxima.size else 0.0
    nonempty: tuple[int, ...] = ()
    if volume_max > 0:
        thumbs = np.concatenate(thumbnails)
        fraction = (thumbs > _FOREGROUND_LEVEL * volume_max).reshape(len(thumbs), -1).mean(axis=1)
        nonempty = tuple(int(k) for k in np.flatnonzero(fraction >= min_foreground))
    info = NiftiInfo(
        axial_axis=axial,
        row_axis=row_axis,
        flip_rows=codes[row_axis] == "A",
        flip_cols=codes[col_axis] == "R",
        nonempty=nonempty,
        volume_max=volume_max,
    )
    _SCAN_CACHE[key] = info
    return info


def to_display(slice_2d: np.ndarray, info: NiftiInfo) -> np.ndarray:
    """Voxel-order axial slice -> radiological display: anterior at the top, patient's right on the left."""
    remaining = [i for i in range(3) if i != info.axial_axis]
    image = slice_2d if remaining[0] == info.row_axis else slice_2d.T
    if info.flip_rows:
        image = image[::-1]
    if info.flip_cols:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


class NiftiReader(SliceReader):
    """Magnitude NIfTI volumes (BraTS, IXI): one axial slice per read via ``dataobj`` proxy slicing."""

    format_name = "NIfTI"
    expected_names = "*.nii or *.nii.gz"
    _info_type = NiftiInfo

    def __init__(
        self,
        root: Path,
        files: Sequence[SourceFile],
        *,
        min_foreground: float = DEFAULT_MIN_FOREGROUND,
        **kwargs: Unpack[ReaderOptions],
    ) -> None:
        self._min_foreground = min_foreground
        self._info: dict[Path, NiftiInfo] = {}
        super().__init__(root, files, **kwargs)

    def _index_file(self, source: SourceFile) -> list[Example]:
        info = scan_nifti(source.path, self._min_foreground)
        self._info[source.path] = info
        subject = source.subject or source.path.name.split(".")[0]
        contrast = source.contrast or "unknown"
        return [Example(source.path, k, subject, contrast) for k in info.nonempty]

    def read_slice(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        return self._read_image(index)

    def read_acquisition(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        """The magnitude image: for NIfTI data it stands in for the patient the simulated scanner
        measures (:mod:`common.data.acquisition`); a self-supervised dataset keeps only the samples."""
        return self._read_image(index)

    def _read_image(self, index: int) -> tuple[np.ndarray, SliceMeta]:
        example = self.examples[index]
        info = self._info[example.path]
        img = _load_nifti(example.path)
        slicer: list[slice | int] = [slice(None)] * len(img.shape)
        slicer[info.axial_axis] = example.slice_idx
        if len(img.shape) == 4:
            slicer[3] = 0
        try:
            data = np.asarray(img.dataobj[tuple(slicer)], dtype=np.float32)
        except NIFTI_ERRORS as exc:
            raise DataError(f"{example.path}: cannot read slice {example.slice_idx}: {exc}") from exc
        image = np.maximum(to_display(data, info), 0.0)
        meta = SliceMeta(kind="image", recon_size=image.shape, volume_max=info.volume_max)
        return image, meta


class BratsReader(NiftiReader):
    """BraTS folders: one NIfTI per contrast and subject, skull-stripped, 2020 / 2021 / 2023+ naming."""

    format_name = "BraTS NIfTI"
    expected_names = "e.g. BraTS20_Training_001_flair.nii.gz or BraTS-GLI-00000-000-t2f.nii.gz"


class IXIReader(NiftiReader):
    """IXI: ``IXI<id>-<hospital>-<no>-<contrast>.nii.gz``; the hospital gives the natural site split."""

    format_name = "IXI NIfTI"
    expected_names = "e.g. IXI002-Guys-0828-T1.nii.gz"


def _nifti_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".nii.gz") or p.name.endswith(".nii")))


def find_brats_files(root: Path, contrasts: Sequence[str] = ()) -> list[SourceFile]:
    """BraTS volumes under ``root`` with the wanted contrasts (all four when empty); masks are ignored."""
    wanted = set(contrasts)
    found = []
    for path in _nifti_files(root):
        parsed = parse_brats_name(path.name)
        if parsed is None:
            log.debug("%s: not a BraTS image volume name; ignored", path)
        elif not wanted or parsed[1] in wanted:
            found.append(SourceFile(path, subject=parsed[0], contrast=parsed[1]))
    return found


def find_ixi_files(root: Path, contrasts: Sequence[str] = (), hospital: str | None = None) -> list[SourceFile]:
    """IXI volumes under ``root`` with the wanted contrasts (T1/T2/PD when empty) from ``hospital`` (any)."""
    wanted = set(contrasts)
    found = []
    for path in _nifti_files(root):
        parsed = parse_ixi_name(path.name)
        if parsed is None:
            log.debug("%s: not an IXI T1/T2/PD volume name; ignored", path)
            continue
        subject, site, contrast = parsed
        if (hospital is None or site == hospital) and (not wanted or contrast in wanted):
            found.append(SourceFile(path, subject=subject, contrast=contrast))
    return found


def find_fastmri_files(root: Path) -> list[SourceFile]:
    """Every ``.h5`` under ``root``; filtering by acquisition needs the file's attributes, so comes later."""
    return [SourceFile(p) for p in sorted(root.rglob("*.h5")) if p.is_file()]


def open_reader(
    config: SiteConfig,
    min_foreground: float = DEFAULT_MIN_FOREGROUND,
    cache_dir: Path | Literal["default"] | None = "default",
) -> SliceReader:
    """The reader for a site's dataset kind, indexed over ``config.data_path``.

    The index comes from the site's index cache (``cache_dir``; by default
    :func:`common.data.index_cache.default_cache_dir`, ``None`` for none) when nothing it depends on
    changed; otherwise the files are indexed and the cache is written. The reader class, its arguments
    and the files come from the kind's entry in :mod:`common.data.kinds`.
    """
    from common.data.kinds import dataset_kind  # the kinds name this module's readers: imported on use

    root = config.data_path
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist")
    common: dict[str, Any] = {
        "max_slices_per_volume": config.max_slices_per_volume,
        "skip_bad_files": config.skip_bad_files,
    }
    kind = dataset_kind(config.dataset)
    reader_cls, extra = kind.reader(config, min_foreground)
    files = kind.find(config)
    params = {"reader": reader_cls.__name__, **common, **extra, "names": [[f.subject, f.contrast] for f in files]}
    return index_cache.cached(
        index_cache.default_cache_dir() if cache_dir == "default" else cache_dir,
        key_of=lambda: index_cache.index_key(root, [f.path for f in files], params),
        build=lambda: reader_cls(root, files, **extra, **common),
        restore=lambda state: reader_cls.restore(root, state),
        state_of=lambda reader: reader.index_state(),
        # A time-out may be the machine's load, not the file: such an index is not kept (h5check's rule).
        keep=lambda reader: not any(h5check.TIMED_OUT in reason for _, reason in reader.skipped),
    )
