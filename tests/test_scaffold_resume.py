"""SCAFFOLD in a real Flower simulation, straight through and resumed.

One 2-round run straight through: control variates travel as extra records and every update is kept.
Then the same run with its round-2 checkpoint removed (the server died after the sites trained round 2,
before it saved), resumed as a new Flower run with empty Contexts: round 2 must repeat bit for bit,
which needs round 1's ``c`` (from the server's checkpoint) and ``c_i`` (from each site's files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.protocol import SCAFFOLD_DELTA
from common.runconfig import RunConfig
from server.simulate import simulate
from server.store import GLOBAL_SITE, RunDir
from tests.deployment import tiny_run

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b")


def scaffold_run(run_dir: Path, sites: list[Path], resume: bool) -> RunConfig:
    return RunConfig.from_flat(
        tiny_run(
            run_dir,
            rounds=2,
            **{
                "name": "scaffold",
                "strategy": "scaffold",
                "local-steps": 2,
                "min-train-nodes": 2,
                "min-available-nodes": 2,
                "min-evaluate-nodes": 0,
                "sites": ",".join(map(str, sites)),
                "site-state-dir": str(run_dir / "site-state"),
                "resume": resume,
            },
        )
    )


@pytest.fixture(scope="module")
def straight(small_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, Path]:
    """The uninterrupted run and its egress audit log."""
    run_dir = tmp_path_factory.mktemp("scaffold") / "straight"
    audit = run_dir.parent / "egress.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSENSE_AUDIT_LOG", str(audit))
    try:
        store = simulate(scaffold_run(run_dir, small_sites[:2], resume=False), timeout=300)
    finally:
        mp.undo()
    return store, audit


def test_scaffold_runs_in_simulate(straight: tuple[RunDir, Path]) -> None:
    store, audit = straight
    train = [r for r in store.read_metrics() if r["phase"] == "train"]
    assert sorted((r["round"], r["site"]) for r in train if r["site"] != GLOBAL_SITE) == [
        (1, "site-a"),
        (1, "site-b"),
        (2, "site-a"),
        (2, "site-b"),
    ]
    assert all(not r["rejected"] for r in train if r["site"] == GLOBAL_SITE)
    replies = [json.loads(line) for line in audit.read_text().splitlines()]
    deltas = [r["arrays"][SCAFFOLD_DELTA] for r in replies if SCAFFOLD_DELTA in r.get("arrays", {})]
    shared = [r["arrays"]["arrays"] for r in replies if SCAFFOLD_DELTA in r.get("arrays", {})]
    assert len(deltas) == 4
    # One variate per trainable weight the site sends (the buffers, e.g. BatchNorm's statistics, carry none).
    assert all(set(d) <= set(s) and d for d, s in zip(deltas, shared))


def test_the_control_variates_are_checkpointed_at_the_server_and_kept_at_the_sites(
    straight: tuple[RunDir, Path],
) -> None:
    store, _ = straight
    first = torch.load(store.checkpoint_path(1), weights_only=True)
    assert any(v.abs().sum() > 0 for v in first["round_state"]["c"].values())
    for site in SITES:
        kept = torch.load(store.path / "site-state" / site / "round-0001.pt", weights_only=True)
        assert kept["strategy"] and set(kept["strategy"]) <= set(first["state_dict"])


def test_a_resumed_scaffold_run_ends_with_the_weights_of_an_uninterrupted_one(
    straight: tuple[RunDir, Path], small_sites: list[Path], tmp_path: Path
) -> None:
    store, _ = straight
    run_dir = tmp_path / "resumed"
    shutil.copytree(store.path, run_dir)
    (run_dir / "checkpoints" / "round-0002.pt").unlink()  # the sites' round-2 files stay, stale
    resumed = simulate(scaffold_run(run_dir, small_sites[:2], resume=True), timeout=300)
    a = torch.load(store.checkpoint_path(2), weights_only=True)
    b = torch.load(resumed.checkpoint_path(2), weights_only=True)
    assert set(a["state_dict"]) == set(b["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["round_state"]["c"][k], b["round_state"]["c"][k]) for k in a["round_state"]["c"])
