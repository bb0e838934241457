"""Dataset kinds: one registry entry per kind of data a site may hold, with everything that differs by kind.

A site config's ``dataset`` names an entry here; its validation (contrast names, hospitals), the files
the kind's folder holds, the cheap signature check ``fedsense simulate``'s preflight runs, the
reader that indexes the folder, how ``fedsense data partition`` indexes and splits a downloaded copy
(:class:`Partitioner`) and how ``fedsense data demo`` synthesises one (:data:`DemoWriter`) are looked up
on that entry, so adding a kind is its module and one :func:`register` call, with no if/elif chain to
find elsewhere (see docs/ARCHITECTURE.md).

Importing this module imports the readers (h5py, nibabel); :mod:`common.config` therefore only looks
kinds up while validating, when both modules are loaded. The demo writers (phantom, PyTorch) are
imported only when a demo is written.
"""

from __future__ import annotations

import gzip
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import BRATS_ALIASES, BRATS_CONTRASTS, IXI_CONTRASTS, IXI_HOSPITALS, SiteConfig
from common.data.discovery import Discovered, discover_brats, discover_fastmri, discover_ixi
from common.data.readers import (
    BratsReader,
    FastMRIReader,
    IXIReader,
    SliceReader,
    SourceFile,
    find_brats_files,
    find_fastmri_files,
    find_ixi_files,
)

# HDF5 files start with this signature at offset 0 or, with a user block, at 512, 1024, 2048, ...
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_OFFSETS = (0, 512, 1024, 2048, 4096)
# NIfTI-1/2 single files: the magic at byte 344 (NIfTI-1) or 4 (NIfTI-2), after gunzip for .nii.gz.
_NIFTI_MAGICS = ((344, (b"n+1\x00", b"ni1\x00")), (4, (b"n+2\x00",)))

#: A reader class and the keyword arguments it takes beyond the common ones.
ReaderChoice = tuple[type[SliceReader], dict[str, Any]]
#: ``fedsense data demo``'s writer of one site's synthetic files: (folder to fill, the site, in-plane size,
#: subjects, seeded generator) -> (the file names written, relative to the folder; the subject ids).
DemoWriter = Callable[[Path, SiteConfig, int, int, np.random.Generator], tuple[list[str], list[str]]]


@dataclass(frozen=True)
class Partitioner:
    """How ``fedsense data partition`` splits a downloaded copy of a kind into simulated hospitals."""

    #: The kind's natural partition keys (``--by``; every :class:`~common.data.discovery.Volume` the
    #: discovery returns carries them in ``keys``). ``"institution"`` is special: its sites come from a
    #: FeTS partition CSV, not from the files.
    keys: tuple[str, ...]
    #: (dataset root, canonical contrasts wanted or empty for all) -> usable volumes, skipped files: headers only.
    discover: Callable[[Path, Sequence[str]], Discovered]
    #: Example file names, for the message when a root holds none ("IXI002-Guys-0828-T1.nii.gz").
    examples: str
    #: This kind's data files under a folder, counted to tell a user that ``--dataset`` names the wrong kind.
    count: Callable[[Path], int]
    #: What a Dirichlet split skews by default (a key, or "none": quantity skew). "institution" falls back
    #: to "none" without a partition CSV.
    default_label: str = "none"


def deferred_demo(module: str, function: str) -> DemoWriter:
    """The demo writer ``module.function``, imported when a demo is written (demo writers import the phantom
    and PyTorch, which validating a site config does not need); looked up on each call, so a test may
    replace it."""

    def write(
        site_dir: Path, site: SiteConfig, size: int, count: int, rng: np.random.Generator
    ) -> tuple[list[str], list[str]]:
        writer: DemoWriter = getattr(importlib.import_module(module), function)
        return writer(site_dir, site, size, count, rng)

    return write


def has_hdf5_signature(path: Path) -> bool:
    """Whether ``path`` starts (possibly after a user block) with HDF5's signature."""
    with open(path, "rb") as fh:
        for offset in _HDF5_OFFSETS:
            fh.seek(offset)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
    return False


