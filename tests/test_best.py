"""Best-round tracking: selection direction per metric, best.json, patience, and how the viewers mark it."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import FedSenseError
from server.best import BestTracker, best_round, is_better
from server.store import GLOBAL_SITE, RunDir
from server.viewer import dashboard
from server.viewer.table import show
from tests.conftest import global_values


def _eval(run: RunDir, rnd: int, **metrics: float) -> None:
    run.append_metrics(
        [
            {
                "run": "r",
                "round": rnd,
                "phase": "evaluate",
                "site": GLOBAL_SITE,
                "time": 0.0,
                "num_examples": 4,
                "metrics": metrics,
            }
        ]
    )


def _checkpoint(run: RunDir, rnd: int) -> None:
    run.save_checkpoint(rnd, {"w": torch.full((2,), float(rnd))}, {"model": "unet"})


@pytest.fixture()
def run(tmp_path: Path) -> RunDir:
    store = RunDir(tmp_path / "run")
    store.init({"name": "r", "num-server-rounds": 5}, resume=False)
    return store


@pytest.mark.parametrize("seed", range(5))
def test_best_round_matches_argmax_for_psnr_and_argmin_for_nmse(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=9)
    rounds = {i + 1: float(v) for i, v in enumerate(values)}
    assert best_round(rounds, "psnr") == int(np.argmax(values)) + 1
    assert best_round(rounds, "ssim") == int(np.argmax(values)) + 1
    assert best_round(rounds, "nmse") == int(np.argmin(values)) + 1


def test_ties_and_non_finite_values() -> None:
    assert best_round({1: 2.0, 2: 2.0, 3: float("nan")}, "psnr") == 1
    assert best_round({}, "psnr") is None
    assert not is_better("psnr", float("nan"), None)
    assert is_better("nmse", 0.1, 0.2) and not is_better("nmse", 0.2, 0.1)
    assert is_better("psnr", 30.0, 29.0) and not is_better("psnr", 29.0, 30.0)


def test_tracker_writes_best_json_and_stops_after_patience(run: RunDir) -> None:
    tracker = BestTracker(run, "nmse", patience=2)
    assert run.best() is None
    history = {1: 0.30, 2: 0.10, 3: 0.20, 4: 0.15}
    stopped_at = None
    for rnd, value in history.items():
        _eval(run, rnd, nmse=value, psnr=30.0 - rnd)
        _checkpoint(run, rnd)
        tracker.update(rnd, {"nmse": value})
        if tracker.exhausted:
            stopped_at = rnd
            break
    assert stopped_at == 4  # rounds 3 and 4 did not beat round 2's lower NMSE
    best = run.best()
    assert best == {"round": 2, "metric": "nmse", "value": 0.10, "checkpoint": "checkpoints/round-0002.pt"}
    payload = torch.load(run.path / best["checkpoint"], weights_only=True)
    assert payload["round"] == 2 and torch.equal(payload["state_dict"]["w"], torch.full((2,), 2.0))
    assert best["round"] == best_round(global_values(run, "nmse"), "nmse")
    assert "patience 2" in tracker.stop_detail()["early_stop"]


def test_patience_zero_never_stops_and_resume_keeps_the_count(run: RunDir) -> None:
    never = BestTracker(run, "psnr", patience=0)
    for rnd in range(1, 5):
        _checkpoint(run, rnd)
        never.update(rnd, {"psnr": 10.0 if rnd == 1 else 5.0})
    assert not never.exhausted and never.stale == 3
    resumed = BestTracker(run, "psnr", patience=4)
    resumed.resume(last_round=4)
    assert resumed.best is not None and resumed.best["round"] == 1 and resumed.stale == 3
    _checkpoint(run, 5)
    resumed.update(5, {"psnr": 1.0})
    assert resumed.exhausted
    other_metric = BestTracker(run, "ssim", patience=4)
    other_metric.resume(last_round=5)
    assert other_metric.best is None


def test_best_json_needs_the_checkpoint_and_rejects_bad_files(run: RunDir) -> None:
    with pytest.raises(FedSenseError, match="no checkpoint"):
        run.write_best(3, "psnr", 20.0)
    run.best_path.write_text('{"round": "x"}')
    with pytest.raises(FedSenseError, match=r"best.json"):
        run.best()
    with pytest.raises(FedSenseError, match="select-metric"):
        BestTracker(run, "loss", patience=0)


def test_metrics_show_and_dashboard_mark_the_best_round(run: RunDir) -> None:
    tracker = BestTracker(run, "psnr", patience=0)
    for rnd, value in ((1, 20.0), (2, 23.5), (3, 22.0)):
        _eval(run, rnd, psnr=value)
        _checkpoint(run, rnd)
        tracker.update(rnd, {"psnr": value})
    out = io.StringIO()
    show(run.path, out=out, metrics=["psnr"])
    text = out.getvalue()
    assert "best round 2 by psnr (23.50)" in text and "checkpoints/round-0002.pt" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    marked = [line for line in rows if "*" in line]
    assert len(marked) == 1 and "*2" in marked[0] and "23.50" in marked[0]

    server = dashboard.start(run.path)
    try:
        with urllib.request.urlopen(server.url + "api/metrics", timeout=10) as response:
            data = json.load(response)
        page = urllib.request.urlopen(server.url, timeout=10).read().decode()
    finally:
        server.stop()
    assert data["best"]["round"] == 2
    assert 'id="best-round"' in page and "best-marker" in page


def test_fine_tuning_starts_from_the_best_round_not_the_last(tmp_path: Path) -> None:
    """After an early stop the sites fine-tune the selected model, not the last round's."""
    from flwr.app import ArrayRecord

    from server.app import _fine_tune_start

    store = RunDir(tmp_path / "run")
    store.init({"name": "x"}, resume=False)
    weights = {rnd: {"w": torch.full((3,), float(rnd))} for rnd in (1, 2, 3)}
    for rnd, state in weights.items():
        store.save_checkpoint(rnd, state, {"name": "x"})
    last_arrays = ArrayRecord(weights[3])
    assert _fine_tune_start(store, 3, last_arrays) == (last_arrays, 3)  # no best.json yet: the last model
    store.write_best(1, "psnr", 30.0)
    start, rnd = _fine_tune_start(store, 3, last_arrays)
    assert torch.equal(start.to_torch_state_dict()["w"], weights[1]["w"]) and rnd == 1  # the sites' state round
    store.write_best(3, "psnr", 31.0)
    assert _fine_tune_start(store, 3, last_arrays) == (last_arrays, 3)


