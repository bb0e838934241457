"""Subject-level train/val/test partition of one site's data.

Slices of one subject are strongly correlated, so splitting by slice (or by file, when a subject has
several contrasts) would leak test anatomy into training. Each subject is placed by a hash of
(seed, subject id), so the assignment does not depend on file listing order or on which other subjects a
site holds, and is identical on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def _rank(seed: int, subject: str) -> str:
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def split_subjects(
    subjects: Iterable[str], seed: int, val_fraction: float, test_fraction: float
) -> dict[Split, list[str]]:
    """Partition subject ids into train/val/test (each list sorted).

    Sizes are the rounded fractions; with three or more subjects every split whose fraction is > 0 gets at
    least one subject and training keeps at least one, so small sites still evaluate.
    """
    ordered = sorted(set(subjects), key=lambda s: _rank(seed, s))
    total = len(ordered)
    n_test = round(total * test_fraction)
    n_val = round(total * val_fraction)
    if total >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    while total > 0 and n_test + n_val > total - 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return {
        "test": sorted(ordered[:n_test]),
        "val": sorted(ordered[n_test : n_test + n_val]),
        "train": sorted(ordered[n_test + n_val :]),
    }
