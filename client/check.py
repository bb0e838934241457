"""``fedsense data check SITE.toml``: what a hospital runs before it joins a federation.

It indexes the site's data with the same readers training uses, reads every slice once, and reports
counts per split and contrast, matrix sizes, coil counts, the files it had to skip and why, and the
effective acceleration of the site's mask on each k-space matrix it will meet. The verdict is READY or
NOT READY with the reasons; the exit code is 1 when the site cannot train. It also writes the site's
dataset manifest (:mod:`common.data.manifest`) and says what changed since the last check.

Site side: it lives in ``client/`` and imports ``common`` only; the coordinator's ``fedsense`` CLI
reaches it by module name (``client.check``), as it reaches the ClientApp.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from rich.markup import escape
from rich.table import Table

from common.command import OutputConsole
from common.config import SiteConfig, load_site_config
from common.data.dataset import SiteDataset
from common.data.kinds import dataset_kind
from common.data.manifest import (
    DatasetManifest,
    ManifestFile,
    SkippedFile,
    build_manifest,
    compare_manifests,
    file_sha256,
    load_manifest,
    manifest_path_for,
    write_manifest,
)
from common.data.readers import Example, SliceReader, open_reader
from common.data.splits import SPLITS, split_subjects
from common.errors import ConfigError, DataError, FedSenseError
from common.masks import ACCELERATION_TOLERANCE, make_mask
from common.trajectories import trajectory_spec

log = logging.getLogger(__name__)

MaskKey = tuple[tuple[int, int], tuple[int, int] | None]


@dataclass(frozen=True)
class MaskCheck:
    """The site's mask on one k-space matrix: requested vs effective R over the acquired k-space."""

    matrix: tuple[int, int]
    acquired_columns: tuple[int, int] | None
    requested: float
    effective: float | None  # None when no mask can be built on this matrix
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.effective is not None and abs(self.effective - self.requested) <= (
            ACCELERATION_TOLERANCE * self.requested
        )


@dataclass
class CheckReport:
    """Everything ``data check`` found; ``problems`` make the site unable to train."""

    site: str
    dataset: str
    data_path: Path
    slices: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))  # split -> contrast
    subjects: dict[str, int] = field(default_factory=dict)
    stored_matrices: Counter[tuple[int, int]] = field(default_factory=Counter)
    kspace_matrices: Counter[tuple[int, int]] = field(default_factory=Counter)
    coils: Counter[int] = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    masks: list[MaskCheck] = field(default_factory=list)
    trajectory: str | None = None  # a radial / spiral site's protocol, in words
    samples_per_coil: Counter[int] = field(default_factory=Counter)  # of stored non-Cartesian slices
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: DatasetManifest | None = None
    manifest_path: Path | None = None
    changes: list[str] | None = None  # vs the previous manifest; None when there was none

    @property
    def ready(self) -> bool:
        return not self.problems


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _reason(message: str, path: Path) -> str:
    """A DataError message without its leading absolute path (the manifest names files relatively)."""
    return message.removeprefix(f"{path}: ")


def check_site(site_toml: Path, manifest_path: Path | None = None, write_manifest_file: bool = True) -> CheckReport:
    """Check one site; writes its manifest (to ``manifest_path`` or beside the TOML) unless indexing failed or
    ``write_manifest_file`` is off (the readiness test ``fedsense simulate`` runs leaves the site's files alone)."""
    site_toml = Path(site_toml)
    config = load_site_config(site_toml)
    report = CheckReport(config.name, config.dataset, config.data_path)
    try:
        # Skipping is forced on here so that every bad file is listed, not just the first one.
        reader = open_reader(config.model_copy(update={"skip_bad_files": True}))
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    root = config.data_path
    report.skipped = [(_relative(p, root), _reason(r, p)) for p, r in reader.skipped]
    split_of = _split_of(reader, config)
    good, geometries = _read_every_slice(reader, config, report, split_of)
    _judge(config, report, split_of)
    _check_masks(config, report, geometries)
    if report.ready:
        _sample_each_split(reader, config, report)
    if not write_manifest_file:
        return report
    files = _manifest_files(reader, good, split_of, root)
    skipped = [SkippedFile(name=name, reason=reason) for name, reason in report.skipped]
    report.manifest = build_manifest(config.name, config.dataset, files, skipped)
    report.manifest_path = manifest_path or manifest_path_for(site_toml)
    if report.manifest_path.exists():
        try:
            report.changes = compare_manifests(load_manifest(report.manifest_path), report.manifest)
        except ConfigError as exc:
            report.warnings.append(f"previous manifest unreadable, replaced: {exc}")
    write_manifest(report.manifest_path, report.manifest)
    return report


