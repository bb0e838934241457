"""Simulated hospitals from the public datasets: natural or seeded partitions, linked site folders, site TOMLs.

The FL-MRI literature builds its sites from the datasets' real acquisition structure: IXI by hospital,
BraTS/FeTS by contributing institution (the FeTS partition CSV), fastMRI by scanner, field strength or
contrast (from each file's ISMRMRD header); a Dirichlet split over subjects gives controlled non-IID
sites on any dataset. Every split is by subject, so one patient's scans never straddle two sites (for the
header keys of fastMRI, which are per file, a patient scanned on two systems is reported, not hidden).

Site folders hold hard links (or symlinks) to the original files: patient data is never duplicated unless
``copy`` is asked for. Output is built in a hidden folder beside ``out`` and renamed into place, so a
failed run leaves nothing half-written. The marker file lists every file a partition wrote (with the
SHA-256 of the TOMLs and summary); a later partition into the same ``out`` needs ``overwrite``, removes only
those files, refuses when one was edited since, and leaves anything else there alone. A non-empty folder
without the marker is never written into. Pure data code: no Flower.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import h5py
import nibabel as nib
import numpy as np

from common.atomic import atomic_write_bytes, os_error_at
from common.config import ScannerConfig, SiteConfig, format_validation_error, parse_site_config
from common.data import nifti
from common.data.readers import (
    _H5_ERRORS,
    _NIFTI_ERRORS,
    _attr_str,
    find_brats_files,
    find_fastmri_files,
    find_ixi_files,
    parse_ixi_name,
)
from common.data.scanner_header import HeaderError, nominal_field, parse_scanner_header
from common.errors import ConfigError, DataError, OutputError
from common.outputs import check_not_input

log = logging.getLogger(__name__)

Dataset = Literal["fastmri", "brats", "ixi"]
LinkMode = Literal["auto", "hard", "symlink", "copy"]
NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "ixi": ("hospital",),
    "brats": ("institution",),
    "fastmri": ("scanner", "field-strength", "contrast"),
}
SEEDED_KEYS = ("random", "dirichlet")
MARKER = ".fedsense-partition"
SUMMARY_NAME = "partition.json"
# common.data.splits gives train, val and test a subject each only from three subjects on.
MIN_SUBJECTS_TO_EVALUATE = 3

# IXI's acquisition sites as the IXI project documents them (brain-development.org/ixi-dataset):
# Hammersmith (HH) Philips 3 T, Guy's (Guys) Philips 1.5 T, Institute of Psychiatry (IOP) GE 1.5 T.
IXI_FIELD_STRENGTH_T = {"HH": 3.0, "Guys": 1.5, "IOP": 1.5}

# Scanner settings for data without a header (BraTS, IXI): coils, noise and the study's sampling.
# fastMRI sites take field strength, coils and matrix from their files and the sampling from here.
PROFILES: dict[str, ScannerConfig] = {
    "3t-16ch": ScannerConfig(
        field_strength_t=3.0,
        coils=16,
        matrix=(128, 128),
        noise_std=0.01,
        mask="equispaced",
        acceleration=4,
        center_fraction=0.08,
    ),
    "1.5t-8ch": ScannerConfig(
        field_strength_t=1.5,
        coils=8,
        matrix=(128, 128),
        noise_std=0.02,
        mask="random",
        acceleration=4,
        center_fraction=0.08,
    ),
    "3t-4ch": ScannerConfig(
        field_strength_t=3.0,
        coils=4,
        matrix=(128, 128),
        noise_std=0.01,
        mask="poisson",
        acceleration=4,
        center_fraction=0.08,
    ),
}
DEFAULT_PROFILE = "3t-16ch"


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


@dataclass
class Inventory:
    """Every usable file of a dataset root, and the files left out with the reason."""

    dataset: str
    root: Path
    volumes: list[Volume]
    skipped: list[tuple[str, str]]


@dataclass(frozen=True)
class PartitionSpec:
    """What ``fedsense data partition`` was asked to do (validated by :func:`partition_dataset`)."""

    dataset: Dataset
    root: Path
    by: str
    out: Path
    sites: int | None = None
    alpha: float | None = None
    label: str | None = None
    partition_csv: Path | None = None
    max_subjects: int | None = None
    contrasts: tuple[str, ...] = ()
    seed: int = 0
    profile: str = DEFAULT_PROFILE
    link: LinkMode = "auto"
    max_slices_per_volume: int | None = None
    overwrite: bool = False


# --------------------------------------------------------------------------- discovery


def discover(dataset: str, root: Path, contrasts: Sequence[str] = ()) -> Inventory:
    """Index ``root`` as a ``dataset`` tree (headers only, no pixel data); DataError if it holds none."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist or is not a folder")
    if dataset not in NATURAL_KEYS:
        raise ConfigError(f"partition: --dataset: must be one of {', '.join(NATURAL_KEYS)}, got {dataset!r}")
    wanted = _canonical_contrasts(dataset, contrasts)
    if dataset == "fastmri":
        volumes, skipped = _discover_fastmri(root, wanted)
    else:
        volumes, skipped = _discover_nifti(dataset, root, wanted)
    if not volumes:
        raise DataError(_layout_message(dataset, root, wanted, skipped))
    log.info(
        "%s: %d %s file(s) of %d subject(s); %d skipped",
        root,
        len(volumes),
        dataset,
        len({v.subject for v in volumes}),
        len(skipped),
    )
    return Inventory(dataset, root, volumes, skipped)


