"""evaluate-with-train: one message per site and round, the same numbers as separate evaluation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.simulate import simulate
from server.store import GLOBAL_SITE, RunDir
from tests.test_federation import small_run

pytestmark = pytest.mark.slow


def evaluations(store: RunDir) -> dict[tuple[int, str], dict]:
    return {(r["round"], r["site"]): r for r in store.read_metrics(dedupe=True) if r["phase"] == "evaluate"}


def test_carried_evaluation_equals_separate_evaluation(small_sites: list[Path], tmp_path: Path) -> None:
    common = {"strategy": "fedavg", "local-steps": 2, "augment": False}
    separate = simulate(small_run(small_sites, tmp_path / "separate", rounds=2, **common), timeout=900)
    carried = simulate(
        small_run(small_sites, tmp_path / "carried", rounds=2, **common, **{"evaluate-with-train": True}), timeout=900
    )
    a, b = evaluations(separate), evaluations(carried)
    sites = {"site-a", "site-b", "site-c", GLOBAL_SITE}
    assert set(a) == set(b) == {(rnd, site) for rnd in (0, 1, 2) for site in sites}
    for key, record in a.items():
        for metric in ("psnr", "ssim", "nmse"):
            assert b[key]["metrics"][metric] == pytest.approx(record["metrics"][metric], rel=1e-5), (key, metric)
    # Rounds 0 and 1 rode on the next round's training messages; the last round was evaluated on its own.
    assert [b[(rnd, GLOBAL_SITE)].get("carried_by") for rnd in (0, 1, 2)] == ["round 1 train", "round 2 train", None]
    train = [r for r in carried.read_metrics() if r["phase"] == "train" and r["site"] != GLOBAL_SITE]
    assert train and not [k for r in train for k in r["metrics"] if k.startswith("eval/")]
    assert carried.read_config()["status"] == "finished" and carried.latest_checkpoint()[0] == 2
