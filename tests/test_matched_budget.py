"""bench.matched_budget's round selection: the best validation round within a cap, read from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.matched_budget import best_within, site_psnr
from common.errors import ConfigError
from server.store import site_record


def test_best_within_respects_the_cap_and_takes_the_earliest_tie() -> None:
    values = {1: 20.0, 2: 22.0, 3: 22.0, 4: 21.0, 5: 25.0}
    assert best_within(values, 5) == 5
    assert best_within(values, 4) == 2  # rounds 2 and 3 tie: the earlier one, as server.best.best_round
    assert best_within(values, 1) == 1
    with pytest.raises(ConfigError, match="round 0"):
        best_within(values, 0)


def test_site_psnr_reads_evaluate_records_per_site_and_skips_round_0(tmp_path: Path) -> None:
    records = [
        site_record("r", 0, "evaluate", "site-a", 2, {"psnr": 10.0}),
        site_record("r", 1, "train", "site-a", 2, {"loss": 0.1}),
        site_record("r", 1, "evaluate", "site-a", 2, {"psnr": 20.0}),
        site_record("r", 1, "evaluate", "site-a", 2, {"psnr": 21.0}),  # a resumed round's newer record wins
        site_record("r", 1, "evaluate", "__global__", 2, {"psnr": 22.0}),
        site_record("r", 2, "evaluate", "site-a", 2, {"psnr": None}),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert site_psnr(tmp_path) == {"site-a": {1: 21.0}, "__global__": {1: 22.0}}
    with pytest.raises(ConfigError, match="no metrics"):
        site_psnr(tmp_path / "missing")
