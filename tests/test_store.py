"""The run directory contract: atomic files, append-only metrics that tolerate a live writer."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.atomic import atomic_write_bytes
from common.errors import FedSenseError
from server.store import RunDir
from tests.sample_files import write_samples

CONFIG = {"strategy": "fedprox", "num_rounds": 3, "run-dir": "runs/x", "model": "unet"}


def record(round: int, site: str = "site-a", phase: str = "evaluate", **metrics: Any) -> dict[str, Any]:
    """A valid metrics record; metric keyword arguments override the defaults."""
    values = {"loss": 0.1, "psnr": 30.0 + round, "ssim": 0.8, "nmse": 0.02} | metrics
    return {
        "run": "demo",
        "round": round,
        "phase": phase,
        "site": site,
        "time": 1_700_000_000.0 + round,
        "num_examples": 8,
        "metrics": values,
    }


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.init(CONFIG, resume=False)
    return run


def test_init_writes_config_with_status_and_refuses_a_different_run(run: RunDir) -> None:
    config = run.read_config()
    assert config["status"] == "running" and config["strategy"] == "fedprox"
    run.init(CONFIG | {"resume": False}, resume=False)  # the same run may be restarted
    with pytest.raises(FedSenseError, match=r"different run.*strategy"):
        run.init(CONFIG | {"strategy": "fedavg"}, resume=False)
    assert run.read_config()["strategy"] == "fedprox"
    # A resume continues the run's checkpoints: a different strategy is another run (issue #13).
    with pytest.raises(FedSenseError, match=r"cannot resume.*differs in strategy"):
        run.init(CONFIG | {"strategy": "fedavg"}, resume=True)
    assert run.read_config()["strategy"] == "fedprox"


def test_set_status_keeps_config_and_nests_details(run: RunDir) -> None:
    run.set_status("failed", error="boom")
    config = run.read_config()
    assert config["status"] == "failed"
    assert config["status_detail"] == {"error": "boom"}
    assert config["model"] == "unet"
    with pytest.raises(FedSenseError, match="status must be"):
        run.set_status("paused")


def test_a_finished_run_without_some_sites_is_marked_so_and_keeps_its_detail(run: RunDir) -> None:
    with pytest.raises(FedSenseError, match="status is 'running'; only a finished run"):
        run.mark_finished_without({"site-c": ["train 1"]})
    run.set_status("finished", early_stop="no improvement")
    run.mark_finished_without({"site-c": ("evaluate 0", "train 1")})
    config = run.read_config()
    assert config["status"] == "finished-without-sites"
    assert config["status_detail"] == {
        "early_stop": "no improvement",
        "missed_sites": {"site-c": ["evaluate 0", "train 1"]},
    }


def test_append_read_round_trip(run: RunDir) -> None:
    batch = [record(1), record(1, "site-b"), record(1, "__global__")]
    run.append_metrics(batch)
    run.append_metrics([record(2, phase="train", psnr=None)])
    got = run.read_metrics()
    assert got == batch + [record(2, phase="train", psnr=None)]
    assert run.metrics_path.read_text().count("\n") == 4


def test_partial_last_line_is_tolerated_and_cut_on_next_append(run: RunDir, caplog: pytest.LogCaptureFixture) -> None:
    run.append_metrics([record(1)])
    with open(run.metrics_path, "a") as stream:
        stream.write('{"run": "demo", "round": 2, "pha')
    assert run.read_metrics() == [record(1)]
    with caplog.at_level(logging.WARNING, logger="server.store"):
        run.append_metrics([record(2)])
    assert "partial last line" in caplog.text
    assert run.read_metrics() == [record(1), record(2)]


def test_corrupt_middle_line_names_file_and_line(run: RunDir) -> None:
    run.append_metrics([record(1)])
    with open(run.metrics_path, "a") as stream:
        stream.write("not json\n")
    run.append_metrics([record(2)])
    with pytest.raises(FedSenseError, match=r"metrics\.jsonl:2: invalid metrics line"):
        run.read_metrics()


def test_dedupe_keeps_the_last_record_per_round_phase_site(run: RunDir) -> None:
    run.append_metrics([record(1), record(2), record(2, "__global__")])
    run.append_metrics([record(2, psnr=99.0), record(3)])
    got = run.read_metrics(dedupe=True)
    assert [(r["round"], r["site"], r["metrics"]["psnr"]) for r in got] == [
        (1, "site-a", 31.0),
        (2, "__global__", 32.0),
        (2, "site-a", 99.0),
        (3, "site-a", 33.0),
    ]
    assert len(run.read_metrics()) == 5


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (record(1, psnr=math.nan), "psnr.*finite"),
        (record(1, psnr=math.inf), "psnr.*finite"),
        ({k: v for k, v in record(1).items() if k != "site"}, "misses key.*site"),
        (record(1, phase="test"), "phase"),
        (record(1) | {"round": True}, "round"),
        (record(1, psnr="30"), "psnr"),
    ],
)
def test_invalid_records_are_rejected_and_nothing_is_written(run: RunDir, bad: dict[str, Any], reason: str) -> None:
    with pytest.raises(FedSenseError, match=f"record 1: .*{reason}"):
        run.append_metrics([record(1), bad])
    assert run.read_metrics() == []


def test_completed_rounds_need_a_global_evaluate_record(run: RunDir) -> None:
    run.append_metrics([record(1), record(1, "__global__"), record(2, "__global__", phase="train"), record(2)])
    assert run.completed_rounds() == {1}


def test_atomic_checkpoint_ignores_temp_and_unloadable_files(run: RunDir, caplog: pytest.LogCaptureFixture) -> None:
    assert run.latest_checkpoint() is None
    state = {"w": torch.arange(4.0)}
    run.save_checkpoint(1, state, CONFIG)
    run.save_checkpoint(2, {"w": torch.ones(4)}, CONFIG)
    # A crash during round 3's write leaves only the temp file; a torn round 4 fails to load.
    (run.checkpoint_dir / ".round-0003.pt.tmp").write_bytes(b"half a checkpoint")
    (run.checkpoint_dir / "round-0004.pt").write_bytes(b"garbage")
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [
        ".round-0003.pt.tmp",
        "round-0001.pt",
        "round-0002.pt",
        "round-0004.pt",
    ]
    with caplog.at_level(logging.WARNING, logger="server.store"):
        latest = run.latest_checkpoint()
    assert latest is not None
    round, payload = latest
    assert round == 2 and payload["round"] == 2 and payload["config"] == CONFIG
    assert torch.equal(payload["state_dict"]["w"], torch.ones(4))
    assert "round-0004.pt: skipping unreadable checkpoint" in caplog.text


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_samples_round_trip_per_site_and_latest(run: RunDir) -> None:
    assert run.latest_samples() is None
    rng = np.random.default_rng(0)
    images = rng.random((3, 2, 8, 8))
    write_samples(run, 1, "site-a", *images, psnr=[30.0, 31.0], ssim=0.9)
    write_samples(run, 2, "site-b", *images[:, 0], psnr=28.0, ssim=0.7)
    write_samples(run, 2, "site-a", *images, psnr=[30.0, 31.0], ssim=0.9)
    (run.samples_dir / "round-0002" / ".site-c.npz.x1y2.tmp").write_bytes(b"interrupted write")
    (run.samples_dir / "round-0003").mkdir()  # a round whose samples are not written yet
    latest = run.latest_samples()
    assert latest is not None and latest.round == 2 and latest.path == run.samples_dir / "round-0002"
    assert list(latest.sites) == ["site-a", "site-b"]
    a, b = latest.sites["site-a"], latest.sites["site-b"]
    assert a.recon.dtype == np.float32 and a.recon.shape == (2, 8, 8)
    np.testing.assert_allclose(a.target, images[2].astype(np.float32))
    np.testing.assert_array_equal(a.psnr, [30.0, 31.0])
    np.testing.assert_array_equal(a.ssim, [0.9, 0.9])
    assert b.zero_filled.shape == (1, 8, 8) and b.psnr.tolist() == [28.0]


def test_samples_follow_the_configured_sample_dir(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.init(CONFIG | {"sample-dir": str(tmp_path / "site-local")}, resume=False)
    path = write_samples(run, 4, "site-a", *np.ones((3, 1, 4, 4)), psnr=1.0, ssim=1.0)
    assert path == tmp_path / "site-local" / "round-0004" / "site-a.npz"
    latest = run.latest_samples()
    assert latest is not None and latest.round == 4 and list(latest.sites) == ["site-a"]


@pytest.mark.parametrize(
    ("site", "images", "psnr", "reason"),
    [
        ("site/c", (np.ones((8, 8)),) * 3, 1.0, "site name"),
    ],
)
def test_bad_samples_are_rejected(
    run: RunDir, site: str, images: tuple[np.ndarray, ...], psnr: Any, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        write_samples(run, 2, site, *images, psnr=psnr, ssim=1.0)
    assert run.latest_samples() is None


def test_read_config_errors_name_the_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(FedSenseError, match=r"config.json: not found"):
        run.read_config()
    run.config_path.write_text(json.dumps([1]))
    with pytest.raises(FedSenseError, match=r"config.json: must hold a JSON object"):
        run.read_config()


def test_weighted_mean_weights_by_examples_and_skips_missing_metrics() -> None:
    from server.store import weighted_mean

    records = [
        {"num_examples": 1, "metrics": {"psnr": 20.0, "loss": 1.0}},
        {"num_examples": 3, "metrics": {"psnr": 24.0}},
    ]
    # Independent hand computation: (1*20 + 3*24) / 4, and loss from the one site that reports it.
    assert weighted_mean(records) == {"loss": 1.0, "psnr": 23.0}
