"""SCAFFOLD in a real Flower simulation: control variates travel as extra records and every update is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.protocol import SCAFFOLD_DELTA
from common.runconfig import RunConfig
from server.simulate import simulate
from server.store import GLOBAL_SITE
from tests.deployment import tiny_run

pytestmark = pytest.mark.slow


def test_scaffold_runs_in_simulate(small_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = small_sites[:2]
    audit = tmp_path / "egress.jsonl"
    monkeypatch.setenv("FEDSENSE_AUDIT_LOG", str(audit))
    run = RunConfig.from_flat(tiny_run(tmp_path / "run", rounds=2, **{
        "name": "scaffold", "strategy": "scaffold", "local-steps": 1, "min-train-nodes": 2,
        "min-available-nodes": 2, "min-evaluate-nodes": 0, "sites": ",".join(map(str, sites))}))
    store = simulate(run, timeout=300)
    train = [r for r in store.read_metrics() if r["phase"] == "train"]
    assert sorted((r["round"], r["site"]) for r in train if r["site"] != GLOBAL_SITE) == [
        (1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")]
    assert all(not r["rejected"] for r in train if r["site"] == GLOBAL_SITE)
    replies = [json.loads(line) for line in audit.read_text().splitlines()]
    deltas = [r["arrays"][SCAFFOLD_DELTA] for r in replies if SCAFFOLD_DELTA in r.get("arrays", {})]
    shared = [r["arrays"]["arrays"] for r in replies if SCAFFOLD_DELTA in r.get("arrays", {})]
    assert len(deltas) == 4
    # One variate per trainable weight the site sends (the buffers, e.g. BatchNorm's statistics, carry none).
    assert all(set(d) <= set(s) and d for d, s in zip(deltas, shared))