def _site_evals(run: RunDir, rnd: int, sites: dict[str, float]) -> None:
    """Round ``rnd``'s validation PSNR at each site, and their unweighted mean as the global record."""
    records = [
        {
            "run": "r",
            "round": rnd,
            "phase": "evaluate",
            "site": s,
            "time": 0.0,
            "num_examples": 4,
            "metrics": {"psnr": v},
        }
        for s, v in sites.items()
    ]
    run.append_metrics(records)
    _eval(run, rnd, psnr=float(np.mean(list(sites.values()))))


def _first_stop(curves: dict[str, list[float]], patience: int) -> int:
    """The test's own rule: the first round after which no curve (sites and their mean) has improved on its
    best for ``patience`` rounds."""
    series = {**curves, "mean": list(np.mean(list(curves.values()), axis=0))}
    for last in range(1, len(series["mean"]) + 1):
        if all(last - (int(np.argmax(v[:last])) + 1) >= patience for v in series.values()):
            return last
    return 0


def test_every_site_rule_waits_for_a_site_still_improving_and_resumes_the_same(run: RunDir) -> None:
    """The mean peaks at round 2, site-b improves until round 5: the global rule stops at round 4
    (patience 2), every-site at round 7; a tracker resumed after round 5 replays each site's count."""
    curves = {
        "site-a": [30.0, 32.0, 31.0, 30.0, 29.0, 29.5, 29.0],
        "site-b": [20.0, 20.5, 20.7, 20.9, 21.0, 20.9, 20.8],
    }
    assert _first_stop(curves, 2) == 7
    mean_only, every = BestTracker(run, "psnr", 2), BestTracker(run, "psnr", 2, every_site=True)
    stops: dict[str, int] = {}
    for rnd in range(1, 8):
        sites = {s: v[rnd - 1] for s, v in curves.items()}
        _site_evals(run, rnd, sites)
        _checkpoint(run, rnd)
        mean = float(np.mean(list(sites.values())))
        for name, tracker in (("global", mean_only), ("every-site", every)):
            tracker.update(rnd, {"psnr": mean}, {s: {"psnr": v} for s, v in sites.items()})
            if tracker.exhausted:
                stops.setdefault(name, rnd)
        if rnd == 5:
            resumed = BestTracker(run, "psnr", 2, every_site=True)
            resumed.resume(last_round=5)
            assert {s: (c.best_round, c.stale) for s, c in resumed.sites.items()} == {
                "site-a": (2, 3),
                "site-b": (5, 0),
            }
            assert not resumed.exhausted
    assert stops == {"global": 4, "every-site": 7}
    detail = every.stop_detail()["early_stop"]
    assert "any site's own" in detail and "site-a best round 2" in detail and "site-b best round 5" in detail
    assert run.best() is not None and run.best()["round"] == 2  # best.json still follows the mean


def test_every_site_rule_counts_a_site_left_out_of_a_round_as_not_improving(run: RunDir) -> None:
    tracker = BestTracker(run, "psnr", 1, every_site=True)
    _checkpoint(run, 1)
    tracker.update(1, {"psnr": 25.0}, {"site-a": {"psnr": 30.0}, "site-b": {"psnr": 20.0}})
    _checkpoint(run, 2)
    tracker.update(2, {"psnr": 24.0}, {"site-a": {"psnr": 29.0}})  # site-b was not sampled for evaluation
    assert tracker.sites["site-b"].stale == 1 and tracker.exhausted
