"""A metrics record as the named scalars a tracker logs; one naming for every tracker."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from server.store import GLOBAL_SITE

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's metric-key alphabet (TensorBoard takes any)
#: Record fields outside ``metrics`` that are wall times of the phase (seconds).
TIMES = ("seconds", "overhead_seconds", "reply_seconds")


def metric_key(site: str, phase: str, name: str) -> str:
    """``<site>/<phase>/<metric>``, the ``__global__`` row as ``global``."""
    who = "global" if site == GLOBAL_SITE else site
    return _UNSAFE.sub("_", f"{who}/{phase}/{name}")


def record_values(record: Mapping[str, Any]) -> dict[str, float]:
    """Every scalar of one validated record by :func:`metric_key`: its metrics, example count, wall times,
    and for a ``__global__`` record how many sites replied and were rejected."""
    site, phase = record["site"], record["phase"]
    values = {k: v for k, v in record["metrics"].items() if v is not None}
    values["num-examples"] = float(record["num_examples"])
    for field in TIMES:
        if isinstance(record.get(field), (int, float)):
            values[field.replace("_", "-")] = float(record[field])
    if site == GLOBAL_SITE:
        values["sites-replied"] = float(len(record.get("sites", [])))
        values["sites-rejected"] = float(len(record.get("rejected", [])))
    return {metric_key(site, phase, name): float(value) for name, value in values.items()}
