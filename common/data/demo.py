"""Offline demo data for every site, written in the real formats so the real readers serve it.

``fedsense data demo --out DIR`` (or ``python -m common.data.demo --out DIR``) writes, per site config,
``DIR/<site name>/`` holding fastMRI-style multi-coil HDF5, BraTS-style NIfTI folders or IXI-style NIfTI
files, depending on the site's dataset kind: each kind's entry in :mod:`common.data.kinds` names its writer
here (``demo``), with the :data:`~common.data.kinds.DemoWriter` signature. The anatomy comes from the MNI template bundled with nilearn
(see :mod:`common.data.phantom`), so nothing is downloaded; output is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from importlib import resources
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.atomic import atomic_dir, atomic_write_bytes
from common.coils import rss
from common.config import SiteConfig, load_site_config, parse_site_config
from common.data import nifti
from common.data.acquisition import simulate_acquisition
from common.data.kinds import dataset_kind
from common.data.noncartesian import simulate_noncartesian
from common.data.noncartesian_h5 import ISMRMRD_TRAJECTORY, write_noncartesian_h5
from common.data.phantom import Subject, make_subject
from common.data.readers import ISMRMRD_NAMESPACE
from common.errors import ConfigError, FedSenseError, OutputError
from common.fft import ifft2c_np
from common.masks import seed_for
from common.outputs import check_can_write

log = logging.getLogger(__name__)

# The example sites: deploy/sites in a checkout; in an installed wheel the same files as package data
# (setup.py copies them into common/data/demo_sites), so the demo works without the repository.
DEFAULT_SITES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "sites"
SITES_PACKAGE_DIR = "demo_sites"
# Written into each generated site folder; only folders carrying it are ever replaced by a later run.
MARKER = ".fedsense-demo"
# First line of each site config the demo writes beside its data; only such files are ever replaced.
SITE_FILE_HEADER = "# Written by `fedsense data demo`: an example site whose data is the folder beside this file.\n"
_DATA_PATH_LINE = re.compile(r"(?m)^data_path\s*=.*$")
FOV_MM = 240.0
GYROMAGNETIC_MHZ_PER_T = 42.577478

# fastMRI brain acquisitions the phantom can render, and the phantom contrast for each.
FASTMRI_ACQUISITIONS = {"AXT1": "T1", "AXT1PRE": "T1", "AXT1POST": "T1CE", "AXT2": "T2", "AXFLAIR": "FLAIR"}
BRATS_FILE_CONTRASTS = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR"}
IXI_FILE_CONTRASTS = ("T1", "T2", "PD")


def generate_demo(
    out: Path,
    size: int = 128,
    subjects: int | None = None,
    seed: int = 0,
    sites: Sequence[SiteConfig] | None = None,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write demo data for ``sites`` (default: the example sites) under ``out/<site name>``.

    With the example sites, their configs are written beside the data (:func:`write_site_files`).

    Each site folder is built under a temporary name and renamed into place; an earlier demo folder is
    replaced only with ``overwrite``, a folder the generator did not write never.

    ``size`` is the in-plane matrix of the written images and k-space; ``subjects`` overrides each site's
    ``demo.subjects``; ``seed`` is combined with each site's ``demo.seed``. Returns, per site, its folder,
    dataset kind, file names and subject ids.
    """
    if size < 16:
        raise ConfigError(f"demo: size: must be >= 16, got {size}")
    if subjects is not None and subjects < 1:
        raise ConfigError(f"demo: subjects: must be >= 1, got {subjects}")
    if seed < 0:
        raise ConfigError(f"demo: seed: must be >= 0, got {seed}")
    if Path(out).exists() and not Path(out).is_dir():
        raise OutputError(f"--out: {out} is an existing file; --out names the folder the site folders go to")
    # Every output is checked before the first is written: a refusal leaves --out as it was.
    check_can_write(Path(out))
    examples = example_site_files(Path(out)) if sites is None else {}
    names = [site.name for site in sites] if sites is not None else list(examples)
    for target, _ in examples.values():
        _check_replaceable_file(target, overwrite)
    for name in names:
        _check_replaceable(Path(out) / name, overwrite)
    if sites is None:  # the configs as they will be written (data_path relative to them), not yet on disk
        sites = [
            parse_site_config(tomllib.loads(text), str(target), base_dir=target.parent.resolve())
            for target, text in examples.values()
        ]
    # Nothing is left half-written (a full disk, Ctrl-C): the site folders are built under temporary names and
    # renamed in together once all are complete, then the configs that point at them are written; a failure
    # removes what this run created, so the same command can simply be run again.
    created = [p for p in (*(Path(out) / s.name for s in sites), *(t for t, _ in examples.values())) if not p.exists()]
    out_is_new = not Path(out).exists()
    summary: dict[str, dict[str, Any]] = {}
    try:
        with ExitStack() as stack:
            for site in sites:
                summary[site.name] = _write_site(stack, Path(out), site, size, subjects, seed)
        site_files = write_site_files(examples)
    except BaseException:
        for path in created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if out_is_new:
            with suppress(OSError):
                Path(out).rmdir()  # only if empty
        raise
    for name, config in site_files.items():
        summary[name]["config"] = str(config)
    return summary


