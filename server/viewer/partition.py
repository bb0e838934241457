"""The ``fedsense data partition`` summary as a table: sites x subjects x slices x contrasts."""

from __future__ import annotations

from typing import Any, TextIO

from rich.markup import escape
from rich.table import Table

from common.command import OutputConsole


def print_partition_summary(summary: dict[str, Any], out: TextIO) -> None:
    """One row per site, then what was left out (unreadable files, unassigned or shared subjects)."""
    console = OutputConsole(file=out)
    if not console.is_terminal:  # a file or pipe: wide enough that site names and contrasts stay whole
        console = OutputConsole(file=console.file, width=120)
    table = Table(title=f"{summary['dataset']} partitioned by {summary['by']}")
    for column in ("site", "subjects", "files", "slices", "contrasts", "field (T)", "coils", "matrix"):
        table.add_column(
            column, justify="right" if column in ("subjects", "files", "slices") else "left", no_wrap=column == "site"
        )
    for site in summary["sites"]:
        table.add_row(
            escape(site["name"]),
            str(site["subjects"]),
            str(site["files"]),
            str(site["slices"]),
            " ".join(f"{c}:{n}" for c, n in site["contrasts"].items()),
            "/".join(f"{f:g}" for f in site["field_strengths_t"]) or f"{site['scanner']['field_strength_t']:g}*",
            "/".join(str(c) for c in site["coils"]) or f"{site['scanner']['coils']}*",
            " ".join(f"{h}x{w}" for h, w in site["matrices"]) or "x".join(map(str, site["scanner"]["matrix"])) + "*",
        )
    console.print(table)
    console.print(
        "* from the scanner profile (the files do not record it)"
        f"; files linked: {', '.join(f'{n} {k}' for k, n in summary['links'].items())}"
    )
    if summary["skipped"]:
        first = summary["skipped"][0]
        console.print(
            f"[yellow]{len(summary['skipped'])} unreadable file(s) left out[/yellow], first: "
            + escape(f"{first['file']}: {first['reason']}")
        )
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if summary["unassigned_subjects"]:
        console.print(
            f"[yellow]{len(summary['unassigned_subjects'])} subject(s) in no site[/yellow] "
            "(not in the partition CSV, or over --max-subjects)"
        )
    if summary["shared_subjects"]:
        console.print(
            f"[yellow]{len(summary['shared_subjects'])} subject(s) have files in more than one site[/yellow]"
            " (per-file header keys); see shared_subjects in partition.json"
        )
