"""bench.quality --quick runs the full comparison's code path end to end (its numbers are not checked)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import quality

pytestmark = pytest.mark.slow


def test_quick_mode_runs_every_stage_and_reports_targets_with_cis(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    targets = quality.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("zero-filled", "CS L1-wavelet", "U-Net local", "U-Net centralized (pooled)",
                "U-Net centralized (site-balanced)", "U-Net FedAvg", "U-Net FedAvg + fine-tune"):
        assert f"| {row} |" in out
    assert "site-d" in out  # the low-data scenario's fourth site
    # Every learned method stopped at or before the budget and was selected on a validation round.
    runs = tmp_path / "R4" / "runs"
    for name in ("unet-centralized", "unet-centralized-balanced", "unet-fedavg"):
        assert (runs / name / "best.json").is_file()
    # The personalised row's models are the sites' own fine-tuned files, never a shared checkpoint.
    for site in ("site-a", "site-b", "site-c", "site-d"):
        assert (runs / "unet-fedavg" / "site-state" / site / "finetuned.pt").is_file()
    comparisons = [row[1] for row in targets]
    assert sum("local at site-" in c for c in comparisons) == 4
    assert any("held-out real MR" in c for c in comparisons)
    for row in targets:
        mean, low, high = (float(x.strip("[],")) for x in row[3].split())
        assert low <= mean <= high and all(math.isfinite(v) for v in (mean, low, high))
