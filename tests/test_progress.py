"""Round progress read from a run directory: simulate and baseline report through the same follower."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from server.cli import main
from server.progress import reporting_rounds
from server.store import GLOBAL_SITE, RunDir


def record(rnd: int, site: str, phase: str = "evaluate", psnr: float = 20.0) -> dict:
    rec = {
        "run": "r",
        "round": rnd,
        "phase": phase,
        "site": site,
        "time": time.time(),
        "num_examples": 2,
        "metrics": {"psnr": psnr, "ssim": 0.5, "nmse": 0.1},
    }
    if site == GLOBAL_SITE:
        rec.update(sites=["site-a"], rejected=[], seconds=1.0, overhead_seconds=0.1)
    return rec


def test_each_finished_round_is_reported_once_as_it_lands(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    store.init({"name": "r"}, resume=False)
    lines: list[str] = []

    def writer() -> None:
        for rnd in range(3):
            store.append_metrics([record(rnd, "site-a", psnr=20 + rnd), record(rnd, GLOBAL_SITE, psnr=20 + rnd)])
            store.append_metrics([record(rnd, GLOBAL_SITE, phase="train")])
            time.sleep(0.05)

    with reporting_rounds(store, 2, lines.append, interval=0.02):
        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
    assert lines == [f"round {r}/2: PSNR {20 + r:.2f} dB, SSIM 0.5000, NMSE 0.1000 (site-a)" for r in range(3)]


@pytest.mark.slow
def test_the_baseline_command_reports_every_round(
    small_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        [
            "baseline",
            "local",
            "--sites",
            *map(str, small_sites),
            "--rounds",
            "2",
            "--local-steps",
            "1",
            "--run-dir",
            str(tmp_path / "local"),
            "--set",
            'model-args={"chans": 4, "num_pool_layers": 2}',
        ]
    )
    out = capsys.readouterr().out
    for rnd in (0, 1, 2):
        assert f"round {rnd}/2: PSNR " in out
