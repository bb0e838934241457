"""``fedsense metrics show``: the printed numbers are exactly the store's, in every format."""

from __future__ import annotations

import csv
import io
import json
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest

from common.errors import FedSenseError
from server.store import RunDir
from server.viewer.run_view import COLUMNS
from server.viewer.table import show

SITES = ("site-a", "site-b", "__global__")


def metrics_for(round: int, site_index: int, phase: str) -> dict[str, float | None]:
    """Distinct, awkward (non-round) values so a mix-up of cells or any rounding shows."""
    base = round + site_index / 10
    if phase == "train":
        return {"loss": 0.5 / base + 1e-9}
    return {"loss": 0.25 / base, "psnr": 24.123456789 + base, "ssim": 0.7 + base / 100, "nmse": 0.031 / base}


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    """Three rounds of a two-site run, still writing: round 3's last line is half written."""
    run = RunDir(tmp_path / "run")
    run.init({"name": "table-demo", "strategy": "fedavg", "num_rounds": 5}, resume=False)
    for round in (1, 2, 3):
        run.append_metrics(
            [
                {
                    "run": "table-demo",
                    "round": round,
                    "phase": phase,
                    "site": site,
                    "time": 1.7e9 + round,
                    "num_examples": 10 + i,
                    "metrics": metrics_for(round, i, phase),
                }
                for phase in ("train", "evaluate")
                for i, site in enumerate(SITES)
            ]
        )
    with open(run.metrics_path, "a") as stream:
        stream.write('{"run": "table-demo", "round": 4, "phase": "tr')
    return run


def expected_rows(run: RunDir) -> list[dict[str, Any]]:
    return [
        {
            "round": r["round"],
            "phase": r["phase"],
            "site": r["site"],
            "num_examples": r["num_examples"],
            **{m: r["metrics"].get(m) for m in ("loss", "psnr", "ssim", "nmse", "ssdu-loss")},
        }
        for r in run.read_metrics()
    ]


def test_json_matches_the_store_exactly(run: RunDir) -> None:
    out = io.StringIO()
    show(run.path, fmt="json", out=out)
    rows = json.loads(out.getvalue())
    assert [list(row) for row in rows] == [list(COLUMNS)] * 18
    key = itemgetter("round", "phase", "site")
    assert sorted(rows, key=key) == sorted(expected_rows(run), key=key)
    assert [row["site"] for row in rows[:3]] == ["site-a", "site-b", "__global__"]
    assert rows[0]["phase"] == "train" and rows[3]["phase"] == "evaluate"


def test_csv_matches_the_store_exactly(run: RunDir) -> None:
    out = io.StringIO()
    show(run.path, fmt="csv", out=out, phase="evaluate")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert out.getvalue().splitlines()[0] == "round,phase,site,num_examples,loss,psnr,ssim,nmse,ssdu-loss"
    expected = {(r["round"], r["site"]): r for r in expected_rows(run) if r["phase"] == "evaluate"}
    assert len(rows) == len(expected) == 9
    for row in rows:
        want = expected[(int(row["round"]), row["site"])]
        assert int(row["num_examples"]) == want["num_examples"]
        for metric in ("loss", "psnr", "ssim", "nmse"):
            assert float(row[metric]) == want[metric]  # exact: CSV keeps the shortest round-trip repr


def test_csv_leaves_missing_metrics_empty(run: RunDir) -> None:
    out = io.StringIO()
    show(run.path, fmt="csv", out=out, phase="train")
    first = next(csv.DictReader(io.StringIO(out.getvalue())))
    assert first["psnr"] == first["ssim"] == first["nmse"] == ""
    assert float(first["loss"]) == metrics_for(1, 0, "train")["loss"]


def test_table_shows_status_sites_global_and_values(run: RunDir) -> None:
    out = io.StringIO()
    show(run.path, out=out)
    text = out.getvalue()
    assert "table-demo (fedavg)" in text and "status running" in text and "rounds evaluated 3/5" in text
    assert "evaluate · PSNR (dB)" in text and "train · loss" in text
    header = next(line for line in text.splitlines() if "site-a" in line)
    assert header.index("site-a") < header.index("site-b") < header.index("global")
    psnr_round2_site_b = metrics_for(2, 1, "evaluate")["psnr"]
    assert f"{psnr_round2_site_b:.2f}" in text


