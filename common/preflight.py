"""Checks of a federation's site configs and data folders that run before anything is started.

``fedsense simulate`` used to hand the site configs to Flower unchecked: a missing file or a misspelt key
surfaced ~30 s later inside a Ray traceback. These checks read every site config (the same validation
and the same ``path: field: reason`` messages as ``fedsense baseline``), then look at each data folder
without indexing it: it exists, and it holds at least one readable file of the site's dataset kind whose
first bytes are that format's signature. Cheap by design (no volume is opened), so well under 2 s.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from common.config import SiteConfig, load_site_config
from common.data.kinds import dataset_kind
from common.errors import ConfigError


def _data_problem(config: SiteConfig) -> str | None:
    """Why ``config``'s data folder cannot be used, or None when it holds a usable file."""
    root = config.data_path
    if not root.is_dir():
        return f"{root}: directory does not exist" + (
            " (run `fedsense data demo` for demo data)" if not root.exists() else ""
        )
    if not os.access(root, os.R_OK | os.X_OK):
        return f"{root}: directory is not readable by uid {os.getuid()}"
    entry = dataset_kind(config.dataset)
    files, check, kind = entry.find(config), entry.is_file, entry.files
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