def _write_site(
    stack: ExitStack, out: Path, site: SiteConfig, size: int, subjects: int | None, seed: int
) -> dict[str, Any]:
    """Build ``site``'s demo folder under a temporary name, renamed onto ``out/<name>`` when ``stack`` closes
    without an error (an old folder there was checked by the caller); returns its summary."""
    writer = dataset_kind(site.dataset).demo
    if writer is None:
        raise ConfigError(f"{site.name}: dataset: the demo cannot synthesise {site.dataset} data")
    started = time.perf_counter()
    site_dir = out / site.name
    rng = np.random.default_rng([seed, site.demo.seed])
    count = subjects if subjects is not None else site.demo.subjects
    building = stack.enter_context(atomic_dir(site_dir, replace=True))
    (building / MARKER).write_text("synthetic demo data written by common.data.demo; safe to delete\n")
    files, subject_ids = writer(building, site, size, count, rng)
    log.info(
        "%s: wrote %d %s file(s) for %d subject(s) to %s in %.1f s",
        site.name,
        len(files),
        site.dataset,
        len(subject_ids),
        site_dir,
        time.perf_counter() - started,
    )
    return {"folder": str(site_dir), "dataset": site.dataset, "files": files, "subjects": subject_ids}


def default_site_files() -> dict[str, str]:
    """File name -> TOML text of the example sites: ``deploy/sites`` in a checkout, else the packaged copies."""
    folder = DEFAULT_SITES_DIR if DEFAULT_SITES_DIR.is_dir() else resources.files("common.data") / SITES_PACKAGE_DIR
    texts = {f.name: f.read_text(encoding="utf-8") for f in folder.iterdir() if f.name.endswith(".toml")}
    if not texts:
        raise ConfigError(f"{folder}: <file>: no site configs found; pass sites explicitly")
    return dict(sorted(texts.items()))


def example_site_files(out: Path) -> dict[str, tuple[Path, str]]:
    """Site name -> (``out/<name>.toml``, its text) for each example site, with ``data_path`` = its demo folder.

    So ``fedsense simulate --sites out/*.toml`` works wherever FedSense is installed. Nothing is written here.
    """
    files = {}
    for file_name, text in default_site_files().items():
        name = parse_site_config(tomllib.loads(text), file_name).name
        if not _DATA_PATH_LINE.search(text):
            raise ConfigError(f"{file_name}: data_path: missing in the example site config")
        files[name] = (
            out / f"{name}.toml",
            SITE_FILE_HEADER + _DATA_PATH_LINE.sub(f'data_path = "{name}"', text, count=1),
        )
    return files


