"""What a site knows for the whole of a run: its validated run config, site config and datasets.

Flower hands the ClientApp the same run config and node config with every message of a run; validating
the one and resolving the other again for each message costs every round's handler time for nothing.
The context is built on a run's first message and kept by (run id, node id): a process of a simulation
hosts several virtual sites, and a long-lived SuperNode process serves run after run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

from client.node_site import resolve_site_config_path
from common.config import SiteConfig
from common.data.dataset import SiteDataset
from common.data.loaders import load_site
from common.runconfig import RunConfig
from common.ssdu import check_model

logger = logging.getLogger(__name__)

#: Contexts kept per process (as many as ``load_site`` keeps sites); the oldest goes first.
KEPT = 64


@dataclass(frozen=True)
class SiteContext:
    """One site's view of one run, built once per run."""

    run: RunConfig
    site_path: Path
    site: SiteConfig
    datasets: dict[str, SiteDataset]
    flat: Mapping[str, Any]  # the run config as Flower handed it, to notice a changed one


_contexts: dict[tuple[int, int], SiteContext] = {}


def site_context(context: Context) -> SiteContext:
    """The run's :class:`SiteContext` at this node, built on its first message."""
    key, flat = (int(context.run_id), int(context.node_id)), dict(context.run_config)
    cached = _contexts.get(key)
    if cached is not None and cached.flat == flat:
        return cached
    run = RunConfig.from_flat(flat)
    site_path = resolve_site_config_path(context.node_config, run)
    site, datasets = load_site(str(site_path))
    if site.supervision == "self":
        check_model(run.model, f"run config (site {site_path})")
    built = SiteContext(run, site_path, site, datasets, flat)
    if len(_contexts) >= KEPT and key not in _contexts:
        _contexts.pop(next(iter(_contexts)))
    _contexts[key] = built
    logger.debug("site %s: context of run %d built", site.name, context.run_id)
    return built
