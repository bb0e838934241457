"""The readiness test before a federation starts: every site must pass ``fedsense data check``.

A corrupt file at one site used to surface inside Flower, tens of seconds later, as a node id in
flower.log. Reading every slice of every site first (the site-side check, reached by module name as
``fedsense data check`` reaches it, so the server package never imports the client package) names the
site, the file and the reason within seconds; a NOT READY site is refused unless the user overrides it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from common.errors import FedSenseError

SITE_CHECK = "client.check"


def check_readiness(sites: Sequence[str | Path], report: Callable[[str], None]) -> None:
    """Run the data check on each site (no manifest written); refuse with every NOT READY site's reasons."""
    check = importlib.import_module(SITE_CHECK)
    refused = []
    for site in sites:
        result = check.check_site(Path(site), write_manifest_file=False)
        slices = sum(sum(counts.values()) for counts in result.slices.values())
        for warning in result.warnings:
            report(f"{result.site}: warning: {warning}")
        if result.ready:
            report(f"{result.site}: READY ({slices} slices)")
            continue
        reasons = [*result.problems, *(f"{result.data_path / name}: {reason}" for name, reason in result.skipped)]
        refused.append(f"site {result.site} ({site}) is NOT READY: " + "; ".join(reasons))
    if refused:
        raise FedSenseError(
            "\n".join(refused) + "\n`fedsense data check SITE.toml` shows the details; "
            "--skip-data-check starts the run anyway"
        )
