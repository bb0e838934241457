"""A real Flower run: simulation SuperLink, ServerApp and ClientApps on three demo sites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import FedSenseError
from common.models import build_model
from common.runconfig import RunConfig
from server.simulate import simulate
from server.store import GLOBAL_SITE, RunDir

pytestmark = pytest.mark.slow

MODEL_ARGS = '{"chans": 8, "num_pool_layers": 2}'


def small_run(sites: list[Path], run_dir: Path, rounds: int, **extra: object) -> RunConfig:
    return RunConfig.from_flat(
        {
            "name": "it",
            "num-server-rounds": rounds,
            "strategy": "fedprox",
            "proximal-mu": 0.01,
            "model": "unet",
            "model-args": MODEL_ARGS,
            "local-steps": 4,
            "batch-size": 2,
            "learning-rate": 3e-3,
            "min-train-nodes": len(sites),
            "min-evaluate-nodes": len(sites),
            "min-available-nodes": len(sites),
            "sites": ",".join(map(str, sites)),
            "run-dir": str(run_dir),
            **extra,
        }
    )


@pytest.fixture(scope="module")
def finished_run(
    small_sites: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[RunDir, Path]:
    run_dir = tmp_path_factory.mktemp("run") / "fedprox"
    audit = run_dir.parent / "egress.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSENSE_AUDIT_LOG", str(audit))
    try:
        # transport-dtype = "fp16": the weights travel as float16 and the updates as float16 changes, so these
        # tests also show that such a run trains (the fp32 default runs in every other federation test).
        store = simulate(
            small_run(small_sites, run_dir, rounds=2, **{"local-steps": 12, "transport-dtype": "fp16"}), timeout=900
        )
    finally:
        mp.undo()
    return store, audit


def test_every_site_and_round_is_recorded_with_checkpoints(finished_run: tuple[RunDir, Path]) -> None:
    store, _ = finished_run
    records = store.read_metrics()
    sites = {"site-a", "site-b", "site-c"}
    for rnd in (1, 2):
        for phase in ("train", "evaluate"):
            got = {r["site"] for r in records if r["round"] == rnd and r["phase"] == phase}
            assert got == sites | {GLOBAL_SITE}, (rnd, phase)
    assert {r["site"] for r in records if r["round"] == 0} == sites | {GLOBAL_SITE}
    # precision = auto (the default; this test session pins it to fp32): each site records what it ran.
    trained = [r for r in records if r["phase"] == "train" and r["site"] != GLOBAL_SITE]
    assert trained and all(r["precision"] == "fp32" for r in trained)
    for rnd in (1, 2):
        payload = torch.load(store.checkpoint_path(rnd), weights_only=True)
        assert payload["round"] == rnd and payload["config"]["model"] == "unet"
    assert store.read_config()["status"] == "finished"
    assert store.read_config()["transport-dtype"] == "fp16"


def test_validation_psnr_after_the_last_round_beats_round_zero(finished_run: tuple[RunDir, Path]) -> None:
    store, _ = finished_run
    glob = {
        r["round"]: r["metrics"] for r in store.read_metrics() if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"
    }
    assert glob[2]["psnr"] > glob[0]["psnr"] + 0.5
    assert glob[2]["ssim"] > glob[0]["ssim"]


def test_global_row_is_the_example_weighted_mean(finished_run: tuple[RunDir, Path]) -> None:
    store, _ = finished_run
    rows = [r for r in store.read_metrics() if r["round"] == 2 and r["phase"] == "evaluate"]
    sites = [r for r in rows if r["site"] != GLOBAL_SITE]
    glob = next(r for r in rows if r["site"] == GLOBAL_SITE)
    total = sum(r["num_examples"] for r in sites)
    expected = sum(r["metrics"]["psnr"] * r["num_examples"] for r in sites) / total
    assert glob["metrics"]["psnr"] == pytest.approx(expected) and glob["num_examples"] == total


def test_sites_send_only_model_arrays_and_scalar_metrics(finished_run: tuple[RunDir, Path]) -> None:
    """The privacy boundary: every message a site sent, as its egress audit log recorded it."""
    _, audit = finished_run
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    # 3 sites x (evaluate round 0 + 2 x (train + evaluate)) messages.
    assert len(entries) == 15
    model_shapes = {k: list(v.shape) for k, v in build_model("unet", **json.loads(MODEL_ARGS)).state_dict().items()}
    for entry in entries:
        assert "error" not in entry
        for record in entry["arrays"].values():
            assert {k: a["shape"] for k, a in record.items()} == model_shapes
        for record in entry["metrics"].values():
            assert all(isinstance(v, (int, float)) for v in record.values())
        assert set(entry["configs"]) <= {"site"}
        for record in entry["configs"].values():
            for value in record.values():
                assert isinstance(value, str) and "/" not in value and "\\" not in value and len(value) < 64
    assert sum(1 for e in entries if e["arrays"]) == 6  # only train replies carry weights


def test_resume_continues_after_the_last_checkpoint(small_sites: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "resumed"
    simulate(small_run(small_sites[:2], run_dir, rounds=1), timeout=900)
    store = simulate(small_run(small_sites[:2], run_dir, rounds=2), timeout=900)
    records = store.read_metrics()  # raw, not deduplicated: every (round, phase, site) exactly once
    keys = [(r["round"], r["phase"], r["site"]) for r in records]
    assert len(keys) == len(set(keys))
    assert sorted({r["round"] for r in records}) == [0, 1, 2]
    assert store.latest_checkpoint()[0] == 2
    # Resuming with another model is another run: refused before Flower starts, the keys named.
    with pytest.raises(FedSenseError, match="cannot resume: the run in this directory differs in model-args"):
        simulate(small_run(small_sites[:2], run_dir, rounds=3, **{"model-args": '{"chans": 4}'}), timeout=900)
    assert store.latest_checkpoint()[0] == 2 and store.read_config()["status"] == "finished"