def _split_of(reader: SliceReader, config: SiteConfig) -> dict[str, str]:
    parts = split_subjects(reader.subjects, config.split.seed, config.split.val_fraction, config.split.test_fraction)
    return {subject: split for split, subjects in parts.items() for subject in subjects}


def _read_every_slice(
    reader: SliceReader, config: SiteConfig, report: CheckReport, split_of: dict[str, str]
) -> tuple[dict[Path, int], set[MaskKey]]:
    """Read each indexed slice once; a file whose slice fails is skipped whole.

    Returns the good slices per file and the (k-space matrix, acquired columns) pairs the mask will meet.
    """
    good: dict[Path, int] = Counter()
    bad: set[Path] = set()
    geometries: set[MaskKey] = set()
    for index, example in enumerate(reader.examples):
        if example.path in bad:
            continue
        try:
            data, meta = reader.read_slice(index)
        except DataError as exc:
            bad.add(example.path)
            report.skipped.append((_relative(example.path, config.data_path), _reason(str(exc), example.path)))
            continue
        good[example.path] += 1
        report.slices[split_of[example.subject]][example.contrast] += 1
        if meta.kind == "noncartesian":  # samples (C, K) of a raw radial / spiral file: no mask to check
            report.stored_matrices[meta.recon_size] += 1
            report.kspace_matrices[meta.recon_size] += 1
            report.coils[int(data.shape[0])] += 1
            report.samples_per_coil[int(data.shape[-1])] += 1
            continue
        report.stored_matrices[(int(data.shape[-2]), int(data.shape[-1]))] += 1
        if meta.kind == "kspace":
            shape, coils = (int(data.shape[-2]), int(data.shape[-1])), int(data.shape[0])
        else:  # magnitude images are re-acquired on the site's simulated scanner
            shape, coils = (int(config.scanner.matrix[0]), int(config.scanner.matrix[1])), config.scanner.coils
        report.kspace_matrices[shape] += 1
        report.coils[coils] += 1
        geometries.add((shape, meta.acquired_columns))
    for path in bad:
        good.pop(path, None)
    return good, geometries


def _judge(config: SiteConfig, report: CheckReport, split_of: dict[str, str]) -> None:
    """Turn counts into problems (cannot train) and warnings (can, but look)."""
    for split in SPLITS:
        report.subjects[split] = sum(1 for s in split_of.values() if s == split)
    for split in ("train", "val"):
        if sum(report.slices[split].values()) == 0:
            role = "training" if split == "train" else "evaluation (the server scores every site on it)"
            report.problems.append(
                f"no readable {split} slices: {report.subjects[split]} subject(s) in the "
                f"{split} split; {role} needs some. Add subjects or change [split]."
            )
    if report.skipped and not config.skip_bad_files:
        report.problems.append(
            f"{len(report.skipped)} unreadable file(s) (listed above); training stops at the "
            "first one. Remove or repair them, or set skip_bad_files = true."
        )
    elif report.skipped:
        report.warnings.append(f"{len(report.skipped)} unreadable file(s) will be skipped (skip_bad_files = true)")
    if len(report.kspace_matrices) > 1:
        report.warnings.append(
            f"{len(report.kspace_matrices)} different k-space matrices: slices of different "
            "sizes cannot share a batch; use batch-size 1 or split the site"
        )
    if len(report.coils) > 1:
        report.warnings.append(f"coil counts differ ({sorted(report.coils)}): use batch-size 1")
    if dataset_kind(config.dataset).raw_kspace:
        stored = set(report.kspace_matrices)
        if stored and tuple(config.scanner.matrix) not in stored:
            report.warnings.append(
                f"scanner.matrix is {list(config.scanner.matrix)} but the k-space is "
                f"{sorted(stored)}; fastMRI k-space is used at its stored size"
            )
        if report.coils and config.scanner.coils not in report.coils:
            report.warnings.append(
                f"scanner.coils is {config.scanner.coils} but the files hold {sorted(report.coils)} coils"
            )


