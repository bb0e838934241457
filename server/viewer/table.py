"""``fedsense metrics show``: a run's metrics as rich tables (people) or CSV/JSON (scripts)."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.markup import escape
from rich.table import Table

from common.command import OutputConsole
from common.errors import FedSenseError
from server.best import export_command
from server.store import CONFIG_FILE, GLOBAL_SITE, METRICS_FILE, RunDir
from server.viewer.run_view import (
    COLUMNS,
    DISPLAY_METRICS,
    METRIC_LABELS,
    METRICS,
    PRIVACY_METRICS,
    RunView,
    format_metric,
    load_run,
)

FORMATS = ("table", "csv", "json")


def show(
    run_dir: str | os.PathLike[str],
    fmt: str = "table",
    out: TextIO | None = None,
    phase: str | None = None,
    metrics: Sequence[str] | None = None,
) -> None:
    """Write the run's metrics to ``out`` (stdout by default); safe while the run is writing.

    ``phase`` limits the output to ``train``, ``evaluate`` or ``finetune`` (default: all). ``metrics`` picks
    which per-metric tables the ``table`` format prints; CSV and JSON always carry every column
    of :data:`server.viewer.run_view.COLUMNS`, so scripts can rely on them.
    """
    if fmt not in FORMATS:
        raise FedSenseError(f"format must be one of {FORMATS}, got {fmt!r}")
    unknown = sorted(set(metrics or ()) - set(METRICS) - set(PRIVACY_METRICS))
    if unknown:
        raise FedSenseError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    stream = out if out is not None else sys.stdout
    view = load_run(run_dir)
    if not view.config and not RunDir(view.path).metrics_path.exists():
        raise FedSenseError(
            f"{view.path}: not a run directory (no {CONFIG_FILE} or {METRICS_FILE}); give the folder "
            "`fedsense simulate` or `fedsense baseline` wrote (--run-dir)"
        )
    if fmt == "csv":
        rows = view.rows(phase)
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == "json":
        json.dump(view.rows(phase), stream, indent=2, allow_nan=False)
        stream.write("\n")
    else:
        _print_tables(
            view,
            stream,
            (phase,) if phase else ("evaluate", "finetune", "train"),
            metrics or (*DISPLAY_METRICS, *PRIVACY_METRICS),
        )


def next_steps(view: RunView) -> list[str]:
    """What the user can do next with this run: only commands that can work for it (no export without a
    checkpoint, nor of a local baseline's per-site models), and where a failed run says why."""
    run = RunDir(view.path)
    lines = []
    if view.status in ("failed", "interrupted"):
        lines.append(_stopped(view))
        logs = [str(run.path / name) for name in ("flower.log", "superlink.log") if (run.path / name).exists()]
        if logs:
            lines.append(f"logs: {' '.join(logs)}")
    elif view.status == "finished-without-sites":
        missed = (view.config.get("status_detail") or {}).get("missed_sites") or {}
        which = "; ".join(f"{site} missed {', '.join(phases)}" for site, phases in missed.items())
        lines.append(
            "[bold yellow]finished-without-sites[/bold yellow]: the model never saw every site's data"
            + (f" ({which})" if which else "")
        )
    kind = view.config.get("baseline")
    if kind == "zero-filled":
        lines.append("zero-filled baseline: no model to export")
    elif kind == "local":
        lines.append("local baseline: one model per site (checkpoint keys site/...), no single model to export")
    elif not any(run.checkpoint_dir.glob("round-*.pt")):
        lines.append("no checkpoint saved: nothing to export yet")
    else:
        lines.append(f"export: [bold]{export_command(view.path, view.best)}[/bold]")
    return lines


def _stopped(view: RunView) -> str:
    """Why a failed run stopped, or where an interrupted one stopped and how it resumes.

    Read from ``status_detail``, where :meth:`RunDir.set_status` nests them (``error``; ``last_complete_round``).
    The resume is the same command again: ``simulate`` continues with ``resume = true`` (its default), ``baseline``
    continues an interrupted baseline of its kind; the command's options are not recorded, so it cannot be printed.
    """
    detail = view.config.get("status_detail") or {}
    line = f"[bold red]{view.status}[/bold red]"
    if view.status == "failed":
        error = detail.get("error")
        return line + (f": {escape(str(error))}" if error else " (no reason recorded)")
    kind = view.config.get("baseline")
    again = (
        f"run the same `fedsense {f'baseline {kind}' if kind else 'simulate'}` command again "
        f"(same --run-dir and options{'' if kind else ', resume = true: the default'})"
    )
    last = detail.get("last_complete_round")
    if kind == "zero-filled" or not isinstance(last, int):
        return f"{line}: {again} to start it again"
    where = f"after round {last}, the last complete one" if last else "before any round was complete"
    return f"{line} {where}: {again} to resume with round {last + 1}"


def _print_tables(view: RunView, stream: TextIO, phases: Sequence[str], metrics: Sequence[str]) -> None:
    """One table per (phase, metric) that has values: rounds down, sites across, global last."""
    console = OutputConsole(file=stream)
    # Round 0 is the evaluation before training, not one of the planned rounds.
    done = len(
        {r["round"] for r in view.records if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate" and r["round"] >= 1}
    )
    planned = f"/{view.num_rounds}" if view.num_rounds is not None else ""
    console.print(
        f"[bold]{view.label}[/bold]  status [bold]{view.status}[/bold]  "
        f"rounds evaluated {done}{planned}  [dim]{view.path}[/dim]",
        highlight=False,
    )
    best = view.best["round"] if view.best else None
    if view.best:
        console.print(
            f"best round [bold]{best}[/bold] by {view.best['metric']} "
            f"({format_metric(view.best['metric'], view.best['value'])}), {view.best['checkpoint']}  "
            "[dim](marked * in the evaluate tables)[/dim]",
            highlight=False,
        )
    else:
        console.print("no best round recorded", highlight=False)
    for line in next_steps(view):
        console.print(line, highlight=False, soft_wrap=True)  # copy-pasteable
    sites = view.sites()
    self_supervised = view.self_supervised_sites()
    printed = False
    for phase in phases:
        rows = view.rows(phase)
        for metric in metrics:
            cells: dict[int, dict[str, Any]] = {}
            for row in rows:
                if row.get(metric) is not None:
                    cells.setdefault(row["round"], {})[row["site"]] = row[metric]
            if not cells:
                continue
            table = Table(title=f"{phase} · {METRIC_LABELS[metric]}", title_justify="left")
            table.add_column("round", justify="right", style="dim")
            for site in sites:
                is_global = site == GLOBAL_SITE
                name = "global" if is_global else f"{site} (self)" if site in self_supervised else site
                table.add_column(name, justify="right", style="bold" if is_global else None)
            for round_, values in sorted(cells.items()):
                marked = phase == "evaluate" and round_ == best
                table.add_row(
                    f"*{round_}" if marked else str(round_),
                    *(format_metric(metric, values.get(site)) for site in sites),
                    style="bold yellow" if marked else None,
                )
            console.print(table)
            printed = True
    if "train" in phases:
        printed = _print_stragglers(view, console) or printed
    if not printed:
        console.print("no metrics yet")
    elif self_supervised:
        console.print(
            "(self) = self-supervised site (SSDU): it trains without references; its PSNR/SSIM/NMSE are "
            "measured against the simulation's reference, which it never trains on.",
            highlight=False,
        )


def _print_stragglers(view: RunView, console: OutputConsole) -> bool:
    """The sites each training round did not wait for (``round-deadline``) and any reduced local steps.

    False (nothing printed) for a run without a deadline.
    """
    rounds = sorted(
        (r for r in view.records if r["site"] == GLOBAL_SITE and r["phase"] == "train" and "stragglers" in r),
        key=lambda r: r["round"],
    )
    if not rounds:
        return False
    table = Table(title="train · stragglers (round-deadline)", title_justify="left")
    table.add_column("round", justify="right", style="dim")
    table.add_column("stragglers", justify="right")
    table.add_column("sites not waited for")
    table.add_column("adaptive local steps")
    for record in rounds:
        steps = ", ".join(f"{site}: {n}" for site, n in sorted(record.get("local_steps", {}).items()))
        table.add_row(
            str(record["round"]), str(len(record["stragglers"])), ", ".join(record["stragglers"]) or "-", steps or "-"
        )
    console.print(table)
    return True
