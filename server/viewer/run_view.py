"""A run directory as the viewers see it: its config, metric rows, sites and best round.

The table, the plots and the dashboard all load a run through :func:`load_run` and flatten metrics
into the same rows (:data:`COLUMNS`), so a number is identical wherever it is shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedSenseError
from server.store import GLOBAL_SITE, PHASES, RunDir

# ssdu-loss: the held-out k-space loss of self-supervised sites (common.ssdu), their only reference-free metric.
METRICS = ("loss", "psnr", "ssim", "nmse", "ssdu-loss")
# ε a site has spent on DP-SGD, and ε of client-level DP (global rows): columns only of runs that have them.
PRIVACY_METRICS = ("dp-epsilon", "dp-client-epsilon")
COLUMNS = ("round", "phase", "site", "num_examples", *METRICS)
# Image quality first: that is what a reader of a reconstruction run looks for.
DISPLAY_METRICS = ("psnr", "ssim", "nmse", "loss", "ssdu-loss")
METRIC_LABELS = {
    "loss": "loss",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "nmse": "NMSE",
    "ssdu-loss": "held-out k-space loss (self-supervised sites)",
    "dp-epsilon": "site ε (DP-SGD)",
    "dp-client-epsilon": "client-level ε",
}
METRIC_FORMATS = {
    "loss": "{:.4g}",
    "psnr": "{:.2f}",
    "ssim": "{:.4f}",
    "nmse": "{:.4g}",
    "ssdu-loss": "{:.4g}",
    "dp-epsilon": "{:.3f}",
    "dp-client-epsilon": "{:.3f}",
}


@dataclass(frozen=True)
class RunView:
    """A snapshot of one run: its config (``{}`` before config.json exists) and deduped records."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    best: dict[str, Any] | None = None  # best.json: the round selected on the validation metric

    @property
    def status(self) -> str:
        """``running``/``finished``/``failed`` from config.json, ``unknown`` without one."""
        return str(self.config.get("status", "unknown"))

    @property
    def num_rounds(self) -> int | None:
        """Planned rounds: ``num_rounds`` (the contract) or flwr's ``num-server-rounds``."""
        value = self.config.get("num_rounds", self.config.get("num-server-rounds"))
        return value if isinstance(value, int) else None

    @property
    def label(self) -> str:
        """A human name for legends: config ``name`` (or the records' ``run``) plus how it trained.

        "How" is the baseline kind for baselines (their ``strategy`` key is only a default) and
        the federated strategy otherwise, left out when the name already says it.
        """
        name = str(self.config.get("name") or (self.records[0]["run"] if self.records else self.path.name))
        kind = self.config.get("baseline") or self.config.get("strategy")
        if kind and str(kind).lower() not in name.lower():
            return f"{name} ({kind})"
        return name

    def rows(self, phase: str | None = None) -> list[dict[str, Any]]:
        """Records flattened to :data:`COLUMNS`, sorted by round, phase, site (global last)."""
        return metric_rows(self.records, phase)

    def self_supervised_sites(self) -> set[str]:
        """Sites that trained without references (records marked ``"supervision": "self"``)."""
        return {r["site"] for r in self.records if r.get("supervision") == "self"}

    def sites(self) -> list[str]:
        """Site names in display order: alphabetical, the global aggregate last."""
        return sorted({r["site"] for r in self.records}, key=site_sort_key)


def load_run(run_dir: str | os.PathLike[str], must_exist: bool = True, metrics: bool = True) -> RunView:
    """Read a run for display; with ``must_exist`` a missing directory is a ``FedSenseError``.

    The dashboard passes ``must_exist=False`` because it may start before the run does, and
    ``metrics=False`` for the config view, so a corrupt metrics line does not hide the status.
    """
    run = RunDir(run_dir)
    if must_exist and not run.path.is_dir():
        raise FedSenseError(f"{run.path}: no such run directory")
    config = run.read_config() if run.config_path.exists() else {}
    records = run.read_metrics(dedupe=True) if metrics else []
    return RunView(path=run.path, config=config, records=records, best=run.best() if metrics else None)


def site_sort_key(site: str) -> tuple[bool, str]:
    """Sort sites alphabetically with the example-weighted ``__global__`` aggregate last."""
    return (site == GLOBAL_SITE, site)


def metric_rows(records: list[dict[str, Any]], phase: str | None = None) -> list[dict[str, Any]]:
    """Flatten records to the stable :data:`COLUMNS` (missing metrics are ``None``).

    A run with differential privacy gets its :data:`PRIVACY_METRICS` columns after them.
    """
    if phase is not None and phase not in PHASES:
        raise FedSenseError(f"phase must be one of {PHASES}, got {phase!r}")
    metrics = (*METRICS, *(m for m in PRIVACY_METRICS if any(m in r["metrics"] for r in records)))
    rows = [
        {
            "round": r["round"],
            "phase": r["phase"],
            "site": r["site"],
            "num_examples": r["num_examples"],
            **{m: r["metrics"].get(m) for m in metrics},
        }
        for r in records
        if phase is None or r["phase"] == phase
    ]
    rows.sort(key=lambda row: (row["round"], PHASES.index(row["phase"]), site_sort_key(row["site"])))
    return rows


def format_metric(metric: str, value: float | None) -> str:
    """Display precision per metric (PSNR in hundredths of a dB, SSIM to 4 places)."""
    if value is None:
        return "–"
    return METRIC_FORMATS.get(metric, "{:.4g}").format(value)