def _check_masks(config: SiteConfig, report: CheckReport, geometries: set[MaskKey]) -> None:
    """The site's mask on every (matrix, acquired range) it will train on, as SiteDataset builds it."""
    scanner = config.scanner
    if scanner.trajectory != "cartesian":
        _check_trajectory(config, report)
        return
    report.masks = [
        effective_acceleration(config, shape, acquired)
        for shape, acquired in sorted(geometries, key=lambda g: (g[0], g[1] or (-1, -1)))
    ]
    for check in report.masks:
        if not check.ok:
            detail = check.error or (
                f"effective R = {check.effective:.2f}, more than "
                f"{ACCELERATION_TOLERANCE:.0%} away from the requested {check.requested:g}"
            )
            report.problems.append(
                f"mask {scanner.mask} at R={scanner.acceleration:g} on {check.matrix[0]}x{check.matrix[1]}: {detail}"
            )


def _check_trajectory(config: SiteConfig, report: CheckReport) -> None:
    """A radial / spiral site's protocol in words; raw files whose sample count differs are flagged."""
    spec = trajectory_spec(config.scanner)
    unit = "spokes" if spec.kind == "radial-ga" else "interleaves"
    report.trajectory = (
        f"{spec.kind}: {spec.count} {unit} x {spec.readout_samples} samples "
        f"({spec.oversampling:g}x readout oversampling), R = {spec.acceleration:.2f} "
        f"at {spec.matrix}x{spec.matrix}"
    )
    stored = set(report.samples_per_coil)
    if stored and stored != {spec.num_samples}:
        report.warnings.append(
            f"the files hold {sorted(stored)} samples per coil and slice, the site's protocol "
            f"{spec.num_samples}: the files' own trajectories are used"
        )


def effective_acceleration(config: SiteConfig, shape: tuple[int, int], acquired: tuple[int, int] | None) -> MaskCheck:
    """R the site's mask achieves on ``shape``, counting only the k-space the scanner acquired."""
    scanner = config.scanner
    assert scanner.mask is not None and scanner.center_fraction is not None  # a Cartesian scanner
    try:
        mask = make_mask(
            scanner.mask,
            shape,
            scanner.acceleration,
            scanner.center_fraction,
            config.seed,
            source=f"{config.name}: scanner",
        ).mask
    except ConfigError as exc:
        return MaskCheck(shape, acquired, scanner.acceleration, None, str(exc))
    if acquired is not None:
        mask = mask[:, acquired[0] : acquired[1]]
    sampled = int(np.count_nonzero(mask))
    effective = mask.size / sampled if sampled else None
    error = None if sampled else "the mask samples nothing inside the acquired k-space"
    return MaskCheck(shape, acquired, scanner.acceleration, effective, error)


def _sample_each_split(reader: SliceReader, config: SiteConfig, report: CheckReport) -> None:
    """Build one full training sample per split (mask, coil maps, target) exactly as training will."""
    for split in ("train", "val"):
        dataset = SiteDataset(config, split, reader=reader)
        try:
            dataset[0]
        except (DataError, ValueError, RuntimeError) as exc:
            report.problems.append(f"{split}: building a training sample failed: {exc}")


