"""Which site a SuperNode serves: the one piece of client logic that depends on how it was started."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.runconfig import RunConfig


def resolve_site_config_path(node_config: Mapping[str, Any], run: RunConfig) -> Path:
    """``site-config`` from the node config (deployment), else the ``partition-id``-th entry of the
    run's ``sites`` list (simulation, where Flower numbers the virtual SuperNodes)."""
    if "site-config" in node_config:
        return Path(str(node_config["site-config"]))
    sites = run.site_list
    if "partition-id" in node_config and sites:
        pid = int(node_config["partition-id"])
        if pid >= len(sites):
            raise ConfigError(f"run config: sites: {len(sites)} sites listed but node has partition-id {pid}")
        return Path(sites[pid])
    raise ConfigError("node config: site-config: missing (and no run-config 'sites' list to pick from)")