def write_site_files(files: dict[str, tuple[Path, str]]) -> dict[str, Path]:
    """Write the :func:`example_site_files` (checked by the caller); returns site name -> config path."""
    for target, text in files.values():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, text.encode("utf-8"))
    return {name: target for name, (target, _) in files.items()}


def _check_replaceable_file(target: Path, overwrite: bool) -> None:
    """A site config may be written if absent, or over an earlier demo one with ``overwrite``."""
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, where the demo site config goes; not overwriting")
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.read_text(encoding="utf-8", errors="replace").startswith(SITE_FILE_HEADER):
        raise OutputError(f"{target}: exists and was not written by the demo generator; not overwriting")
    if not overwrite:
        raise OutputError(f"{target}: holds an earlier demo site config; pass --overwrite to replace it")


def _check_replaceable(site_dir: Path, overwrite: bool) -> None:
    """A site folder may be written if absent or empty, or an earlier demo output with ``overwrite``."""
    if site_dir.exists() and not site_dir.is_dir():
        raise OutputError(f"{site_dir}: is an existing file, where the demo site folder goes; not overwriting")
    if not site_dir.is_dir() or not any(site_dir.iterdir()):
        return
    if not (site_dir / MARKER).exists():
        raise OutputError(f"{site_dir}: exists and was not written by the demo generator; not overwriting")
    if not overwrite:
        raise OutputError(f"{site_dir}: holds earlier demo data; pass --overwrite to replace it")


def _axial_slices(volume: np.ndarray) -> np.ndarray:
    """RAS (X, Y, Z) volume -> (Z, H, W) radiological axial slices (anterior up, patient's right on the left).

    This is the orientation the NIfTI reader returns, so h5 and NIfTI demo data look alike.
    """
    return np.ascontiguousarray(np.flip(volume.transpose(2, 1, 0), axis=(1, 2)))


# --------------------------------------------------------------------------- fastMRI HDF5


