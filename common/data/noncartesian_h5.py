"""Raw non-Cartesian k-space in HDF5, fastMRI style: the file format, its writer and its slice reader.

fastMRI stores Cartesian k-space as ``kspace`` (slices, coils, H, W). A radial or spiral scan has no grid,
so each slice stores its samples and where they were taken:

- ``kspace``: (slices, coils, K) complex64, the measured samples, coil by coil;
- ``trajectory``: (slices, K, 2) float32, (ky, kx) in cycles per pixel of the reconstruction matrix,
  in [-0.5, 0.5] (:mod:`common.nufft`'s convention);
- ``reconstruction_rss``: (slices, H, W) float32, optional reference image (training needs it);
- ``ismrmrd_header``: ISMRMRD XML; its reconSpace matrix is the image size and its ``trajectory``
  element says ``goldenangle`` or ``spiral``;
- attributes as fastMRI: ``acquisition``, ``max``, ``norm``, ``patient_id``; plus ``num_coils``.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from common.data.readers import (
    H5_ERRORS,
    Example,
    FastMRIReader,
    SliceMeta,
    SourceFile,
    attr_str,
    parse_ismrmrd_header,
)
from common.errors import DataError

log = logging.getLogger(__name__)

#: ISMRMRD's names for FedSense's trajectories.
ISMRMRD_TRAJECTORY = {"radial-ga": "goldenangle", "spiral": "spiral"}


def write_noncartesian_h5(
    path: Path,
    samples: np.ndarray,
    trajectory: np.ndarray,
    header: bytes,
    *,
    target: np.ndarray | None = None,
    acquisition: str = "",
    patient_id: str = "",
) -> None:
    """Write one volume: ``samples`` (S, C, K), ``trajectory`` (S, K, 2), ``target`` (S, H, W) or None."""
    if samples.ndim != 3 or trajectory.shape != (samples.shape[0], samples.shape[2], 2):
        raise ValueError(f"samples (S, C, K) {samples.shape} and trajectory (S, K, 2) {trajectory.shape} disagree")
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=samples.astype(np.complex64))
        f.create_dataset("trajectory", data=trajectory.astype(np.float32))
        if target is not None:
            f.create_dataset("reconstruction_rss", data=target.astype(np.float32))
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
        f["ismrmrd_header"] = header
        f.attrs["acquisition"] = acquisition
        f.attrs["patient_id"] = patient_id
        f.attrs["num_coils"] = int(samples.shape[1])


@dataclass(frozen=True)
class _NonCartesianInfo:
    num_slices: int
    has_target: bool
    recon_size: tuple[int, int]
    volume_max: float | None


class NonCartesianReader(FastMRIReader):
    """Non-Cartesian ``.h5`` files (module docstring): samples, trajectory and reference, read per slice.

    Shares the fastMRI reader's file discovery, child-process check of every file and contrast filter.
    """

    format_name = "non-Cartesian HDF5"
    expected_names = "*.h5 with 'kspace' (slices, coils, K) and 'trajectory' (slices, K, 2)"
    _info_type = _NonCartesianInfo

    def _index_file(self, source: SourceFile) -> list[Example]:
        path = self._checked_path(source)
        try:
            with h5py.File(path, "r") as f:
                kspace, trajectory = f.get("kspace"), f.get("trajectory")
                if not isinstance(kspace, h5py.Dataset) or not isinstance(trajectory, h5py.Dataset):
                    raise DataError(f"{path}: missing dataset 'kspace' or 'trajectory' (not a non-Cartesian file)")
                if kspace.ndim != 3 or kspace.dtype.kind != "c" or 0 in kspace.shape:
                    raise DataError(
                        f"{path}: 'kspace' is {kspace.dtype} {kspace.shape}; expected complex "
                        "(slices, coils, K) samples"
                    )
                expected = (kspace.shape[0], kspace.shape[2], 2)
                if trajectory.shape != expected or trajectory.dtype.kind != "f":
                    raise DataError(
                        f"{path}: 'trajectory' is {trajectory.dtype} {trajectory.shape}; expected "
                        f"float {expected} to match 'kspace' {kspace.shape}"
                    )
                acquisition = attr_str(f.attrs.get("acquisition"), default="")
                if self._contrasts and acquisition.upper() not in self._contrasts:
                    return []
                target = f.get("reconstruction_rss")
                has_target = isinstance(target, h5py.Dataset) and target.ndim == 3
                if has_target:
                    recon_size = (int(target.shape[-2]), int(target.shape[-1]))
                elif "ismrmrd_header" in f:
                    try:
                        geometry = parse_ismrmrd_header(f["ismrmrd_header"][()])
                    except (ET.ParseError, KeyError, ValueError) as exc:
                        raise DataError(f"{path}: unreadable ismrmrd_header: {exc}") from exc
                    recon_size = (geometry.recon_size[0], geometry.recon_size[1])
                else:
                    raise DataError(f"{path}: no image size: needs 'reconstruction_rss' or an 'ismrmrd_header'")
                volume_max = float(f.attrs["max"]) if "max" in f.attrs else None
                subject = source.subject or attr_str(f.attrs.get("patient_id"), default=path.stem) or path.stem
                num_slices = int(kspace.shape[0])
        except DataError:
            raise
        except H5_ERRORS as exc:
            raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
        self._info[path] = _NonCartesianInfo(num_slices, has_target, recon_size, volume_max)
        return [Example(path, k, subject, acquisition or "unknown") for k in range(num_slices)]

    def has_reference(self, index: int) -> bool:
        info: _NonCartesianInfo = self._info[self.examples[index].path]
        return info.has_target

    def _read(self, index: int, reference: bool) -> tuple[np.ndarray, SliceMeta]:
        example = self.examples[index]
        info = self._info[example.path]
        try:
            with h5py.File(example.path, "r") as f:
                samples = np.asarray(f["kspace"][example.slice_idx], dtype=np.complex64)
                coords = np.asarray(f["trajectory"][example.slice_idx], dtype=np.float32)
                target = None
                if reference and info.has_target:
                    target = np.asarray(f["reconstruction_rss"][example.slice_idx], dtype=np.float32)
        except H5_ERRORS as exc:
            raise DataError(f"{example.path}: cannot read slice {example.slice_idx}: {exc}") from exc
        where = f"{example.path}: slice {example.slice_idx}"
        if not np.all(np.isfinite(samples)):
            raise DataError(f"{where}: k-space contains NaN or Inf")
        if not np.all(np.isfinite(coords)) or np.max(np.abs(coords)) > 0.5 + 1e-6:
            raise DataError(f"{where}: trajectory must be finite and within [-0.5, 0.5] cycles per pixel")
        if target is not None and not np.all(np.isfinite(target)):
            raise DataError(f"{where}: reconstruction_rss contains NaN or Inf")
        meta = SliceMeta(
            kind="noncartesian",
            recon_size=info.recon_size,
            volume_max=info.volume_max,
            target=target,
            trajectory=coords,
        )
        return samples, meta


__all__ = ["ISMRMRD_TRAJECTORY", "NonCartesianReader", "write_noncartesian_h5"]