def _canonical_contrasts(dataset: str, contrasts: Sequence[str]) -> tuple[str, ...]:
    """The contrast filter in each dataset's own spelling, validated as a site config would validate it."""
    if not contrasts:
        return ()
    probe = {
        "name": "probe",
        "dataset": dataset,
        "data_path": ".",
        "contrasts": list(contrasts),
        "scanner": PROFILES[DEFAULT_PROFILE].model_dump(),
    }
    return tuple(parse_site_config(probe, "partition: --contrasts").contrasts)


def _layout_message(dataset: str, root: Path, wanted: Sequence[str], skipped: list[tuple[str, str]]) -> str:
    """Why nothing was found, and what the folder looks like instead (a wrong --dataset or --root)."""
    examples = {
        "fastmri": "*.h5 files with a 'kspace' dataset and an ismrmrd_header",
        "brats": "BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz, BraTS-GLI-00000-000-t2f.nii.gz "
        "or FeTS2022_00000_t1.nii.gz",
        "ixi": "IXI002-Guys-0828-T1.nii.gz",
    }
    found = {
        "fastmri": len(find_fastmri_files(root)),
        "brats": len(find_brats_files(root)),
        "ixi": len(find_ixi_files(root)),
    }
    message = f"{root}: no {dataset} files found (expected names like {examples[dataset]})"
    if wanted:
        message += f" with contrasts {list(wanted)}"
    if skipped:
        message += f"; {len(skipped)} unreadable, first: {skipped[0][0]}: {skipped[0][1]}"
    others = [f"{n} {kind}" for kind, n in found.items() if kind != dataset and n]
    if others:
        message += f"; the folder holds {', '.join(others)} file(s): is --dataset right?"
    return message


def _discover_fastmri(root: Path, wanted: Sequence[str]) -> tuple[list[Volume], list[tuple[str, str]]]:
    volumes, skipped = [], []
    for source in find_fastmri_files(root):
        rel = source.path.relative_to(root).as_posix()
        try:
            volume = _fastmri_volume(source.path, rel)
        except (DataError, HeaderError) as exc:
            log.warning("%s: skipped: %s", source.path, exc)
            skipped.append((rel, str(exc)))
            continue
        if not wanted or volume.contrast in wanted:
            volumes.append(volume)
    return volumes, skipped


def _fastmri_volume(path: Path, rel: str) -> Volume:
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
            acquisition = _attr_str(f.attrs.get("acquisition"), default="").upper()
            subject = _attr_str(f.attrs.get("patient_id"), default=path.stem)
    except (DataError, HeaderError):
        raise
    except _H5_ERRORS as exc:
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