def _manifest_files(
    reader: SliceReader, good: dict[Path, int], split_of: dict[str, str], root: Path
) -> list[ManifestFile]:
    first: dict[Path, Example] = {}
    for example in reader.examples:
        first.setdefault(example.path, example)
    return [
        ManifestFile(
            name=_relative(path, root),
            size=path.stat().st_size,
            sha256=file_sha256(path),
            slices=count,
            contrast=first[path].contrast,
            split=split_of[first[path].subject],
        )
        for path, count in sorted(good.items())
    ]


# --------------------------------------------------------------------------- output


def print_report(report: CheckReport, out: TextIO | None = None) -> None:
    """The report as rich tables, verdict last."""
    console = OutputConsole(file=out or sys.stdout)
    if not console.is_terminal:  # a file or pipe: wide enough that site names and contrasts stay whole
        console = OutputConsole(file=console.file, width=120)
    console.print(f"[bold]{report.site}[/bold] ({report.dataset})  [dim]{escape(str(report.data_path))}[/dim]")
    contrasts = sorted({c for counts in report.slices.values() for c in counts})
    if contrasts:
        table = Table(title="slices per split and contrast")
        for column in ("split", "subjects", *contrasts, "total"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for split in SPLITS:
            counts = report.slices.get(split, Counter())
            table.add_row(
                split,
                str(report.subjects.get(split, 0)),
                *(str(counts[c]) for c in contrasts),
                str(sum(counts.values())),
            )
        console.print(table)
    sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(report.stored_matrices.items()))
    kspace = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(report.kspace_matrices.items()))
    coils = ", ".join(f"{c} ({n})" for c, n in sorted(report.coils.items()))
    console.print(f"stored slices: {sizes or '-'}\nk-space matrices: {kspace or '-'}\ncoils: {coils or '-'}")
    if report.trajectory is not None:
        console.print(f"trajectory {report.trajectory}")
    for check in report.masks:
        where = (
            f" acquired columns {check.acquired_columns[0]}-{check.acquired_columns[1]}"
            if check.acquired_columns
            else ""
        )
        got = f"{check.effective:.2f}" if check.effective is not None else "-"
        mark = "ok" if check.ok else "[red]WRONG[/red]"
        console.print(
            f"mask on {check.matrix[0]}x{check.matrix[1]}{where}: requested R={check.requested:g}, "
            f"effective R={got}  {mark}"
        )
    if report.skipped:
        table = Table(title=f"skipped files ({len(report.skipped)})")
        table.add_column("file")
        table.add_column("reason")
        for name, reason in report.skipped:
            table.add_row(escape(name), escape(reason))
        console.print(table)
    if report.manifest is not None:
        console.print(
            f"manifest: {report.manifest_path}  ({len(report.manifest.files)} files, "
            f"digest {report.manifest.digest[:16]}…)"
        )
    if report.changes is not None:
        console.print(
            "data unchanged since the last check"
            if not report.changes
            else "data changed since the last check:\n  " + escape("\n  ".join(report.changes))
        )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if report.ready:
        console.print("[bold green]READY[/bold green]: this site can train")
    else:
        console.print("[bold red]NOT READY[/bold red]: this site cannot train")
        for problem in report.problems:
            console.print(f"  - {escape(problem)}")


def run(site_config: Path, manifest: Path | None = None) -> int:
    """Check, print, and return 0 when the site can train, 1 when it cannot (``fedsense data check``)."""
    report = check_site(Path(site_config), manifest)
    print_report(report)
    return 0 if report.ready else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m client.check SITE.toml [--manifest PATH]``: the check without the coordinator's CLI."""
    parser = argparse.ArgumentParser(prog="python -m client.check", description=__doc__.splitlines()[0])
    parser.add_argument("site_config", type=Path, help="this site's TOML")
    parser.add_argument("--manifest", type=Path, help="where to write the manifest (default: SITE.manifest.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args.site_config, args.manifest)
    except FedSenseError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
