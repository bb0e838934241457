"""The names of every pluggable kind, in one place that needs neither PyTorch nor Flower.

Run-config validation, the CLI's choices and the error messages read the names from here; each
implementation (the model classes, the strategy builders, the baselines) is keyed by the same names
and checked against them when its module is imported, so a name cannot exist in one list only.
(Mask patterns are derived from their builders in :mod:`common.masks`.)
"""

from __future__ import annotations

from collections.abc import Iterable

STRATEGIES: tuple[str, ...] = (
    "fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
)
MODELS: tuple[str, ...] = ("unet", "unrolled", "varnet")
BASELINES: tuple[str, ...] = ("local", "centralized", "centralized-balanced", "zero-filled")


def check_implemented(kind: str, names: Iterable[str], implemented: Iterable[str]) -> None:
    """Fail at import when an implementation table and its registry disagree (a programming error)."""
    missing, extra = set(names) - set(implemented), set(implemented) - set(names)
    if missing or extra:
        raise RuntimeError(f"{kind} registry mismatch: not implemented {sorted(missing)}, unregistered {sorted(extra)}")
