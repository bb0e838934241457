"""``fedsense reconstruct``: apply an exported model to the scans a hospital holds.

Inputs, prepared exactly as in training (:mod:`common.data.dataset`):

- fastMRI HDF5 (multi- or single-coil ``kspace``): undersampled files carry their sampling ``mask``
  (fastMRI's test/challenge layout); fully sampled ones are undersampled here with the given (or the
  model's trained) mask settings. Coil maps come from the calibration region, the image is cropped to
  the header's recon size, and the output is fastMRI's submission format (``reconstruction``,
  (slices, h, w) float32, one file per volume) in the k-space's own units.
- NIfTI magnitude volumes with a site config: every slice is re-acquired by the site's scanner
  simulation (for studies), reconstructed, and written back on the input's voxel grid with its affine
  and header, in its intensity units.
- Raw radial / spiral HDF5 (:mod:`common.data.noncartesian_h5`: samples and their trajectory): used as
  acquired (no mask), coil maps from the k-space centre, output as for fastMRI at the recon matrix.
- ``--format dicom``: one MR Image Storage series per volume (:mod:`client.dicom`).

Every input is checked before any output is made (k-space present, coil count and mask among those the
model was trained on, finite values), and so is every output (:mod:`common.outputs`: never an input,
never inside or around one, an existing one only with ``--overwrite``); outputs are written to hidden temp
files and renamed, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import h5py
import nibabel as nib
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from client import dicom
from common.artifact import LoadedModel, ModelCard
from common.atomic import atomic_write, fsync_dir
from common.coils import estimate_maps_from_acs, rss
from common.config import SiteConfig
from common.data.acquisition import resize_image
from common.data.dataset import SiteDataset, acquired_mask
from common.data.kinds import KINDS, dataset_kind
from common.data.noncartesian import prepare_stored, zero_filled_rss
from common.data.noncartesian_h5 import NonCartesianReader
from common.data.readers import (
    FastMRIReader,
    NiftiInfo,
    NiftiReader,
    SourceFile,
    scan_nifti,
    to_display,
)
from common.device import autocast, batch_to
from common.errors import ConfigError, DataError, OutputError
from common.fft import center_crop, ifft2c_np
from common.masks import PATTERNS, seed_for
from common.nufft import is_non_cartesian
from common.outputs import check_can_write, check_new_file, check_new_folder, check_not_input
from common.precision import choose_precision

logger = logging.getLogger(__name__)

Format = Literal["h5", "nifti", "dicom"]
FORMATS = ("h5", "nifti", "dicom")
# How far an input's achieved acceleration may be from one the model was trained at.
ACCELERATION_MATCH = 0.25


@dataclass(frozen=True)
class MaskSettings:
    """How to undersample fully sampled k-space (defaults: the model's training acquisition)."""

    pattern: str
    acceleration: float
    center_fraction: float
    seed: int = 0


@dataclass
class Volume:
    """One reconstructed volume: ``image`` (S, h, w) in the input's units, with what it came from."""

    source: Path
    kind: Literal["fastmri", "nifti"]
    image: np.ndarray
    nifti: nib.Nifti1Image | None = None
    info: NiftiInfo | None = None
    slice_indices: list[int] = field(default_factory=list)
    field_strength_t: float | None = None  # the site scanner's, for NIfTI inputs (their header has none)


def is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii") or path.name.endswith(".nii.gz")


def default_mask(card: ModelCard) -> MaskSettings | None:
    """The training acquisition's mask when all training sites used one setting."""
    settings = {(a.mask, a.acceleration, a.center_fraction) for a in card.acquisitions() if a.mask is not None}
    if len(settings) != 1:
        return None
    pattern, acceleration, center_fraction = settings.pop()
    assert center_fraction is not None  # a Cartesian mask's setting has one
    return MaskSettings(pattern, acceleration, center_fraction)


def check_coils(path: Path, coils: int, card: ModelCard) -> None:
    """Refuse a coil count the model never saw (when the card knows the training sites' coils)."""
    trained = sorted({a.coils for a in card.acquisitions()})
    if trained and coils not in trained:
        raise DataError(f"{path}: k-space has {coils} coil(s); model {card.id} was trained on {trained} coil(s)")


def check_mask(path: Path, pattern: str | None, acceleration: float, card: ModelCard, allow: bool) -> None:
    """Refuse an undersampling the model was not trained for (pattern unknown for a file's own mask)."""
    trained = [a for a in card.acquisitions() if a.mask is not None]  # radial / spiral sites have no mask
    if not trained or allow:
        return
    for a in trained:
        close = abs(acceleration - a.acceleration) <= ACCELERATION_MATCH * a.acceleration
        if close and (pattern is None or pattern == a.mask):
            return
    seen = ", ".join(sorted({f"{a.mask} R={a.acceleration:g}" for a in trained}))
    what = f"{pattern} R={acceleration:g}" if pattern else f"a mask with R={acceleration:.2f}"
    raise DataError(
        f"{path}: {what} is not a mask model {card.id} was trained for ({seen}); "
        "use --allow-untrained-mask to reconstruct anyway"
    )


@torch.no_grad()
def _run(model: torch.nn.Module | None, batch: dict[str, object], device: torch.device, precision: str) -> np.ndarray:
    """Model (or zero-filled RSS when ``model`` is None) on one prepared slice batch -> (B, H, W) float32."""
    batch = batch_to(batch, device)
    if model is None:
        kspace = batch["masked_kspace"]
        assert isinstance(kspace, torch.Tensor)
        if is_non_cartesian(kspace):
            return (
                torch.stack(
                    [
                        zero_filled_rss(y, t, tuple(m.shape[-2:]))
                        for y, t, m in zip(  # type: ignore[call-overload]
                            kspace, batch["mask"], batch["sens_maps"], strict=True
                        )
                    ]
                )
                .cpu()
                .numpy()
                .astype(np.float32)
            )
        return rss(ifft2c_np(kspace.cpu().numpy()), dim=1).astype(np.float32)
    with autocast(device, precision):
        out = model(batch["masked_kspace"], batch["mask"], batch["sens_maps"])
    out = out.float().cpu().numpy()
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("the model produced NaN or Inf")
    return out


# ------------------------------------------------------------------------------- fastMRI HDF5


def _file_mask(path: Path, f: h5py.File, shape: tuple[int, int]) -> np.ndarray | None:
    """The file's own sampling mask as (H, W) float32 (fastMRI stores one value per column), if any."""
    if "mask" not in f:
        return None
    raw = np.asarray(f["mask"][()], dtype=np.float32)
    if raw.ndim == 1 and raw.shape[0] == shape[1]:
        return np.broadcast_to((raw > 0).astype(np.float32), shape).copy()
    if raw.shape == shape:
        return (raw > 0).astype(np.float32)
    raise DataError(f"{path}: 'mask' has shape {raw.shape}; expected ({shape[1]},) or {shape}")


def prepare_fastmri(
    path: Path, card: ModelCard, mask: MaskSettings | None, allow_untrained_mask: bool
) -> tuple[FastMRIReader, np.ndarray | None]:
    """Index and check one fastMRI file; returns its reader and its own mask (None: fully sampled)."""
    reader = FastMRIReader(path.parent, [SourceFile(path)])
    with h5py.File(path, "r") as f:
        kspace = f["kspace"]
        coils = 1 if kspace.ndim == 3 else int(kspace.shape[1])
        own = _file_mask(path, f, (int(kspace.shape[-2]), int(kspace.shape[-1])))
    check_coils(path, coils, card)
    if own is not None:
        check_mask(path, None, own.size / max(float(own.sum()), 1.0), card, allow_untrained_mask)
    elif mask is None:
        raise ConfigError(
            f"{path}: k-space is fully sampled and the model card names no single training mask; "
            "give --mask, --acceleration and --center-fraction"
        )
    else:
        check_mask(path, mask.pattern, mask.acceleration, card, allow_untrained_mask)
    return reader, own


def _fastmri_slices(
    reader: FastMRIReader, own_mask: np.ndarray | None, mask: MaskSettings | None
) -> Iterator[tuple[dict[str, object], tuple[int, int], float]]:
    """(batch of one slice, crop size, scale) per slice, prepared as :class:`SiteDataset` prepares k-space."""
    for index, example in enumerate(reader.examples):
        kspace, meta = reader.read_slice(index)
        height, width = kspace.shape[-2:]
        if own_mask is not None:
            sampling = own_mask
        else:
            assert mask is not None
            seed = seed_for(mask.seed, example.path.name, example.slice_idx)
            sampling = acquired_mask(
                mask.pattern, (height, width), mask.acceleration, mask.center_fraction, seed, meta.acquired_columns
            )
        masked = (kspace * sampling).astype(np.complex64)
        maps = estimate_maps_from_acs(masked, mask=sampling).astype(np.complex64)
        size = meta.target.shape[-2:] if meta.target is not None else meta.recon_size
        crop = (min(int(size[0]), height), min(int(size[1]), width))
        peak = float(center_crop(rss(ifft2c_np(masked), dim=0), crop).max())
        scale = 1.0 / peak if peak > 0 else 1.0
        batch: dict[str, object] = {
            "masked_kspace": torch.from_numpy(masked * np.float32(scale))[None],
            "mask": torch.from_numpy(sampling[np.newaxis, np.newaxis].astype(np.float32)),
            "sens_maps": torch.from_numpy(np.ascontiguousarray(maps))[None],
        }
        yield batch, crop, scale


def prepare_noncartesian(path: Path, card: ModelCard) -> NonCartesianReader:
    """Index and check one raw radial / spiral file (:mod:`common.data.noncartesian_h5`)."""
    reader = NonCartesianReader(path.parent, [SourceFile(path)])
    with h5py.File(path, "r") as f:
        coils = int(f["kspace"].shape[1])
    check_coils(path, coils, card)
    return reader


# ------------------------------------------------------------------------------- NIfTI


class _VolumeDataset(SiteDataset):
    """Every slice of one NIfTI volume, re-acquired by the site's scanner as in training."""

    def __init__(self, config: SiteConfig, path: Path) -> None:
        reader = NiftiReader(path.parent, [SourceFile(path, subject=path.name)], min_foreground=0.0)
        super().__init__(config, "train", reader=reader)
        self.indices = list(range(len(reader.examples)))


def from_display(image: np.ndarray, info: NiftiInfo) -> np.ndarray:
    """Inverse of :func:`common.data.readers.to_display`: a display slice back to voxel order."""
    if info.flip_cols:
        image = image[:, ::-1]
    if info.flip_rows:
        image = image[::-1]
    remaining = [i for i in range(3) if i != info.axial_axis]
    return np.ascontiguousarray(image if remaining[0] == info.row_axis else image.T)


def unresize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Back from the scanner matrix to a slice of ``shape``: undo :func:`resize_image`'s padding and scaling."""
    height, width = shape
    out_h, out_w = image.shape
    if height * out_w < width * out_h:
        height = round(width * out_h / out_w)
    else:
        width = round(height * out_w / out_h)
    full = resize_image(image, (height, width))
    top, left = (height - shape[0]) // 2, (width - shape[1]) // 2
    return full[top : top + shape[0], left : left + shape[1]]


# ------------------------------------------------------------------------------- driver


class Reconstructor:
    """Applies one loaded model to input files; ``zero_filled_only`` gives the no-learning reference."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: torch.device,
        precision: str = "fp32",
        site: SiteConfig | None = None,
        mask: MaskSettings | None = None,
        allow_untrained_mask: bool = False,
        zero_filled_only: bool = False,
    ) -> None:
        self.loaded, self.card = loaded, loaded.card
        self.device, self.precision = device, precision
        self.site, self.allow = site, allow_untrained_mask
        self.mask = mask if mask is not None else default_mask(self.card)
        if self.mask is not None and self.mask.pattern not in PATTERNS:
            raise ConfigError(f"--mask: must be one of {', '.join(PATTERNS)}, got {self.mask.pattern!r}")
        self.model = None if zero_filled_only else loaded.model.to(device).eval()

    def _precision(self, batch: dict[str, object]) -> str:
        """The precision to run at; ``auto`` is measured on the first slice (and cached per machine)."""
        if self.precision == "auto" and self.model is not None:
            self.precision = choose_precision(
                "auto", self.model, batch_to(batch, self.device), self.device, "infer", source="--precision"
            )
        return self.precision

    def check(self, path: Path) -> object:
        """Validate ``path`` before anything is written; returns what :meth:`volume` needs."""
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        # One the user may not read is the file system saying no (exit 4, "PATH: Permission denied"), not a
        # malformed file: opened here so no reader's wrapping turns it into a data error.
        path.open("rb").close()
        if is_nifti(path):
            if self.site is None:
                raise ConfigError(
                    f"{path}: a NIfTI magnitude volume needs --site-config (the scanner that re-acquires it)"
                )
            if dataset_kind(self.site.dataset).raw_kspace:
                volumes = ", ".join(name for name, kind in KINDS.items() if not kind.raw_kspace)
                raise ConfigError(
                    f"{self.site.data_path}: dataset: a NIfTI input needs a site config of a "
                    f"magnitude-volume kind ({volumes}), not {self.site.dataset}"
                )
            check_coils(path, self.site.scanner.coils, self.card)
            check_mask(path, self.site.scanner.mask, self.site.scanner.acceleration, self.card, self.allow)
            return _VolumeDataset(self.site, path)
        if path.suffix != ".h5":
            raise DataError(f"{path}: not a fastMRI .h5 or a NIfTI .nii/.nii.gz file")
        try:
            with h5py.File(path, "r") as f:
                non_cartesian = "trajectory" in f
        except OSError as exc:
            raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
        if non_cartesian:  # samples along a trajectory: reconstructed as acquired, no mask
            return prepare_noncartesian(path, self.card)
        return prepare_fastmri(path, self.card, self.mask, self.allow)

    def volume(self, path: Path, prepared: object, progress: Progress | None = None) -> Volume:
        """Reconstruct every slice of one checked input (progress bar per volume)."""
        try:
            if isinstance(prepared, _VolumeDataset):
                return self._nifti(path, prepared, progress)
            if isinstance(prepared, NonCartesianReader):
                return self._noncartesian(path, prepared, progress)
            reader, own = cast(tuple[FastMRIReader, np.ndarray | None], prepared)
            return self._fastmri(path, reader, own, progress)
        except FloatingPointError as exc:
            raise DataError(f"{path}: {exc}") from exc

    def _fastmri(self, path: Path, reader: FastMRIReader, own: np.ndarray | None, progress: Progress | None) -> Volume:
        task = progress.add_task(path.name, total=len(reader.examples)) if progress else None
        images = []
        for batch, crop, scale in _fastmri_slices(reader, own, self.mask):
            images.append(center_crop(_run(self.model, batch, self.device, self._precision(batch))[0], crop) / scale)
            if progress is not None and task is not None:
                progress.advance(task)
        return Volume(
            path, "fastmri", np.stack(images).astype(np.float32), slice_indices=[e.slice_idx for e in reader.examples]
        )

    def _noncartesian(self, path: Path, reader: NonCartesianReader, progress: Progress | None) -> Volume:
        task = progress.add_task(path.name, total=len(reader.examples)) if progress else None
        images = []
        for index in range(len(reader.examples)):
            samples, meta = reader.read_acquisition(index)
            assert meta.trajectory is not None
            prepared = prepare_stored(samples, meta.trajectory, meta.recon_size)
            batch = {k: prepared[k][None] for k in ("masked_kspace", "mask", "sens_maps")}
            images.append(_run(self.model, batch, self.device, self.precision)[0] / float(prepared["scale"]))
            if progress is not None and task is not None:
                progress.advance(task)
        return Volume(
            path, "fastmri", np.stack(images).astype(np.float32), slice_indices=[e.slice_idx for e in reader.examples]
        )

    def _nifti(self, path: Path, dataset: _VolumeDataset, progress: Progress | None) -> Volume:
        img = cast(nib.Nifti1Image, nib.load(path))
        info = scan_nifti(path, 0.0)
        shape = tuple(int(n) for n in img.shape[:3])
        plane = [shape[i] for i in range(3) if i != info.axial_axis]
        display_shape = to_display(np.zeros(plane, dtype=np.float32), info).shape
        volume = np.zeros(shape, np.float32)
        task = progress.add_task(path.name, total=len(dataset)) if progress else None
        for index in range(len(dataset)):
            sample = dataset[index]
            batch = {k: sample[k][None] for k in ("masked_kspace", "mask", "sens_maps")}
            # Undo the sample's scaling and the simulation's division by the volume maximum.
            units = info.volume_max / sample["scale"]
            recon = _run(self.model, batch, self.device, self._precision(batch))[0] * units
            index_3d: list[slice | int] = [slice(None)] * 3
            index_3d[info.axial_axis] = int(sample["slice_idx"])
            volume[tuple(index_3d)] = from_display(unresize(recon, display_shape), info)
            if progress is not None and task is not None:
                progress.advance(task)
        return Volume(
            path,
            "nifti",
            volume,
            nifti=img,
            info=info,
            slice_indices=list(range(shape[info.axial_axis])),
            field_strength_t=self.site.scanner.field_strength_t if self.site else None,
        )


def output_name(source: Path, fmt: str) -> str:
    stem = source.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".h5")
    return {"h5": f"{stem}.h5", "nifti": f"{stem}.nii.gz", "dicom": stem}[fmt]


def write_volume(
    volume: Volume, out_dir: Path, fmt: str, card: ModelCard, pseudonyms: dicom.Pseudonymiser | None = None
) -> Path:
    """Write one volume atomically (temp file or folder, then rename); returns the output path.

    The target was checked by :func:`check_outputs`: absent, or an earlier output ``--overwrite`` replaces.
    ``pseudonyms`` chooses DICOM PatientIDs (default: random pseudonyms, see :class:`client.dicom.PatientIdPolicy`).
    """
    target = out_dir / output_name(volume.source, fmt)
    if fmt == "h5":
        image = volume.image if volume.kind == "fastmri" else display_stack(volume)

        def write(stream: object) -> None:
            with h5py.File(stream, "w") as f:
                f.create_dataset("reconstruction", data=image.astype(np.float32))
                f.attrs["fedsense_model"] = card.id
                f.attrs["source"] = volume.source.name

        atomic_write(target, write)
    elif fmt == "nifti":
        if volume.nifti is None:
            raise ConfigError(
                f"{volume.source}: --format nifti needs a NIfTI input (its affine and header); "
                "use h5 or dicom for k-space inputs"
            )
        header = volume.nifti.header.copy()
        header.set_data_dtype(np.float32)
        nifti = nib.Nifti1Image(volume.image, volume.nifti.affine, header=header)
        nifti.header.set_slope_inter(1.0, 0.0)
        tmp = target.with_name(f".{target.name}.tmp.nii.gz")
        try:
            nib.save(nifti, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
    elif fmt == "dicom":
        ids = pseudonyms or dicom.Pseudonymiser(dicom.PatientIdPolicy())
        if not target.exists():
            write_dicom(volume, target, card, ids)
        else:  # --overwrite: the new series is complete before the old one goes
            fresh = target.with_name(f".{target.name}.new")
            shutil.rmtree(fresh, ignore_errors=True)
            write_dicom(volume, fresh, card, ids)
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(fresh, target)
            shutil.rmtree(old)
    else:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return target


def write_dicom(volume: Volume, target: Path, card: ModelCard, pseudonyms: dicom.Pseudonymiser) -> Path:
    """One DICOM series with the geometry and scanner facts of the volume's own input header."""
    if volume.kind == "fastmri":
        header = dicom.read_fastmri_header(volume.source)
        geometry = dicom.fastmri_geometry(header, volume.image.shape[1:], len(volume.image))
        return dicom.write_series(
            volume.image,
            geometry,
            dicom.fastmri_acquisition(header),
            pseudonyms(dicom.fastmri_identity(volume.source)),
            target,
            card,
        )
    assert volume.nifti is not None and volume.info is not None
    shape = tuple(int(n) for n in volume.image.shape[:3])
    geometry = dicom.nifti_geometry(volume.nifti.affine, volume.info, shape, volume.slice_indices)  # type: ignore[arg-type]
    acquisition = dicom.Acquisition(field_strength_t=volume.field_strength_t)
    return dicom.write_series(
        display_stack(volume), geometry, acquisition, pseudonyms(volume.source.name), target, card
    )


def display_stack(volume: Volume) -> np.ndarray:
    """A NIfTI volume's slices in display orientation, stacked (S, h, w), for h5 / DICOM output."""
    assert volume.info is not None
    axial = volume.info.axial_axis
    return np.stack([to_display(np.take(volume.image, k, axis=axial), volume.info) for k in volume.slice_indices])


def check_outputs(inputs: Sequence[Path], out_dir: Path, fmt: str | None, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that is, holds or lies in an input, a file where the output folder
    goes, two inputs that would write the same output, and existing outputs without ``overwrite``."""
    check_not_input(out_dir, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out: {out_dir} is an existing file; --out names the folder the outputs go to")
    targets: dict[Path, Path] = {}
    for path in inputs:
        chosen = fmt or ("nifti" if is_nifti(path) else "h5")
        target = out_dir / output_name(path, chosen)
        if target in targets:
            raise OutputError(
                f"{path}: would write {target}, as {targets[target]} does; reconstruct them into separate --out folders"
            )
        targets[target] = path
        check_not_input(target, inputs)
        if chosen == "dicom":
            if target.exists() and not target.is_dir():
                raise OutputError(f"--out: {target} is a file, where the DICOM series folder would go")
            check_new_folder(target, overwrite)
        else:
            check_new_file(target, overwrite)
    check_can_write(out_dir)


def reconstruct_files(
    reconstructor: Reconstructor,
    inputs: Sequence[Path],
    out_dir: Path,
    fmt: str | None,
    console: Console | None = None,
    overwrite: bool = False,
    patient_ids: dicom.PatientIdPolicy | None = None,
) -> list[Path]:
    """Check every output and input first, then reconstruct and write them one by one; returns the written paths."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    inputs = [Path(p) for p in inputs]
    check_outputs(inputs, out_dir, fmt, overwrite)
    prepared = [(Path(p), reconstructor.check(Path(p))) for p in inputs]
    for path, _ in prepared:
        chosen = fmt or ("nifti" if is_nifti(path) else "h5")
        if chosen == "nifti" and not is_nifti(path):
            raise ConfigError(f"{path}: --format nifti needs a NIfTI input; use h5 or dicom for k-space")
        if chosen == "dicom" and not is_nifti(path):
            dicom.read_fastmri_header(path)  # refuses an input without geometry before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    pseudonyms = dicom.Pseudonymiser(patient_ids or dicom.PatientIdPolicy())
    written = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=console is None) as progress:
        for path, item in prepared:
            volume = reconstructor.volume(path, item, progress)
            written.append(
                write_volume(
                    volume, out_dir, fmt or ("nifti" if is_nifti(path) else "h5"), reconstructor.card, pseudonyms
                )
            )
            logger.info("%s -> %s", path.name, written[-1])
    return written