def _discover_nifti(dataset: str, root: Path, wanted: Sequence[str]) -> tuple[list[Volume], list[tuple[str, str]]]:
    sources = find_brats_files(root, wanted) if dataset == "brats" else find_ixi_files(root, wanted)
    volumes, skipped = [], []
    for source in sources:
        rel = source.path.relative_to(root).as_posix()
        try:
            slices = _nifti_axial_slices(source.path)
        except DataError as exc:
            log.warning("%s: skipped: %s", source.path, exc)
            skipped.append((rel, str(exc)))
            continue
        keys: dict[str, str] = {}
        field_t = None
        if dataset == "ixi":
            parsed = parse_ixi_name(source.path.name)
            assert parsed is not None  # find_ixi_files only returns files with IXI names
            hospital = parsed[1]
            keys["hospital"] = hospital
            field_t = IXI_FIELD_STRENGTH_T[hospital]
        volumes.append(
            Volume(source.path, rel, source.subject or rel, source.contrast or "unknown", slices, keys, field_t)
        )
    return volumes, skipped


def _nifti_axial_slices(path: Path) -> int:
    """Axial slice count from the header alone (the reader's full scan is ``data check``'s job)."""
    try:
        img = cast(nib.spatialimages.SpatialImage, nib.load(path))
        codes = nifti.aff2axcodes(img.affine)
    except _NIFTI_ERRORS as exc:
        raise DataError(f"{path}: unreadable NIfTI header ({exc})") from exc
    if len(img.shape) not in (3, 4) or None in codes:
        raise DataError(f"{path}: not a 3-D volume with an orientation (shape {img.shape}, axes {codes})")
    return int(img.shape[next(i for i, c in enumerate(codes) if c in ("S", "I"))])


# --------------------------------------------------------------------------- assignment


