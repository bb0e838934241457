"""The run's best round (``best.json``, written by the federation) and how to export it.

The file is the shared contract {"round", "metric", "value", "checkpoint"}; this module only reads it,
so the table, the dashboard and ``fedsense export`` agree on which round is best and on the command
that exports it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from common.errors import FedSenseError

BEST_FILE = "best.json"


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``best.json``; None when the run has none (yet)."""
    path = Path(run_dir) / BEST_FILE
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedSenseError(f"{path}: unreadable best-round record: {exc}") from exc
    if not isinstance(best, dict) or not isinstance(best.get("round"), int) or isinstance(best.get("round"), bool):
        raise FedSenseError(f"{path}: round: expected an integer round number, got {best!r}")
    return best


def export_command(run_dir: str | Path, best: dict[str, Any] | None) -> str:
    """The ``fedsense export`` line for the best round (the last one when there is no best.json)."""
    which = "best" if best is not None else "last"
    return f"fedsense export {shlex.quote(str(run_dir))} --round {which} --out model/"


def best_summary(best: dict[str, Any] | None) -> str | None:
    """``best round 3 (psnr 31.20)`` for display; None without a best.json."""
    if best is None:
        return None
    value = best.get("value")
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else "?"
    return f"best round {best['round']} ({best.get('metric', '?')} {shown})"
