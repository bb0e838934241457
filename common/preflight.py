"""Checks of a federation's site configs and data folders that run before anything is started.

``fedsense simulate`` used to hand the site configs to Flower unchecked: a missing file or a misspelt key
surfaced ~30 s later inside a Ray traceback. These checks read every site config (the same validation
and the same ``path: field: reason`` messages as ``fedsense baseline``), then look at each data folder
without indexing it: it exists, and it holds at least one readable file of the site's dataset kind whose
first bytes are that format's signature. Cheap by design (no volume is opened), so well under 2 s.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from common.config import SiteConfig, load_site_config
from common.data.readers import find_brats_files, find_fastmri_files, find_ixi_files
from common.errors import ConfigError

# HDF5 files start with this signature at offset 0 or, with a user block, at 512, 1024, 2048, ...
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_OFFSETS = (0, 512, 1024, 2048, 4096)
# NIfTI-1/2 single files: the magic at byte 344 (NIfTI-1) or 4 (NIfTI-2), after gunzip for .nii.gz.
_NIFTI_MAGICS = ((344, (b"n+1\x00", b"ni1\x00")), (4, (b"n+2\x00",)))


def _has_hdf5_signature(path: Path) -> bool:
    with open(path, "rb") as fh:
        for offset in _HDF5_OFFSETS:
            fh.seek(offset)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
    return False


def _has_nifti_magic(path: Path) -> bool:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(352)
    return any(head[offset : offset + len(magic)] == magic
               for offset, magics in _NIFTI_MAGICS for magic in magics)


def _data_problem(config: SiteConfig) -> str | None:
    """Why ``config``'s data folder cannot be used, or None when it holds a usable file."""
    root = config.data_path
    if not root.is_dir():
        return f"{root}: directory does not exist" + (" (run `fedsense data demo` for demo data)" if not root.exists() else "")
    if not os.access(root, os.R_OK | os.X_OK):
        return f"{root}: directory is not readable by uid {os.getuid()}"
    if config.dataset == "fastmri":
        files, check, kind = find_fastmri_files(root), _has_hdf5_signature, "fastMRI HDF5 (*.h5)"
    elif config.dataset == "brats":
        files, check, kind = find_brats_files(root, config.contrasts), _has_nifti_magic, "BraTS NIfTI"
    else:
        files, check, kind = find_ixi_files(root, config.contrasts, config.hospital), _has_nifti_magic, "IXI NIfTI"
    if not files:
        return f"{root}: no {kind} files found"
    reasons = []
    for source in files:
        try:
            if check(source.path):
                return None
            reasons.append(f"{source.path.name}: not a {kind} file")
        except (OSError, EOFError, zlib.error) as exc:
            reasons.append(f"{source.path.name}: cannot read: {exc}")
    return f"{root}: none of the {len(files)} {kind} file(s) is readable ({'; '.join(reasons[:3])})"


def check_sites(paths: Sequence[str | Path]) -> list[SiteConfig]:
    """Every site config loaded and its data folder looked at; all problems in one ConfigError.

    Each line reads ``path: field: reason``; site names must be unique (they label every metric).
    """
    if not paths:
        raise ConfigError("sites: at least one site config is needed")
    problems: list[str] = []
    configs: list[SiteConfig] = []
    seen: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        try:
            config = load_site_config(path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        configs.append(config)
        if config.name in seen:
            problems.append(f"{path}: name: {config.name!r} is also the name of {seen[config.name]}")
        seen.setdefault(config.name, path)
        reason = _data_problem(config)
        if reason:
            problems.append(f"{path}: data_path: {reason}")
    if problems:
        raise ConfigError("\n".join(problems))
    return configs