def read_partition_csv(path: Path) -> dict[str, str]:
    """FeTS partition CSV (``Subject_ID,Partition_ID``; header names case-insensitive) -> subject: partition."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: <file>: cannot read: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    missing = [c for c in ("subject_id", "partition_id") if c not in columns]
    if missing:
        raise ConfigError(
            f"{path}: header: missing column(s) {missing}; a FeTS partition CSV has "
            f"Subject_ID,Partition_ID (found {reader.fieldnames})"
        )
    mapping: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        subject = (row[columns["subject_id"]] or "").strip()
        partition = (row[columns["partition_id"]] or "").strip()
        if not subject or not partition:
            raise ConfigError(f"{path}: line {line}: empty Subject_ID or Partition_ID")
        if mapping.get(subject, partition) != partition:
            raise ConfigError(f"{path}: line {line}: subject {subject} is already in partition {mapping[subject]}")
        mapping[subject] = partition
    if not mapping:
        raise ConfigError(f"{path}: <file>: no subjects listed")
    return mapping


def random_assignment(subjects: Iterable[str], sites: int, seed: int) -> dict[str, int]:
    """Seeded, near-equal split of subjects over ``sites`` (subject-level; independent of input order)."""
    ordered = sorted(set(subjects))
    if sites < 1 or sites > len(ordered):
        raise ConfigError(
            f"partition: --sites: must lie in [1, {len(ordered)}] (one subject per site at least), got {sites}"
        )
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[k]: i for i, part in enumerate(np.array_split(order, sites)) for k in part}


def dirichlet_assignment(
    labels: Mapping[str, str], sites: int, alpha: float, seed: int, min_subjects: int = 1, max_draws: int = 1000
) -> dict[str, int]:
    """Non-IID subject split: per label, site shares drawn from Dirichlet(alpha), subjects cut accordingly.

    ``labels`` maps subject -> class (contrast, hospital, ...); with one class this is quantity skew. Small
    alpha concentrates each class on few sites, large alpha approaches an even split. Draws repeat (from
    the same seeded generator, so still reproducible) until every site has ``min_subjects``.
    """
    if not alpha > 0 or alpha == float("inf"):
        raise ConfigError(f"partition: --alpha: must be a positive number, got {alpha}")
    if sites < 1 or sites * min_subjects > len(labels):
        raise ConfigError(
            f"partition: --sites: {sites} sites need at least {sites * min_subjects} subjects, "
            f"the dataset has {len(labels)}"
        )
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels.values()))
    members = {c: sorted(s for s, label in labels.items() if label == c) for c in classes}
    for _ in range(max_draws):
        assignment: dict[str, int] = {}
        for c in classes:
            shuffled = [members[c][k] for k in rng.permutation(len(members[c]))]
            shares = rng.dirichlet(np.full(sites, float(alpha)))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
            for site, part in enumerate(np.split(np.array(shuffled, dtype=object), cuts)):
                assignment.update({str(s): site for s in part})
        sizes = Counter(assignment.values())
        if all(sizes.get(site, 0) >= min_subjects for site in range(sites)):
            return assignment
    raise DataError(
        f"partition: dirichlet: after {max_draws} draws some of the {sites} sites stay empty with "
        f"alpha={alpha:g} over {len(labels)} subjects; raise --alpha or lower --sites"
    )


def cap_subjects(subjects: Iterable[str], limit: int | None, seed: int) -> list[str]:
    """At most ``limit`` subjects, a seeded choice independent of listing order (low-data studies)."""
    ordered = sorted(set(subjects), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    return sorted(ordered if limit is None else ordered[:limit])


def slug(text: str) -> str:
    """A site-name-safe form of a partition key ("Siemens Prisma_fit" -> "siemens-prisma_fit")."""
    out = re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.")
    return out or "unknown"


def assign(inventory: Inventory, spec: PartitionSpec) -> dict[str, list[Volume]]:
    """Site name -> its volumes, by the requested key; raises for bad keys, CSVs and empty partitions."""
    dataset, by = inventory.dataset, spec.by
    allowed = (*NATURAL_KEYS[dataset], *SEEDED_KEYS)
    if by not in allowed:
        raise ConfigError(f"partition: --by: {dataset} can be partitioned by {', '.join(allowed)}, got {by!r}")
    subjects = sorted({v.subject for v in inventory.volumes})
    groups: dict[str, list[Volume]] = defaultdict(list)
    if by == "institution":
        if spec.partition_csv is None:
            raise ConfigError(
                "partition: --partition-csv: required with --by institution (FeTS format); "
                "without one use --by random --sites N"
            )
        site_of = _institutions(spec.partition_csv, subjects)
        for v in inventory.volumes:
            if v.subject in site_of:
                groups[f"{dataset}-inst-{slug(site_of[v.subject])}"].append(v)
    elif by in SEEDED_KEYS:
        if spec.sites is None:
            raise ConfigError(f"partition: --sites: required with --by {by}")
        if by == "random":
            index = random_assignment(subjects, spec.sites, spec.seed)
        else:
            if spec.alpha is None:
                raise ConfigError("partition: --alpha: required with --by dirichlet")
            index = dirichlet_assignment(_labels(inventory, spec), spec.sites, spec.alpha, spec.seed)
        width = len(str(spec.sites - 1))
        for v in inventory.volumes:
            groups[f"{dataset}-{by}-{index[v.subject]:0{width}d}"].append(v)
    else:
        for v in inventory.volumes:
            groups[f"{dataset}-{slug(v.keys[by])}"].append(v)
    if spec.max_subjects is not None:
        for name, volumes in groups.items():
            keep = set(cap_subjects((v.subject for v in volumes), spec.max_subjects, spec.seed))
            groups[name] = [v for v in volumes if v.subject in keep]
    empty = [name for name, volumes in groups.items() if not volumes]
    if not groups or empty:
        raise DataError(f"{inventory.root}: partition by {by} left empty site(s) {empty or '(all)'}")
    return {name: groups[name] for name in sorted(groups)}


def _institutions(csv_path: Path, subjects: Sequence[str]) -> dict[str, str]:
    """The CSV's subject -> partition, refusing a CSV that names subjects the dataset does not hold."""
    mapping = read_partition_csv(csv_path)
    present = set(subjects)
    absent = sorted(s for s in mapping if s not in present)
    if absent:
        raise DataError(
            f"{csv_path}: {len(absent)} of {len(mapping)} subjects in the CSV are not in the dataset "
            f"(first: {', '.join(absent[:5])}); is --root the right folder?"
        )
    unlisted = [s for s in subjects if s not in mapping]
    if unlisted:
        log.warning(
            "%s: %d subject(s) on disk are in no partition and are left out (first: %s)",
            csv_path,
            len(unlisted),
            ", ".join(unlisted[:5]),
        )
    return mapping


