"""Sample reconstructions for viewing: written where the site's data lives, never sent anywhere.

Layout: ``DIR/round-0003/<site>.npz`` with float32 arrays ``zero_filled``, ``recon``, ``target``
of shape (k, h, w) and float arrays ``psnr``, ``ssim`` of shape (k,). In a simulation all sites
share one machine, so the run directory's ``samples/`` collects every site's files.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_bytes
from common.errors import DataError

_ROUND_DIR = re.compile(r"^round-(\d{4,})$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def save_samples(directory: str | Path, server_round: int, site: str, samples: Sequence[dict[str, Any]]) -> Path:
    """Store one round's sample slices of one site (atomically)."""
    if not _SITE_NAME.match(site):
        raise ValueError(f"site name {site!r} is not usable as a file name")
    arrays = {
        key: np.stack([np.asarray(s[key], dtype=np.float32) for s in samples])
        for key in ("zero_filled", "recon", "target")
    }
    arrays["psnr"] = np.array([s["psnr"] for s in samples], dtype=np.float64)
    arrays["ssim"] = np.array([s["ssim"] for s in samples], dtype=np.float64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: **arrays might fill allow_pickle
    path = Path(directory) / f"round-{server_round:04d}" / f"{site}.npz"
    atomic_write_bytes(path, buf.getvalue())
    return path


def latest_samples(directory: str | Path) -> tuple[int, dict[str, dict[str, np.ndarray]]] | None:
    """The newest round that has samples, with each site's arrays; None when there are none."""
    root = Path(directory)
    if not root.is_dir():
        return None
    rounds = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _ROUND_DIR.match(p.name)))
    for rnd, path in reversed(rounds):
        sites: dict[str, dict[str, np.ndarray]] = {}
        for f in sorted(path.glob("*.npz")):
            try:
                with np.load(f) as data:
                    sites[f.stem] = {k: data[k] for k in data.files}
            except (OSError, ValueError) as exc:
                raise DataError(f"{f}: unreadable sample file: {exc}") from exc
        if sites:
            return rnd, sites
    return None