def test_table_follows_status_and_newest_duplicate(run: RunDir) -> None:
    record = run.read_metrics()[-1] | {"metrics": {"psnr": 42.424242, "loss": 0.1, "ssim": 0.9, "nmse": 0.01}}
    run.append_metrics([record])  # a resumed run redoing round 3's global evaluation
    run.set_status("finished")
    out = io.StringIO()
    show(run.path, out=out, phase="evaluate", metrics=["psnr"])
    text = out.getvalue()
    assert "status finished" in text and "42.42" in text and "SSIM" not in text and "train" not in text


def test_table_says_which_sites_a_finished_run_went_without(run: RunDir) -> None:
    run.set_status("finished")
    run.mark_finished_without({"site-b": ["train 2", "evaluate 2"]})
    out = io.StringIO()
    show(run.path, out=out)
    text = " ".join(out.getvalue().split())
    assert "status finished-without-sites" in text
    assert "finished-without-sites: the model never saw every site's data (site-b missed train 2, evaluate 2)" in text


def _table_text(run: RunDir) -> str:
    out = io.StringIO()
    show(run.path, out=out)
    return " ".join(out.getvalue().split())


def test_table_says_why_a_run_failed_and_how_an_interrupted_one_resumes(run: RunDir, tmp_path: Path) -> None:
    """The reason and the last complete round are where set_status records them (``status_detail``)."""
    run.set_status("failed", error="site-b: data/b/scan.h5: truncated file [kspace]")
    assert "failed: site-b: data/b/scan.h5: truncated file [kspace]" in _table_text(run)  # no markup eaten
    run.mark_interrupted("run the same command again")  # no checkpoint: nothing complete to continue from
    assert "interrupted before any round was complete: run the same `fedsense simulate` command again" in _table_text(
        run
    )
    run.set_status("interrupted", last_complete_round=2, resume="run the same command again")
    assert (
        "interrupted after round 2, the last complete one: run the same `fedsense simulate` command again "
        "(same --run-dir and options, resume = true: the default) to resume with round 3"
    ) in _table_text(run)
    baseline = RunDir(tmp_path / "baseline")
    baseline.init({"name": "local", "baseline": "local"}, resume=False)
    baseline.set_status("interrupted", last_complete_round=1, resume="run the same command again")
    assert (
        "interrupted after round 1, the last complete one: run the same `fedsense baseline local` command again "
        "(same --run-dir and options) to resume with round 2"
    ) in _table_text(baseline)


def test_bad_arguments_and_missing_run(run: RunDir, tmp_path: Path) -> None:
    with pytest.raises(FedSenseError, match="format must be"):
        show(run.path, fmt="xml", out=io.StringIO())
    with pytest.raises(FedSenseError, match="unknown metric"):
        show(run.path, out=io.StringIO(), metrics=["accuracy"])
    with pytest.raises(FedSenseError, match="no such run directory"):
        show(tmp_path / "nope", out=io.StringIO())


def test_self_supervised_sites_are_marked_with_their_heldout_loss(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "mixed")
    run.init({"name": "mixed", "strategy": "fedavg"}, resume=False)
    run.append_metrics(
        [
            {
                "run": "mixed",
                "round": 1,
                "phase": "evaluate",
                "site": "site-a",
                "time": 1.7e9,
                "num_examples": 4,
                "metrics": {"psnr": 30.0, "ssdu-loss": 0.61234},
                "supervision": "self",
            },
            {
                "run": "mixed",
                "round": 1,
                "phase": "evaluate",
                "site": "site-b",
                "time": 1.7e9,
                "num_examples": 4,
                "metrics": {"psnr": 31.0},
            },
        ]
    )
    out = io.StringIO()
    show(run.path, out=out)
    text = out.getvalue()
    assert "site-a (self)" in text and "site-b (self)" not in text
    assert "held-out k-space loss" in text and "0.6123" in text
    assert "self-supervised site (SSDU)" in text
