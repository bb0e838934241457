"""Early stopping and best.json in a real Flower run, and in the baselines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.models import build_model
from common.runconfig import RunConfig
from server.baseline import Baseline
from server.best import best_round
from server.simulate import simulate
from server.store import GLOBAL_SITE, RunDir
from tests.conftest import global_values

pytestmark = pytest.mark.slow

MODEL_ARGS = '{"chans": 8, "num_pool_layers": 2}'
ROUNDS, PATIENCE = 4, 1


def run_config(sites: list[Path], run_dir: Path, **extra: object) -> RunConfig:
    # A learning rate this high makes validation PSNR fall back after an early peak, so patience 1 must
    # stop the run before its last round (training is deterministic for the seed).
    return RunConfig.from_flat(
        {
            "name": "early",
            "num-server-rounds": ROUNDS,
            "strategy": "fedavg",
            "model": "unet",
            "model-args": MODEL_ARGS,
            "local-steps": 3,
            "batch-size": 2,
            "learning-rate": 0.2,
            "min-train-nodes": len(sites),
            "min-evaluate-nodes": len(sites),
            "min-available-nodes": len(sites),
            "sites": ",".join(map(str, sites)),
            "run-dir": str(run_dir),
            "num-samples": 0,
            "patience": PATIENCE,
            "resume": False,
            **extra,
        }
    )


def assert_stopped_early_at_best(store: RunDir, metric: str = "psnr") -> dict:
    """Check the run stopped right after patience ran out, at the best round; return that checkpoint."""
    values = {r: v for r, v in global_values(store, metric).items() if r >= 1}
    last = max(values)
    best = store.best()
    assert best is not None and best["metric"] == metric
    assert best["round"] == best_round(values, metric)  # independent of the tracker's own bookkeeping
    assert last == best["round"] + PATIENCE < ROUNDS  # stopped as soon as patience ran out, not at the end
    assert best["value"] == pytest.approx(values[best["round"]])
    config = store.read_config()
    assert config["status"] == "finished" and "patience 1" in config["status_detail"]["early_stop"]
    payload = torch.load(store.path / best["checkpoint"], weights_only=True)
    assert payload["round"] == best["round"]
    return payload


def test_flower_run_stops_early_and_best_json_points_at_a_loadable_checkpoint(
    small_sites: list[Path], tmp_path: Path
) -> None:
    store = simulate(run_config(small_sites[:2], tmp_path / "fed"), timeout=900)
    payload = assert_stopped_early_at_best(store)
    model = build_model("unet", chans=8, num_pool_layers=2)
    model.load_state_dict(payload["state_dict"])
    assert not store.checkpoint_path(ROUNDS).exists()


def test_pooled_centralized_baseline_keeps_best_json_and_stops_early(small_sites: list[Path], tmp_path: Path) -> None:
    store = Baseline(
        "centralized", run_config(small_sites[:2], tmp_path / "central", **{"select-metric": "nmse"})
    ).execute()
    assert_stopped_early_at_best(store, "nmse")
    trained = [r for r in store.read_metrics() if r["phase"] == "train" and r["site"] == GLOBAL_SITE]
    assert len(trained) == max(global_values(store, "nmse"))


def _trained_rounds(store: RunDir) -> dict[str, list[int]]:
    """site -> the rounds it trained in (the test's own reading of metrics.jsonl)."""
    rounds: dict[str, list[int]] = {}
    for r in store.read_metrics(dedupe=True):
        if r["phase"] == "train" and r["site"] != GLOBAL_SITE:
            rounds.setdefault(r["site"], []).append(r["round"])
    return {site: sorted(set(v)) for site, v in rounds.items()}


def test_local_baseline_stops_once_every_site_has_run_out_of_its_own_patience_and_resumes_so(
    small_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local baseline trains every site until each has gone ``patience`` rounds without a better
    validation PSNR of its own (no site's best round is its last), stopping at the first round where that
    holds; a run interrupted on the way resumes to the straight run's rounds and weights."""
    import server.baseline as baseline

    rounds = 8
    config = run_config(small_sites, tmp_path / "straight", **{"num-server-rounds": rounds, "client-optimizer": "keep"})
    store = Baseline("local", config).execute()
    trained = _trained_rounds(store)
    last = max(max(t) for t in trained.values())
    assert last < rounds and all(t == list(range(1, last + 1)) for t in trained.values())
    records = store.read_metrics(dedupe=True)

    def best_by(site: str, upto: int) -> int:
        values = {
            r["round"]: r["metrics"]["psnr"]
            for r in records
            if r["site"] == site and r["phase"] == "evaluate" and 1 <= r["round"] <= upto
        }
        return best_round(values, "psnr")  # type: ignore[return-value]

    assert all(best_by(site, last) <= last - PATIENCE for site in trained)  # every site had stopped improving
    assert any(best_by(site, last - 1) > last - 1 - PATIENCE for site in trained)  # ... not a round earlier
    detail = store.read_config()["status_detail"]["early_stop"]
    assert "every site stopped improving" in detail and f"patience {PATIENCE}" in detail
    for site in trained:
        assert f"{site} best round {best_by(site, last)}" in detail

    # Interrupted in the round before the last: resumed, it stops where the straight run did, with its weights.
    real_evaluate = baseline.Baseline._evaluate

    def stop(self, rnd, models):  # type: ignore[no-untyped-def]
        if rnd == last - 1:
            raise KeyboardInterrupt
        return real_evaluate(self, rnd, models)

    again = RunConfig.from_flat({**config.to_flat(), "run-dir": str(tmp_path / "stopped")})
    monkeypatch.setattr(baseline.Baseline, "_evaluate", stop)
    with pytest.raises(KeyboardInterrupt):
        Baseline("local", again).execute()
    monkeypatch.setattr(baseline.Baseline, "_evaluate", real_evaluate)
    resumed = Baseline("local", again).execute(resume=True)
    assert _trained_rounds(resumed) == trained
    final, reference = resumed.load_checkpoint(last)["state_dict"], store.load_checkpoint(last)["state_dict"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def _every_site_stop(store: RunDir, metric: str = "psnr") -> int | None:
    """The test's own reading of ``stop-rule = every-site``: the first evaluated round after which neither the
    mean nor any site's own ``metric`` has improved for ``PATIENCE`` rounds (None: never)."""
    series: dict[str, dict[int, float]] = {}
    for r in store.read_metrics(dedupe=True):
        if r["phase"] == "evaluate" and r["round"] >= 1:
            series.setdefault(r["site"], {})[r["round"]] = r["metrics"][metric]
    rounds = sorted(series[GLOBAL_SITE])
    for last in rounds:
        if all(
            last - best_round({k: v for k, v in s.items() if k <= last}, metric) >= PATIENCE  # type: ignore[operator]
            for s in series.values()
        ):
            return last
    return None


@pytest.mark.parametrize("arm", ["fedavg", "centralized"])
def test_every_site_rule_stops_when_neither_the_mean_nor_any_site_improves(
    arm: str, small_sites: list[Path], tmp_path: Path
) -> None:
    """``stop-rule = every-site`` in a real Flower run and in the pooled baseline: the run ends at the first
    round where the rule holds (read independently from metrics.jsonl), best.json still follows the mean."""
    config = run_config(
        small_sites[:2], tmp_path / arm, **{"stop-rule": "every-site", "num-server-rounds": 6, "learning-rate": 0.05}
    )
    store = simulate(config, timeout=900) if arm == "fedavg" else Baseline("centralized", config).execute()
    evaluated = sorted(r for r in global_values(store, "psnr") if r >= 1)
    stop = _every_site_stop(store)
    assert stop is not None and evaluated[-1] == stop  # this config stops early (deterministic for the seed)
    best = store.best()
    assert best is not None and best["round"] == best_round(
        {r: v for r, v in global_values(store, "psnr").items() if r >= 1}, "psnr"
    )
    detail = store.read_config().get("status_detail", {}).get("early_stop", "")
    assert (stop is not None) == ("any site's own" in detail)