def _labels(inventory: Inventory, spec: PartitionSpec) -> dict[str, str]:
    """Subject -> Dirichlet class: a natural key (default: contrast for fastMRI, hospital for IXI,
    institution for BraTS with a CSV) or a single class (pure quantity skew)."""
    defaults = {"fastmri": "contrast", "ixi": "hospital", "brats": "institution" if spec.partition_csv else "none"}
    label = spec.label or defaults[inventory.dataset]
    allowed = (*NATURAL_KEYS[inventory.dataset], "none")
    if label not in allowed:
        raise ConfigError(
            f"partition: --label: must be one of {', '.join(allowed)} for {inventory.dataset}, got {label!r}"
        )
    subjects = sorted({v.subject for v in inventory.volumes})
    if label == "none":
        return {s: "all" for s in subjects}
    if label == "institution":
        if spec.partition_csv is None:
            raise ConfigError("partition: --partition-csv: required for --label institution")
        return _institutions(spec.partition_csv, subjects)
    first: dict[str, str] = {}
    for v in sorted(inventory.volumes, key=lambda v: v.rel):
        first.setdefault(v.subject, v.keys[label])
    return first


# --------------------------------------------------------------------------- output


def load_profile(name_or_path: str) -> ScannerConfig:
    """A built-in profile by name, or the ``[scanner]`` table of an existing site TOML."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.suffix == ".toml":
        raise ConfigError(f"partition: --profile: one of {', '.join(PROFILES)} or a site TOML, got {name_or_path!r}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: <file>: cannot read as TOML: {exc}") from exc
    if not isinstance(data.get("scanner"), dict):
        raise ConfigError(f"{path}: scanner: required table is missing")
    from pydantic import ValidationError

    try:
        return ScannerConfig.model_validate(data["scanner"])
    except ValidationError as exc:
        raise ConfigError(format_validation_error(f"{path}: scanner", exc)) from exc


def _mode(values: Iterable[Any]) -> Any:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def site_scanner(volumes: Sequence[Volume], profile: ScannerConfig) -> ScannerConfig:
    """The profile, with field strength, coils and matrix taken from the data where it records them
    (the most common value when a site mixes several; the summary lists them all)."""
    update: dict[str, Any] = {}
    field_t = _mode(v.field_strength_t for v in volumes)
    if field_t is not None:
        update["field_strength_t"] = field_t
    coils = _mode(v.coils for v in volumes)
    if coils is not None:
        update["coils"] = min(coils, 128)
    matrix = _mode(v.matrix for v in volumes)
    if matrix is not None:
        update["matrix"] = tuple(min(max(n, 16), 1024) for n in matrix)
    return ScannerConfig.model_validate({**profile.model_dump(), **update})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON strings are valid TOML basic strings


def site_toml(config: dict[str, Any], comment: str) -> str:
    """TOML text of a site config mapping (top-level keys first, then one table per section)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items() if k not in tables and v is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _link(src: Path, dst: Path, mode: LinkMode) -> str:
    """Place ``src`` at ``dst`` without duplicating it (unless ``copy``); returns the method used."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        shutil.copy2(src, dst)
        return "copy"
    if mode in ("auto", "hard"):
        try:
            os.link(src, dst)
            return "hard"
        except OSError as exc:
            if mode == "hard":
                raise DataError(f"{src}: cannot hard-link into {dst.parent} ({exc}); use --link symlink") from exc
    os.symlink(src, dst)
    return "symlink"


@dataclass
class PartitionResult:
    """Where the sites went and the summary (also written to ``out/partition.json``)."""

    out: Path
    site_tomls: list[Path]
    summary: dict[str, Any]


def partition_dataset(spec: PartitionSpec, progress: Callable[[str], None] | None = None) -> PartitionResult:
    """Index, assign, link and write one validated site TOML per partition plus ``partition.json``."""
    root, out = Path(spec.root).resolve(), Path(spec.out).resolve()
    inputs = [
        root,
        *([Path(spec.partition_csv)] if spec.partition_csv else []),
        *([Path(spec.profile)] if spec.profile.endswith(".toml") else []),
    ]
    check_not_input(out, inputs)
    for name, value in (("--max-subjects", spec.max_subjects), ("--max-slices", spec.max_slices_per_volume)):
        if value is not None and value < 1:
            raise ConfigError(f"partition: {name}: must be >= 1, got {value}")
    if spec.link not in ("auto", "hard", "symlink", "copy"):
        raise ConfigError(f"partition: --link: must be auto, hard, symlink or copy, got {spec.link!r}")
    profile = load_profile(spec.profile)
    inventory = discover(spec.dataset, root, spec.contrasts)
    groups = assign(inventory, spec)
    earlier = _earlier_partition(out, spec.overwrite)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        sites, tomls, methods = [], [], Counter[str]()
        for index, (name, volumes) in enumerate(groups.items()):
            for v in volumes:
                methods[_link(v.path, staging / name / v.rel, spec.link)] += 1
            scanner = site_scanner(volumes, profile)
            config = _site_mapping(name, spec, volumes, scanner, index)
            text = site_toml(
                config,
                f"{name}: written by `fedsense data partition --dataset {spec.dataset} --by {spec.by}`\nfrom {root}",
            )
            parse_site_config(tomllib.loads(text), str(out / f"{name}.toml"), base_dir=out)
            (staging / f"{name}.toml").write_text(text, encoding="utf-8")
            sites.append(_site_summary(name, volumes, scanner))
            tomls.append(out / f"{name}.toml")
            if progress is not None:
                progress(f"{name}: {sites[-1]['subjects']} subjects, {sites[-1]['files']} files")
        summary = {
            "dataset": spec.dataset,
            "root": str(root),
            "by": spec.by,
            "seed": spec.seed,
            "alpha": spec.alpha,
            "label": spec.label,
            "sites_requested": spec.sites,
            "partition_csv": str(spec.partition_csv) if spec.partition_csv else None,
            "max_subjects": spec.max_subjects,
            "profile": spec.profile,
            "links": dict(methods),
            "sites": sites,
            "shared_subjects": _shared_subjects(groups),
            "unassigned_subjects": sorted(
                {v.subject for v in inventory.volumes} - {v.subject for vs in groups.values() for v in vs}
            ),
            "skipped": [{"file": rel, "reason": reason} for rel, reason in inventory.skipped],
            "warnings": [
                f"{site['name']}: {site['subjects']} subject(s); the subject-level train/val/test "
                f"split needs {MIN_SUBJECTS_TO_EVALUATE} for every split to get one"
                for site in sites
                if site["subjects"] < MIN_SUBJECTS_TO_EVALUATE
            ],
        }
        atomic_write_bytes(staging / SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode())
        _write_marker(staging)
        _install(staging, out, earlier)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        named = os_error_at(exc, staging, Path(spec.out))  # the --out the user gave, not the staging folder
        if named is not None:
            raise named from exc
        raise
    return PartitionResult(out, tomls, summary)


def _site_mapping(
    name: str, spec: PartitionSpec, volumes: Sequence[Volume], scanner: ScannerConfig, index: int
) -> dict[str, Any]:
    contrasts = sorted({v.contrast for v in volumes})
    hospitals = {v.keys.get("hospital") for v in volumes}
    return {
        "name": name,
        "dataset": spec.dataset,
        "data_path": name,  # relative: resolved against the TOML's folder, so `out` can move
        "contrasts": contrasts,
        "hospital": hospitals.pop() if spec.dataset == "ixi" and len(hospitals) == 1 else None,
        "seed": spec.seed + index,
        "max_slices_per_volume": spec.max_slices_per_volume,
        "split": SiteConfig.model_fields["split"].default.model_dump(),
        "scanner": scanner.model_dump(),
    }


def _site_summary(name: str, volumes: Sequence[Volume], scanner: ScannerConfig) -> dict[str, Any]:
    return {
        "name": name,
        "subjects": len({v.subject for v in volumes}),
        "files": len(volumes),
        "slices": sum(v.slices for v in volumes),
        "contrasts": dict(sorted(Counter(v.contrast for v in volumes).items())),
        "field_strengths_t": sorted({v.field_strength_t for v in volumes if v.field_strength_t is not None}),
        "coils": sorted({v.coils for v in volumes if v.coils is not None}),
        "matrices": [list(m) for m in sorted({v.matrix for v in volumes if v.matrix is not None})],
        "scanner": scanner.model_dump(),
    }


def _shared_subjects(groups: Mapping[str, Sequence[Volume]]) -> dict[str, list[str]]:
    """Subjects whose files landed in more than one site (possible only with per-file header keys)."""
    sites_of: dict[str, set[str]] = defaultdict(set)
    for name, volumes in groups.items():
        for v in volumes:
            sites_of[v.subject].add(name)
    return {s: sorted(names) for s, names in sorted(sites_of.items()) if len(names) > 1}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _written_files(folder: Path) -> dict[str, str]:
    """Every file of a partition folder but the marker: relative path -> SHA-256 (TOMLs, summary) or "link"."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.name == MARKER or (path.is_dir() and not path.is_symlink()):
            continue
        rel = path.relative_to(folder).as_posix()
        files[rel] = _sha256(path) if path.parent == folder else "link"
    return files


