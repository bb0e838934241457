"""``fedsense evaluate``: score an exported model on a site's own data against the no-learning baselines.

Runs at the site, on its own files, with the same splits, masks and metric code as federated training
(:func:`common.training.evaluate`: fastMRI PSNR / SSIM / NMSE per volume, averaged over volumes), so the
numbers are comparable with the run's validation table. Only aggregate metrics are printed: no file
names, slices or images. The baselines are the zero-filled reconstruction and classical L1-wavelet
compressed sensing (:mod:`common.cs`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor, nn

from common.command import OutputConsole
from common.cs import l1_wavelet_sense
from common.data.loaders import empty_split_error, load_site, make_loader
from common.errors import ConfigError
from common.training import Batch, evaluate

logger = logging.getLogger(__name__)

BASELINES = ("zero-filled", "cs")
SPLITS = ("train", "val", "test")
FORMATS = ("table", "csv", "json")
COLUMNS = ("site", "method", "num_examples", "num_volumes", "psnr", "ssim", "nmse", "gain_psnr")
ALL_SITES = "all sites"
_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "nmse": "{:.4g}", "gain_psnr": "{:+.2f}"}


class CSRecon(nn.Module):
    """L1-wavelet SENSE compressed sensing as a "model", so one evaluation loop scores every method.

    A batch of FISTA takes seconds; ``advance(slices)``, when set, is told after every iteration what
    fraction of the batch's slices is done, so a progress bar moves within the batch.
    """

    def __init__(self, lam: float = 0.005, iterations: int = 50) -> None:
        super().__init__()
        self.lam, self.iterations = lam, iterations
        self.advance: Callable[[float], None] | None = None

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """Same signature as the learned models: (B,C,H,W) k-space, mask, maps -> (B,H,W) magnitude."""
        advance, share = self.advance, masked_kspace.shape[0] / self.iterations
        image = l1_wavelet_sense(
            masked_kspace.cpu(),
            mask.cpu(),
            sens_maps.cpu(),
            lam=self.lam,
            iterations=self.iterations,
            on_iteration=None if advance is None else lambda _: advance(share),
        )
        return image.abs().to(masked_kspace.device)


@dataclass(frozen=True)
class Score:
    """One method's aggregate metrics at one site."""

    site: str
    method: str
    num_examples: int
    num_volumes: int
    metrics: dict[str, float]


def parse_baselines(text: str) -> list[str]:
    """``zero-filled,cs`` -> ["zero-filled", "cs"]; unknown names are a :class:`ConfigError`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"--baselines: unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    return list(dict.fromkeys(names))


def _tracked(loader: Iterable[Batch], progress: Progress | None, task: Any) -> Iterator[Batch]:
    """Yield the loader's batches, advancing the progress bar by the slices of each."""
    for batch in loader:
        yield batch
        if progress is not None:
            target = batch["target"]
            assert isinstance(target, Tensor)
            progress.advance(task, target.shape[0])


