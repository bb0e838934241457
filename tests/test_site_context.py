"""The ClientApp builds a site's context once per run and node, not for every message."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from client import site_context as module
from common.runconfig import RunConfig


def _context(run_id: int, node_id: int, **run_config: Any) -> Context:
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={"site-config": f"site-{node_id}.toml"},
        state=RecordDict(),
        run_config={"seed": 1, **run_config},
    )


def test_the_context_is_built_on_a_runs_first_message_only(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    validations: list[dict[str, Any]] = []

    def load_site(path: str) -> tuple[Any, dict[str, Any]]:
        loads.append(path)
        return SimpleNamespace(name=path, supervision="full"), {}

    def from_flat(flat: dict[str, Any], source: str = "run config") -> RunConfig:
        validations.append(flat)
        return RunConfig(**{k.replace("-", "_"): v for k, v in flat.items()})

    monkeypatch.setattr(module, "load_site", load_site)
    monkeypatch.setattr(module.RunConfig, "from_flat", staticmethod(from_flat))
    monkeypatch.setattr(module, "_contexts", {})
    first = module.site_context(_context(7, 1))
    for _ in range(3):  # the rest of run 7's messages at node 1
        assert module.site_context(_context(7, 1)) is first
    assert (loads, len(validations)) == (["site-1.toml"], 1)
    assert first.run.seed == 1 and first.site.name == "site-1.toml"
    other_node = module.site_context(_context(7, 2))
    next_run = module.site_context(_context(8, 1, seed=2))
    assert other_node.site.name == "site-2.toml" and next_run.run.seed == 2
    assert len(validations) == 3
    # The same run id with another run config (a test harness reusing ids) is rebuilt, not served stale.
    assert module.site_context(_context(8, 1, seed=3)).run.seed == 3
