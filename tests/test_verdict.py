"""``fedsense verdict``: a site's best federated model against its own local model, with a CI and a verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.personalise import FINETUNED_FILE
from common.runconfig import RunConfig
from server.baseline import Baseline
from server.cli import main
from server.verdict import verdicts


def test_errors_name_the_bad_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["verdict", str(missing), "--local", str(tmp_path)]) == 2
    assert f"{missing}: federated run directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["verdict", str(empty), "--local", str(tmp_path)]) == 2
    assert f"{empty / 'config.json'}: not found" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["verdict", str(empty), "--local", str(tmp_path), "--site-state-dir", str(missing)]) == 2
    assert f"{empty / 'config.json'}: not found" in capsys.readouterr().err  # the run is checked first


@pytest.mark.slow
def test_verdict_on_real_runs_and_a_personalised_model_equal_to_the_local_one(
    small_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(kind: str) -> Path:
        config = RunConfig.from_flat(
            {
                "name": kind,
                "num-server-rounds": 2,
                "model": "unet",
                "model-args": '{"chans": 8, "num_pool_layers": 2}',
                "local-steps": 2,
                "batch-size": 2,
                "sites": ",".join(map(str, small_sites)),
                "run-dir": str(tmp_path / kind),
            }
        )
        return Baseline(kind, config).execute().path

    local, pooled = run("local"), run("centralized")
    # A local run is not a federated one, and a pooled run is not a local one: both refused, naming the dir.
    with pytest.raises(Exception, match=f"{local}: is a 'local' baseline run"):
        verdicts(local, local)
    with pytest.raises(Exception, match=f"{pooled}: not a local baseline run"):
        verdicts(pooled, pooled)
    # site-a's "personalised" model is its own local model: the gain must be exactly 0, so "no benefit".
    rows = {r.site: r for r in verdicts(pooled, local)}
    a = rows["site-a"]
    state = {
        k.split("/", 1)[1]: v
        for k, v in torch.load(local / "checkpoints" / f"round-{a.local_round:04d}.pt", weights_only=True)[
            "state_dict"
        ].items()
        if k.startswith("site-a/")
    }
    (pooled / "site-state" / "site-a").mkdir(parents=True)
    torch.save({"state_dict": state}, pooled / "site-state" / "site-a" / FINETUNED_FILE)
    assert (
        main(
            [
                "verdict",
                str(pooled),
                "--local",
                str(local),
                "--site",
                "site-a",
                "--site-state-dir",
                str(pooled / "site-state"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| site-a | personalised (fine-tuned) |" in out and "+0.00 [+0.00, +0.00]" in out and "no benefit" in out
    assert set(rows) == {"site-a", "site-b", "site-c"}
    for r in rows.values():
        assert r.federated.startswith("global (round ") and r.verdict in (
            "join",
            "no benefit",
            "harmful",
            "too few subjects",
        )
        assert r.gain.low <= r.gain.mean <= r.gain.high and r.gain.subjects >= 1
        assert r.gain.mean == pytest.approx(r.federated_psnr - r.local_psnr, abs=1e-9)