def _write_marker(staging: Path) -> None:
    marker = {
        "written_by": "fedsense data partition; the files below are links or generated, safe to delete",
        "files": _written_files(staging),
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _earlier_partition(out: Path, overwrite: bool) -> dict[str, str]:
    """The files an earlier partition wrote in ``out`` (empty if none), checked replaceable; else refused."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out: {out} is an existing file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return {}
    marker = out / MARKER
    if not marker.exists():
        raise DataError(f"{out}: exists and was not written by fedsense data partition; not overwriting")
    if not overwrite:
        raise OutputError(f"--out: {out} holds an earlier partition; pass --overwrite to replace the files it wrote")
    try:
        files = dict(json.loads(marker.read_text(encoding="utf-8"))["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{marker}: does not list the files an earlier partition wrote (an older FedSense?); "
            f"not knowing which files are its own, nothing is replaced: remove {out} yourself"
        ) from exc
    for rel, digest in files.items():
        path = out / rel
        if digest != "link" and path.is_file() and _sha256(path) != digest:
            raise OutputError(
                f"{path}: edited since fedsense data partition wrote it; move it away (or use "
                "another --out) to replace the partition"
            )
    return files


def _install(staging: Path, out: Path, earlier: dict[str, str]) -> None:
    """Move the finished staging folder into ``out``: whole when ``out`` is new, else file by file, removing
    only the files of the earlier partition and never a file someone else put there."""
    if not out.exists() or (not earlier and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
        return
    new = _written_files(staging)
    in_the_way = [out / rel for rel in new if rel not in earlier and (out / rel).exists()]
    if in_the_way:
        raise OutputError(f"{in_the_way[0]}: not written by fedsense data partition and in the way; move it away")
    for rel in earlier:
        (out / rel).unlink(missing_ok=True)
    for rel in sorted({str(Path(rel).parent) for rel in earlier} - {"."}, key=len, reverse=True):
        for folder in (out / rel, *(out / rel).parents):
            if folder == out or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
    for rel in [*new, MARKER]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    shutil.rmtree(staging)
