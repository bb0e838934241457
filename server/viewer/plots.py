"""``fedsense metrics plot``: PNG learning curves and sample reconstructions of one or more runs.

Figures are built with matplotlib's object API on the Agg canvas (never ``pyplot``), so no
global figure state is shared and the dashboard can render from several request threads.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.atomic import atomic_write_bytes
from common.errors import FedSenseError
from common.outputs import check_output_folder
from server.store import GLOBAL_SITE, RunDir, Samples
from server.viewer.run_view import DISPLAY_METRICS, METRIC_LABELS, RunView, load_run

logger = logging.getLogger(__name__)

PANELS = ("zero-filled", "reconstruction", "target", "|recon − target|")
MAX_SAMPLE_ROWS = 4  # images per site in a samples figure; more makes panels unreadably small
_CURVES = tuple((phase, metric) for phase in ("evaluate", "train") for metric in DISPLAY_METRICS)


def plot(
    run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], overwrite: bool = False
) -> list[Path]:
    """Write PNG figures to ``out_dir`` and return their paths.

    ``out_dir`` may not be, hold or lie in a run directory; a non-empty one is written into only with
    ``overwrite``.

    One run: a figure per (phase, metric) with one line per site and the global aggregate, plus
    one figure per site of its latest sample reconstructions. Several runs: a figure per
    (phase, metric) comparing the runs' global curves (e.g. FedAvg vs FedProx vs local-only).
    """
    if not run_dirs:
        raise FedSenseError("plot needs at least one run directory")
    check_output_folder(Path(out_dir), [Path(r) for r in run_dirs], overwrite)
    views = [load_run(run_dir) for run_dir in run_dirs]
    empty = [str(v.path) for v in views if not v.records]
    if empty:
        raise FedSenseError(f"{', '.join(empty)}: no metrics yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(views) == 1:
        written = _site_curves(views[0], out)
        samples = RunDir(views[0].path).latest_samples()
        if samples is None:
            logger.info("%s: no sample reconstructions saved yet", views[0].path)
        else:
            for site in samples.sites:
                path = out / f"samples_{site}.png"  # site names are file-name safe (common.samples)
                _save(samples_figure(samples, [site]), path)
                written.append(path)
    else:
        written = _compare_runs(views, out)
    logger.info("wrote %d figure(s) to %s", len(written), out)
    return written


def _site_curves(view: RunView, out: Path) -> list[Path]:
    written = []
    for phase, metric in _CURVES:
        points = _points(view, phase, metric)
        if not points:
            continue
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for site in sorted(points, key=lambda s: (s == GLOBAL_SITE, s)):
            rounds, values = points[site]
            if site == GLOBAL_SITE:
                ax.plot(rounds, values, "o-", color="black", linewidth=2.8, markersize=5, label="global (weighted)")
            else:
                ax.plot(rounds, values, "o-", linewidth=1.3, markersize=3.5, alpha=0.85, label=site)
        _decorate(ax, f"{view.label} · {phase} {METRIC_LABELS[metric]}", metric)
        path = out / f"{phase}_{metric}.png"
        _save(fig, path)
        written.append(path)
    return written


def _compare_runs(views: list[RunView], out: Path) -> list[Path]:
    labels = [v.label for v in views]
    if len(set(labels)) < len(labels):  # same name/strategy twice: tell them apart by directory
        labels = [f"{label} [{v.path.name}]" for label, v in zip(labels, views)]
    written = []
    for phase, metric in _CURVES:
        curves = [(label, _points(v, phase, metric).get(GLOBAL_SITE)) for label, v in zip(labels, views)]
        if not any(curve for _, curve in curves):
            continue
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for label, curve in curves:
            if curve:
                ax.plot(*curve, "o-", linewidth=2, markersize=4, label=label)
        _decorate(ax, f"global {phase} {METRIC_LABELS[metric]}", metric)
        path = out / f"compare_{phase}_{metric}.png"
        _save(fig, path)
        written.append(path)
    return written


def _points(view: RunView, phase: str, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per site, the rounds and values of ``metric`` in ``phase`` (rounds with a value only)."""
    points: dict[str, tuple[list[int], list[float]]] = {}
    for row in view.rows(phase):
        if row[metric] is not None:
            rounds, values = points.setdefault(row["site"], ([], []))
            rounds.append(row["round"])
            values.append(row[metric])
    return points


def _decorate(ax: Axes, title: str, metric: str) -> None:
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel("round")
    ax.set_ylabel(METRIC_LABELS[metric])
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator)  # matplotlib's default AutoLocator
    locator.set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")


def samples_figure(samples: Samples, sites: Sequence[str] | None = None) -> Figure:
    """Zero-filled, reconstruction, target and error map per sample image of ``sites``.

    Magnitude panels of a row share one grey scale (the target's range) so they compare
    directly; the reconstruction and error panels carry that image's PSNR/SSIM.
    """
    chosen = list(sites) if sites is not None else list(samples.sites)
    missing = [s for s in chosen if s not in samples.sites]
    if missing:
        raise FedSenseError(f"{samples.path}: no samples for site(s) {', '.join(missing)}")
    rows = [(site, i) for site in chosen for i in range(min(MAX_SAMPLE_ROWS, len(samples.sites[site].target)))]
    fig = Figure(figsize=(10, 2.7 * len(rows) + 0.5), layout="constrained")
    fig.suptitle(f"round {samples.round} sample reconstructions", fontsize=12, x=0.01, ha="left")
    axes = np.atleast_2d(fig.subplots(len(rows), len(PANELS), squeeze=False))
    for row, ((site, i), row_axes) in enumerate(zip(rows, axes)):
        s = samples.sites[site]
        target = s.target[i]
        error = np.abs(s.recon[i] - target)
        vmax = float(target.max()) or 1.0
        scores = f"PSNR {s.psnr[i]:.2f} dB\nSSIM {s.ssim[i]:.4f}"
        images = (s.zero_filled[i], s.recon[i], target, error)
        for col, (ax, image, title) in enumerate(zip(row_axes, images, PANELS)):
            is_error = col == len(PANELS) - 1
            shown = ax.imshow(image, cmap="inferno" if is_error else "gray", vmin=0, vmax=None if is_error else vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{site} #{i}", fontsize=9)
            if col in (1, len(PANELS) - 1):
                text = scores if col == 1 else f"{scores}\nmax {error.max():.3g}"
                ax.text(
                    0.02,
                    0.02,
                    text,
                    transform=ax.transAxes,
                    fontsize=7.5,
                    color="white",
                    va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"},
                )
            if is_error:
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    return fig


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes (the dashboard serves these)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _save(fig: Figure, path: Path) -> None:
    atomic_write_bytes(path, figure_png(fig))