def has_nifti_magic(path: Path) -> bool:
    """Whether ``path`` (gunzipped for ``.gz``) carries the NIfTI-1 or NIfTI-2 magic."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(352)
    return any(head[offset : offset + len(magic)] == magic for offset, magics in _NIFTI_MAGICS for magic in magics)


@dataclass(frozen=True)
class DatasetKind:
    """Everything FedSense does differently for one kind of site data."""

    name: str
    description: str
    #: The files in words, for messages ("fastMRI HDF5 (*.h5)").
    files: str
    #: The data files under a site's folder, filtered by the site's contrasts (and hospital).
    find: Callable[[SiteConfig], list[SourceFile]]
    #: Cheap check of one file's first bytes (no volume opened): is it this kind's format?
    is_file: Callable[[Path], bool]
    #: The reader class for a site and its extra arguments (``min_foreground`` for magnitude volumes).
    reader: Callable[[SiteConfig, float], ReaderChoice]
    #: Raw multi-coil k-space used at its stored size (True), or magnitude volumes the site's scanner
    #: settings re-acquire at ``scanner.matrix`` (False).
    raw_kspace: bool
    #: The canonical contrast names of a site's ``contrasts``; a ValueError names the allowed ones.
    contrasts: Callable[[list[str]], list[str]]
    #: The values ``hospital`` may take (empty: this kind is not split by hospital).
    hospitals: tuple[str, ...] = ()
    #: How ``fedsense data partition`` indexes and splits a downloaded copy (None: it cannot).
    partition: Partitioner | None = None
    #: How ``fedsense data demo`` writes synthetic files of this kind (None: it cannot).
    demo: DemoWriter | None = None


KINDS: dict[str, DatasetKind] = {}


def register(kind: DatasetKind) -> DatasetKind:
    """Add ``kind`` (its name must be new); returns it."""
    if kind.name in KINDS:
        raise ValueError(f"dataset kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def dataset_kind(name: str) -> DatasetKind:
    """The registered kind ``name``; a ValueError listing the known kinds otherwise (the config's
    validation turns it into ``path: dataset: ...``)."""
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown dataset kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return kind


def fixed_contrasts(
    dataset: str, allowed: tuple[str, ...], canonical: Callable[[str], str]
) -> Callable[[list[str]], list[str]]:
    """A :attr:`DatasetKind.contrasts` for a kind with a closed set of contrast names: each name made
    ``canonical`` (aliases, case), unknown ones refused, duplicates dropped."""

    def check(values: list[str]) -> list[str]:
        names = [canonical(c) for c in values]
        unknown = [c for c in names if c not in allowed]
        if unknown:
            raise ValueError(f"unknown {dataset} contrast(s) {unknown}; use {', '.join(allowed)}")
        return list(dict.fromkeys(names))

    return check


def _fastmri_reader(config: SiteConfig, _min_foreground: float) -> ReaderChoice:
    extra = {"contrasts": config.contrasts, "check_seconds": config.file_check_seconds}
    if config.scanner.trajectory != "cartesian":  # raw radial / spiral k-space files
        from common.data.noncartesian_h5 import NonCartesianReader  # it builds on the readers module

        return NonCartesianReader, extra
    return FastMRIReader, extra


register(
    DatasetKind(
        name="fastmri",
        description="fastMRI multi-coil raw k-space, HDF5",
        files="fastMRI HDF5 (*.h5)",
        find=lambda config: find_fastmri_files(config.data_path),
        is_file=has_hdf5_signature,
        reader=_fastmri_reader,
        raw_kspace=True,
        # Acquisition names (AXT2, CORPD_FBK, ...) are open-ended; compared case-insensitively.
        contrasts=lambda values: [c.upper() for c in values],
        partition=Partitioner(
            keys=("scanner", "field-strength", "contrast"),
            discover=discover_fastmri,
            examples="*.h5 files with a 'kspace' dataset and an ismrmrd_header",
            count=lambda root: len(find_fastmri_files(root)),
            default_label="contrast",
        ),
        demo=deferred_demo("common.data.demo", "write_fastmri"),
    )
)
register(
    DatasetKind(
        name="brats",
        description="BraTS magnitude volumes, NIfTI",
        files="BraTS NIfTI",
        find=lambda config: find_brats_files(config.data_path, config.contrasts),
        is_file=has_nifti_magic,
        reader=lambda _config, min_foreground: (BratsReader, {"min_foreground": min_foreground}),
        raw_kspace=False,
        contrasts=fixed_contrasts("brats", BRATS_CONTRASTS, lambda c: BRATS_ALIASES.get(c.lower(), c.lower())),
        partition=Partitioner(
            keys=("institution",),
            discover=discover_brats,
            examples="BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz, BraTS-GLI-00000-000-t2f.nii.gz "
            "or FeTS2022_00000_t1.nii.gz",
            count=lambda root: len(find_brats_files(root)),
            default_label="institution",
        ),
        demo=deferred_demo("common.data.demo", "write_brats"),
    )
)
register(
    DatasetKind(
        name="ixi",
        description="IXI magnitude volumes, NIfTI",
        files="IXI NIfTI",
        find=lambda config: find_ixi_files(config.data_path, config.contrasts, config.hospital),
        is_file=has_nifti_magic,
        reader=lambda _config, min_foreground: (IXIReader, {"min_foreground": min_foreground}),
        raw_kspace=False,
        contrasts=fixed_contrasts("ixi", IXI_CONTRASTS, str.upper),
        hospitals=IXI_HOSPITALS,
        partition=Partitioner(
            keys=("hospital",),
            discover=discover_ixi,
            examples="IXI002-Guys-0828-T1.nii.gz",
            count=lambda root: len(find_ixi_files(root)),
            default_label="hospital",
        ),
        demo=deferred_demo("common.data.demo", "write_ixi"),
    )
)
