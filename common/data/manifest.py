"""Dataset manifest: exactly which files a site trained on, without a single pixel.

``fedsense data check`` writes one per site (``SITE.manifest.json`` beside the site TOML). It lists each
file the site's reader uses, by its path relative to the site's ``data_path`` (never an absolute path),
with size, SHA-256, usable slice count, contrast and split, plus the files left out and why. ``digest`` is
the SHA-256 of the canonical JSON of the file list, so a run's model card can cite one short string per
site, and a site can later show its data did not change by checking again and comparing digests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import atomic_write_bytes
from common.config import format_validation_error
from common.errors import ConfigError

MANIFEST_FORMAT: Final = "fedsense-dataset-manifest"
MANIFEST_VERSION: Final = 1
_CHUNK = 1 << 20


class ManifestFile(BaseModel):
    """One data file the site uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)  # POSIX path relative to the site's data_path
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    slices: int = Field(ge=0)
    contrast: str
    split: Literal["train", "val", "test"]


class SkippedFile(BaseModel):
    """A file the site holds but cannot use, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    reason: str


class DatasetManifest(BaseModel):
    """The manifest document (``format``/``version`` let later readers refuse what they do not know)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedsense-dataset-manifest"] = MANIFEST_FORMAT
    version: Literal[1] = MANIFEST_VERSION
    site: str
    dataset: str
    created: str  # ISO 8601, UTC
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: list[ManifestFile]
    skipped: list[SkippedFile] = Field(default_factory=list)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks (fastMRI volumes are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(files: Sequence[ManifestFile]) -> str:
    """SHA-256 of the sorted file list as canonical JSON: equal data gives an equal digest anywhere."""
    rows = sorted((f.model_dump() for f in files), key=lambda row: row["name"])
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(
    site: str, dataset: str, files: Sequence[ManifestFile], skipped: Sequence[SkippedFile] = ()
) -> DatasetManifest:
    """A manifest stamped now, files sorted by name, with its digest."""
    ordered = sorted(files, key=lambda f: f.name)
    return DatasetManifest(
        site=site,
        dataset=dataset,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        digest=files_digest(ordered),
        files=ordered,
        skipped=sorted(skipped, key=lambda s: s.name),
    )


def manifest_path_for(site_toml: Path) -> Path:
    """Where ``data check`` puts a site's manifest: beside its TOML (``site-a.toml`` -> ``site-a.manifest.json``)."""
    return site_toml.with_name(f"{site_toml.stem}.manifest.json")


def write_manifest(path: Path, manifest: DatasetManifest) -> None:
    """Write atomically (a reader sees the old manifest or the new one)."""
    atomic_write_bytes(path, (manifest.model_dump_json(indent=2) + "\n").encode())


def load_manifest(path: Path) -> DatasetManifest:
    """Read and validate a manifest; ConfigError naming the file and field otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: <file>: not a readable JSON manifest: {exc}") from exc
    try:
        manifest = DatasetManifest.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from exc
    if files_digest(manifest.files) != manifest.digest:
        raise ConfigError(f"{path}: digest: does not match the file list (edited by hand?)")
    return manifest


def compare_manifests(old: DatasetManifest, new: DatasetManifest) -> list[str]:
    """Human-readable differences in the data (added, removed, changed files); empty when identical."""
    before = {f.name: f for f in old.files}
    after = {f.name: f for f in new.files}
    changes = [f"added {name}" for name in sorted(after.keys() - before.keys())]
    changes += [f"removed {name}" for name in sorted(before.keys() - after.keys())]
    for name in sorted(before.keys() & after.keys()):
        a, b = before[name], after[name]
        if a.sha256 != b.sha256:
            changes.append(f"changed {name} (SHA-256 differs)")
        elif a != b:
            fields = [k for k in ("slices", "contrast", "split", "size") if getattr(a, k) != getattr(b, k)]
            changes.append(f"changed {name} ({', '.join(fields)})")
    return changes
