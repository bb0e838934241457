"""bench.budget runs end to end on a tiny budget: its run config is bench.quality's, so a change there must not
break it (it once called bench.quality.run_config with arguments that function no longer took)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import budget

pytestmark = pytest.mark.slow


def test_budget_bench_prints_every_checkpoint_and_the_flower_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget.main(
        ["--out", str(tmp_path / "b"), "--checkpoints", "2", "3", "--models", "Unrolled-DC", "--subjects", "4"]
        + ["--slices", "2", "--local-steps", "1"]
    )
    out = capsys.readouterr().out
    rows = re.findall(r"^\| Unrolled-DC \| (\d) \| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out, re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [("2", "2"), ("3", "3")]  # rounds and steps per site, per checkpoint
    flower = re.search(r"^\| Unrolled-DC \| 2 \| ([\d.e+-]+) \|", out, re.MULTILINE)
    # The emulation follows the real Flower run to float rounding, into round 2 (each site's Adam state kept,
    # fresh augmented masks, the ClientApp's precision): one step of Adam at lr 1e-3 moves a weight ~1e-3.
    assert flower is not None and float(flower.group(1)) < 1e-5, flower
    config = budget.parse_args(["--checkpoints", "3", "1"])
    assert config.max_rounds == 3 and config.patience == 0  # a fixed budget: no early stop