def evaluate_sites(
    model: nn.Module,
    site_configs: Sequence[str | Path],
    *,
    split: str = "test",
    baselines: Sequence[str] = ("zero-filled",),
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    max_slices: int = 0,
    console: Console | None = None,
) -> list[Score]:
    """Scores of ``model`` ("model") and each baseline on ``split`` of every site, with a progress bar.

    ``max_slices`` > 0 stops each (site, method) after that many slices: a quick look, not the score.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    methods: list[tuple[str, nn.Module | None]] = [("model", model)]
    for name in baselines:
        methods.append((name, None if name == "zero-filled" else CSRecon()))
    sites = [load_site(str(path)) for path in site_configs]
    for _, datasets in sites:  # every site's split, before the first score is spent on another site
        if len(datasets[split]) == 0:
            raise empty_split_error(datasets[split])
    total = sum(min(len(d[split]), max_slices or len(d[split])) for _, d in sites) * len(methods)
    scores: list[Score] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=console is None) as progress:
        task = progress.add_task("slices", total=total)
        for config, datasets in sites:
            for method, candidate in methods:
                progress.update(task, description=f"{config.name} · {method}")
                if console is not None and not console.is_terminal:  # no live bar in a log file: one line each
                    logger.info("evaluating %s on %s (%s split)", method, config.name, split)
                loader = make_loader(datasets[split], batch_size, shuffle=False, seed=seed)
                within = isinstance(candidate, CSRecon)  # CS advances the bar per FISTA iteration, not per batch
                if isinstance(candidate, CSRecon):
                    candidate.advance = lambda slices: progress.advance(task, slices)
                result = evaluate(
                    candidate,
                    _tracked(loader, None if within else progress, task),
                    device=device,
                    max_slices=max_slices,
                    precision=precision if method == "model" else "fp32",
                )
                scores.append(
                    Score(
                        config.name,
                        method,
                        result.num_examples,
                        result.num_volumes,
                        {k: result.metrics[k] for k in ("psnr", "ssim", "nmse")},
                    )
                )
    return scores


def rows(scores: Sequence[Score]) -> list[dict[str, Any]]:
    """Flat rows (:data:`COLUMNS`) per site and method, plus an example-weighted "all sites" block.

    ``gain_psnr`` (model rows only) is the model's PSNR minus the first baseline's at the same site.
    """
    out: list[dict[str, Any]] = []
    methods = list(dict.fromkeys(s.method for s in scores))
    sites = list(dict.fromkeys(s.site for s in scores))
    by_key = {(s.site, s.method): s for s in scores}
    pooled: dict[str, Score] = {}
    for method in methods:
        members = [by_key[(site, method)] for site in sites if (site, method) in by_key]
        n = sum(m.num_examples for m in members)
        pooled[method] = Score(
            ALL_SITES,
            method,
            n,
            sum(m.num_volumes for m in members),
            {k: sum(m.metrics[k] * m.num_examples for m in members) / n for k in ("psnr", "ssim", "nmse")},
        )
    reference = methods[1] if len(methods) > 1 else None
    for site in [*sites, ALL_SITES]:
        for method in methods:
            score = pooled[method] if site == ALL_SITES else by_key.get((site, method))
            if score is None:
                continue
            gain = None
            if method == "model" and reference is not None:
                base = pooled[reference] if site == ALL_SITES else by_key[(site, reference)]
                gain = score.metrics["psnr"] - base.metrics["psnr"]
            out.append(
                {
                    "site": site,
                    "method": method,
                    "num_examples": score.num_examples,
                    "num_volumes": score.num_volumes,
                    **score.metrics,
                    "gain_psnr": gain,
                }
            )
    return out


def render(table_rows: Sequence[dict[str, Any]], fmt: str, stream: TextIO, title: str = "") -> None:
    """The rows as a rich table (people) or CSV / JSON (scripts), as ``fedsense metrics show`` does."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table_rows)
        return
    if fmt == "json":
        json.dump(list(table_rows), stream, indent=2, allow_nan=False)
        stream.write("\n")
        return
    reference = next((r["method"] for r in table_rows if r["method"] != "model"), None)
    caption = f"gain: model PSNR − {reference} PSNR at the same site" if reference else None
    table = Table(title=title or None, title_justify="left", caption=caption, caption_justify="left")
    for name, label in (
        ("site", "site"),
        ("method", "method"),
        ("num_examples", "slices"),
        ("psnr", "PSNR (dB)"),
        ("ssim", "SSIM"),
        ("nmse", "NMSE"),
        ("gain_psnr", "gain (dB)"),
    ):
        table.add_column(label, justify="left" if name in ("site", "method") else "right")
    for row in table_rows:
        cells = [row["site"], row["method"], str(row["num_examples"])]
        for key in ("psnr", "ssim", "nmse", "gain_psnr"):
            value = row[key]
            cells.append("–" if value is None else _FORMATS[key].format(value))
        table.add_row(*cells, style="bold" if row["site"] == ALL_SITES else None)
    OutputConsole(file=stream).print(table)
