"""Site failures on the screen while a simulation runs: the site's name, the file and the reason.

Flower logs a ClientApp's exception in flower.log under a node id. The FedSense errors raised at a site
name their file (``path: reason``), so following the log and matching the path against each site's data
folder and config turns a line deep in the log into ``site site-b: /data/x.nii.gz: unreadable NIfTI data``
on the screen, seconds after it happened.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.store import GLOBAL_SITE

#: How a phase's record words its ``round-deadline`` stragglers (server.federation writes them with these).
STRAGGLER = "straggler: "
LATE = "late: a straggler's reply"
PACED = (STRAGGLER, LATE)

ERROR_LINE = re.compile(r"common\.errors\.(?:DataError|ConfigError|FedSenseError|OutputError): (?P<message>.+)$")
# Ray colours its log prefixes and appends "[repeated 2x across cluster]" to lines it deduplicated.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")


Places = Mapping[str, Sequence[Path]]  # site name -> its data folder and config file


def site_of(message: str, places: Places) -> str | None:
    """The site whose data folder (or config) the message names; None when it names none."""
    for name, paths in places.items():
        if any(str(path) in message for path in paths):
            return name
    return None


def _without_config(message: str, paths: Sequence[Path]) -> str:
    """``message`` without a leading ``CONFIG.toml: `` of its site (the screen line names the site)."""
    for path in paths:
        prefix = f"{path}: "
        if path.suffix == ".toml" and message.startswith(prefix) and len(message) > len(prefix):
            return message[len(prefix) :]
    return message


def _follow(
    log: Path,
    start: int,
    sites: Places,
    stop: threading.Event,
    report: Callable[[str], None],
    seen: list[str],
    interval: float,
) -> None:
    position, partial = start, ""
    while True:
        stopping = stop.wait(interval)
        try:
            with open(log, "rb") as stream:
                stream.seek(position)
                chunk = stream.read()
        except OSError:
            chunk = b""
        position += len(chunk)
        lines = (partial + chunk.decode("utf-8", "replace")).split("\n")
        partial = lines.pop()
        for line in lines:
            match = ERROR_LINE.search(_RAY_REPEATED.sub("", _ANSI.sub("", line)).rstrip())
            if match is None:
                continue
            message = match.group("message")
            site = site_of(message, sites)
            if site is not None:  # the site's config path in front (client/site_errors.py): the name says it
                message = _without_config(message, sites[site])
            text = f"site {site}: {message}" if site else f"a site failed: {message}"
            if text not in seen:
                seen.append(text)
                report(text)
        if stopping:
            return


@contextmanager
def reporting_site_errors(
    log: Path, sites: Places, report: Callable[[str], None], interval: float = 0.5
) -> Iterator[list[str]]:
    """Report each new site error written to ``log`` while the body runs; yields the list of them."""
    start = log.stat().st_size if log.exists() else 0
    seen: list[str] = []
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(log, start, sites, stop, report, seen, interval), daemon=True)
    follower.start()
    try:
        yield seen
    finally:
        stop.set()
        follower.join(timeout=10)


def missed_phases(records: Sequence[Mapping[str, Any]], expected: Sequence[str]) -> dict[str, list[str]]:
    """Which sites each phase of a run went on without, by name, from the run's ``__global__`` records.

    A site's error reply carries no site name (its reason is redacted: file paths never leave a site), so
    a phase with rejections names as missing the expected sites absent from its ``sites``; when that
    count does not match the rejections (a sampled fraction of sites), the rejected labels are kept.
    A ``round-deadline`` straggler (and its late reply) is the deadline working, not a failed site: it is
    not counted. Returns site -> phases it missed, e.g. ``{"site-c": ["evaluate 0", "train 1"]}``.
    """
    missed: dict[str, list[str]] = {}
    for record in records:
        rejected = [r for r in record.get("rejected") or [] if not str(r.get("reason", "")).startswith(PACED)]
        if record.get("site") != GLOBAL_SITE or not rejected:
            continue
        paced = {str(r["site"]) for r in record.get("rejected") or [] if str(r.get("reason", "")).startswith(PACED)}
        absent = sorted(set(expected) - set(record.get("sites", ())) - paced)
        labels = absent if len(absent) == len(rejected) else sorted(str(r["site"]) for r in rejected)
        for label in labels:
            missed.setdefault(label, []).append(f"{record['phase']} {record['round']}")
    return missed


def missed_summary(missed: Mapping[str, Sequence[str]], phases: int) -> str:
    """One line per site a finished run went without, for the screen."""
    return "\n".join(
        f"site {site} took no part in {len(which)} of {phases} phases ({', '.join(which)})"
        for site, which in sorted(missed.items())
    )


def finished_without(
    records: Sequence[Mapping[str, Any]], expected: Sequence[str], errors: Sequence[str]
) -> str | None:
    """What to tell the operator of a run that finished although sites failed in it; None when none did.

    The federation goes on without a failing site while ``min-train-nodes`` others answer, so such a run
    finishes with a model that never saw that site's data: the command then exits non-zero (README,
    "Exit codes") with this text, naming each site, the phases it missed and what it said.
    """
    phases = [r for r in records if r.get("site") == GLOBAL_SITE]
    missed = missed_phases(phases, expected)
    if not missed:
        return None
    return "\n".join(
        [
            "the run finished, but not with every site: its model and metrics come from the sites that answered",
            missed_summary(missed, len(phases)),
            *errors,
            "fix the site (`fedsense data check SITE.toml`) and run again with --overwrite, or leave it out of --sites",
        ]
    )
