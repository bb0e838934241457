"""``metrics show`` and the dashboard name the best round (best.json) and the command that exports it."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest

from common.errors import FedSenseError
from server.best import read_best
from server.store import RunDir
from server.viewer.dashboard import start
from server.viewer.table import show


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.init({"name": "best-demo", "strategy": "fedavg", "num_rounds": 3}, resume=False)
    run.append_metrics(
        [
            {
                "run": "best-demo",
                "round": r,
                "phase": "evaluate",
                "site": "__global__",
                "time": 1.7e9 + r,
                "num_examples": 4,
                "metrics": {"psnr": 20.0 + (r == 2)},
            }
            for r in (1, 2, 3)
        ]
    )
    return run


def _table(run: RunDir) -> str:
    out = io.StringIO()
    show(run.path, fmt="table", out=out)
    return out.getvalue()


def test_table_and_dashboard_show_best_round_and_export_command(run: RunDir) -> None:
    assert "no best round recorded" in _table(run)
    assert "no checkpoint saved: nothing to export yet" in _table(run) and "fedsense export" not in _table(run)
    run.checkpoint_dir.mkdir()
    (run.checkpoint_dir / "round-0003.pt").write_bytes(b"")
    assert f"fedsense export {run.path} --round last --out model/" in " ".join(_table(run).split())
    (run.path / "best.json").write_text(
        json.dumps({"round": 2, "metric": "psnr", "value": 21.0, "checkpoint": "checkpoints/round-0002.pt"})
    )
    text = " ".join(_table(run).split())
    assert "best round 2 by psnr (21.00)" in text and f"fedsense export {run.path} --round best --out model/" in text
    dashboard = start(run.path)
    try:
        with urllib.request.urlopen(dashboard.url + "api/config", timeout=10) as response:
            config = json.loads(response.read())
    finally:
        dashboard.stop()
    assert config["best"]["round"] == 2 and config["best_summary"] == "best round 2 (psnr 21)"
    assert config["export_command"].endswith("--round best --out model/")


def test_the_export_hint_never_names_an_existing_folder(
    run: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export refuses an existing ``--out``: after one export to model/ the hint moves on to a new folder."""
    run.checkpoint_dir.mkdir()
    (run.checkpoint_dir / "round-0003.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert "--round last --out model/" in " ".join(_table(run).split())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"exported earlier")
    assert f"fedsense export {run.path} --round last --out model-2/" in " ".join(_table(run).split())
    (tmp_path / "model-2").write_text("a file in the way")
    text = " ".join(_table(run).split())
    assert "--out model-3/" in text and "--overwrite" not in text


def test_a_broken_best_json_is_named(run: RunDir) -> None:
    (run.path / "best.json").write_text('{"round": "two"}')
    with pytest.raises(FedSenseError, match=r"best.json: needs round"):
        read_best(run.path)