def write_fastmri(
    site_dir: Path, site: SiteConfig, size: int, count: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """One multi-coil brain file per subject, cycling through the site's acquisitions."""
    acquisitions = site.contrasts or ["AXT2"]
    unknown = [a for a in acquisitions if a not in FASTMRI_ACQUISITIONS]
    if unknown:
        raise ConfigError(
            f"{site.name}: contrasts: the demo cannot synthesise {unknown}; use {', '.join(FASTMRI_ACQUISITIONS)}"
        )
    scanner = site.scanner.model_copy(update={"matrix": (size, size)})
    base_seed = int(rng.integers(2**31))
    num_slices, thickness = 12, 5.0
    files, patients = [], []
    for i in range(count):
        acquisition = acquisitions[i % len(acquisitions)]
        subject = make_subject(
            rng,
            size,
            num_slices,
            slice_thickness_mm=thickness,
            z_start_mm=rng.uniform(-25.0, -10.0),
            scalp=True,
        )
        volume = _axial_slices(subject.image(FASTMRI_ACQUISITIONS[acquisition]))
        volume_max = float(volume.max())
        patient_id = f"{rng.integers(16**12):012x}"
        fname = f"file_brain_{acquisition}_{200 + i}_{6000000 + int(rng.integers(1000000))}.h5"
        if scanner.trajectory != "cartesian":  # raw radial / spiral samples (common.data.noncartesian_h5)
            scans = [
                simulate_noncartesian(image, scanner, seed_for(base_seed, fname, k), image_max=volume_max)
                for k, image in enumerate(volume)
            ]
            header = _ismrmrd_header(
                size,
                num_slices,
                thickness,
                scanner.coils,
                scanner.field_strength_t,
                acquisition,
                trajectory=ISMRMRD_TRAJECTORY[scanner.trajectory],
            )
            write_noncartesian_h5(
                site_dir / fname,
                np.stack([s["samples"] for s in scans]),
                np.stack([s["trajectory"][:, :2] for s in scans]),
                header,
                target=np.stack([s["target"] for s in scans]),
                acquisition=acquisition,
                patient_id=patient_id,
            )
            files.append(fname)
            patients.append(patient_id)
            continue
        kspace = np.stack(
            [
                simulate_acquisition(image, scanner, seed_for(base_seed, fname, k), image_max=volume_max).kspace
                for k, image in enumerate(volume)
            ]
        )
        target = rss(ifft2c_np(kspace), dim=1).astype(np.float32)
        with h5py.File(site_dir / fname, "w") as f:
            f.create_dataset("kspace", data=kspace.astype(np.complex64))
            f.create_dataset("reconstruction_rss", data=target)
            f["ismrmrd_header"] = _ismrmrd_header(
                size, num_slices, thickness, site.scanner.coils, site.scanner.field_strength_t, acquisition
            )
            f.attrs["acquisition"] = acquisition
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
            f.attrs["patient_id"] = patient_id
        files.append(fname)
        patients.append(patient_id)
    return files, patients


def _ismrmrd_header(
    size: int,
    num_slices: int,
    thickness: float,
    coils: int,
    field_t: float,
    protocol: str,
    trajectory: str = "cartesian",
) -> bytes:
    """An ISMRMRD XML header with the fields fastMRI's loaders read (matrix sizes, encoding limits)."""
    ET.register_namespace("", ISMRMRD_NAMESPACE)

    def sub(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
        element = ET.SubElement(parent, f"{{{ISMRMRD_NAMESPACE}}}{tag}")
        if text is not None:
            element.text = str(text)
        return element

    root = ET.Element(f"{{{ISMRMRD_NAMESPACE}}}ismrmrdHeader")
    sub(sub(root, "measurementInformation"), "protocolName", protocol)
    system = sub(root, "acquisitionSystemInformation")
    sub(system, "systemVendor", "FedSense demo")
    sub(system, "systemModel", f"Synthetic {field_t:g}T")  # real fastMRI headers name the model ("Skyra")
    sub(system, "systemFieldStrength_T", f"{field_t:g}")
    sub(system, "receiverChannels", coils)
    sub(
        sub(root, "experimentalConditions"),
        "H1resonanceFrequency_Hz",
        round(field_t * GYROMAGNETIC_MHZ_PER_T * 1e6),
    )
    encoding = sub(root, "encoding")
    for space in ("encodedSpace", "reconSpace"):
        element = sub(encoding, space)
        matrix = sub(element, "matrixSize")
        for axis, value in zip("xyz", (size, size, 1), strict=True):
            sub(matrix, axis, value)
        fov = sub(element, "fieldOfView_mm")
        for axis, size_mm in zip("xyz", (FOV_MM, FOV_MM, thickness), strict=True):
            sub(fov, axis, f"{size_mm:g}")
    limits = sub(encoding, "encodingLimits")
    for name, maximum in (("kspace_encoding_step_1", size - 1), ("slice", num_slices - 1)):
        limit = sub(limits, name)
        sub(limit, "minimum", 0)
        sub(limit, "maximum", maximum)
        sub(limit, "center", (maximum + 1) // 2)
    sub(encoding, "trajectory", trajectory)
    header: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)  # typeshed: Any unless "unicode"
    return header


# --------------------------------------------------------------------------- NIfTI


def _save_nifti(volume: np.ndarray, subject: Subject, axcodes: tuple[str, str, str], path: Path) -> None:
    """Save a RAS volume as int16 NIfTI stored in ``axcodes`` voxel order, as scanners and archives vary."""
    nifti.save_reoriented(volume, subject.affine, axcodes, path)


def _to_int16(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Arbitrary scanner units, as stored by archives: a random gain, then int16."""
    gain = rng.uniform(600.0, 1500.0) / max(float(volume.max()), 1e-6)
    return np.clip(np.rint(volume * gain), 0, np.iinfo(np.int16).max).astype(np.int16)


def _nifti_subject(rng: np.random.Generator, size: int, *, scalp: bool, lesion: bool) -> Subject:
    """16 axial 6 mm slices from the basal ganglia upwards; the top ones fall above the head (empty)."""
    return make_subject(
        rng, size, 16, slice_thickness_mm=6.0, z_start_mm=rng.uniform(-5.0, 5.0), scalp=scalp, lesion=lesion
    )


def write_brats(
    site_dir: Path, site: SiteConfig, size: int, count: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """BraTS 2020 layout: ``BraTS20_Training_00K/BraTS20_Training_00K_{t1,t1ce,t2,flair,seg}.nii.gz``.

    Skull-stripped (no scalp), with a glioma and its label map (``_seg``: 1 necrosis, 2 oedema,
    4 enhancing), stored LPS like the BraTS releases.
    """
    files, subjects = [], []
    for i in range(count):
        name = f"BraTS20_Training_{i + 1:03d}"
        subject = _nifti_subject(rng, size, scalp=False, lesion=True)
        (site_dir / name).mkdir()
        for suffix, contrast in BRATS_FILE_CONTRASTS.items():
            fname = f"{name}_{suffix}.nii.gz"
            _save_nifti(_to_int16(subject.image(contrast), rng), subject, ("L", "P", "S"), site_dir / name / fname)
            files.append(f"{name}/{fname}")
        seg = f"{name}_seg.nii.gz"
        _save_nifti(subject.labels(), subject, ("L", "P", "S"), site_dir / name / seg)
        files.append(f"{name}/{seg}")
        subjects.append(name)
    return files, subjects


def write_ixi(
    site_dir: Path, site: SiteConfig, size: int, count: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """IXI layout: ``IXI0KK-<hospital>-NNNN-{T1,T2,PD}.nii.gz``; not skull-stripped, Rician background.

    T1 is stored sagittally and T2/PD axially, as in the IXI release, so the reader's reorientation is used.
    """
    hospital = site.hospital or "Guys"
    files, subjects = [], []
    first_id = int(rng.integers(2, 600))
    for i in range(count):
        subject_id = f"IXI{first_id + i:03d}"
        series = int(rng.integers(1000, 10000))
        subject = _nifti_subject(rng, size, scalp=True, lesion=False)
        for contrast in IXI_FILE_CONTRASTS:
            clean = subject.image(contrast)
            sigma = 0.01 * float(clean.max())
            noisy = np.abs(clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)))
            axcodes = ("P", "S", "R") if contrast == "T1" else ("R", "A", "S")
            fname = f"{subject_id}-{hospital}-{series}-{contrast}.nii.gz"
            _save_nifti(_to_int16(noisy, rng), subject, axcodes, site_dir / fname)
            files.append(fname)
        subjects.append(subject_id)
    return files, subjects


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.data.demo --out DIR [--size N --subjects K --seed S --sites a.toml ...]``."""
    parser = argparse.ArgumentParser(prog="python -m common.data.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write <site name>/ folders into")
    parser.add_argument("--size", type=int, default=128, help="in-plane matrix of the written data")
    parser.add_argument(
        "--subjects", type=int, default=None, help="subjects per site (default: each site's demo.subjects)"
    )
    parser.add_argument("--seed", type=int, default=0, help="combined with each site's demo.seed")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier demo site folders")
    parser.add_argument("--sites", type=Path, nargs="*", help=f"site TOMLs (default: {DEFAULT_SITES_DIR}/*.toml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sites = [load_site_config(p) for p in args.sites] if args.sites else None
        generate_demo(
            args.out, size=args.size, subjects=args.subjects, seed=args.seed, sites=sites, overwrite=args.overwrite
        )
    except FedSenseError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
