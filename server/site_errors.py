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

ERROR_LINE = re.compile(r"common\.errors\.(?:DataError|ConfigError|FedSenseError|OutputError): (?P<message>.+)$")


Places = Mapping[str, Sequence[Path]]  # site name -> its data folder and config file


def site_of(message: str, places: Places) -> str | None:
    """The site whose data folder (or config) the message names; None when it names none."""
    for name, paths in places.items():
        if any(str(path) in message for path in paths):
            return name
    return None


def _follow(log: Path, start: int, sites: Places, stop: threading.Event,
            report: Callable[[str], None], seen: list[str], interval: float) -> None:
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
            match = ERROR_LINE.search(line.rstrip())
            if match is None:
                continue
            message = match.group("message")
            site = site_of(message, sites)
            text = f"site {site}: {message}" if site else f"a site failed: {message}"
            if text not in seen:
                seen.append(text)
                report(text)
        if stopping:
            return


@contextmanager
def reporting_site_errors(log: Path, sites: Places, report: Callable[[str], None],
                          interval: float = 0.5) -> Iterator[list[str]]:
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
