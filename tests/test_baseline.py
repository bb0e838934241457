"""Baselines on the same sites and budget as a federated run, in the same metrics format."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.runconfig import RunConfig
from server import cli
from server.baseline import Baseline
from server.store import GLOBAL_SITE

pytestmark = pytest.mark.slow


def run_config(sites: list[Path], run_dir: Path, name: str) -> RunConfig:
    return RunConfig.from_flat(
        {
            "name": name,
            "num-server-rounds": 2,
            "model": "unet",
            "model-args": '{"chans": 8, "num_pool_layers": 2}',
            "local-steps": 3,
            "batch-size": 2,
            "sites": ",".join(map(str, sites)),
            "run-dir": str(run_dir),
        }
    )


def test_zero_filled_local_and_centralized_write_comparable_runs(small_sites: list[Path], tmp_path: Path) -> None:
    names = {"site-a", "site-b", "site-c"}
    stores = {
        kind: Baseline(kind, run_config(small_sites, tmp_path / kind, kind)).execute()
        for kind in ("zero-filled", "local", "centralized")
    }

    zf = stores["zero-filled"].read_metrics()
    assert {r["site"] for r in zf} == names | {GLOBAL_SITE} and {r["round"] for r in zf} == {0}

    local = stores["local"].read_metrics()
    for rnd in (1, 2):
        steps = {
            r["site"]: r["metrics"]["steps"]
            for r in local
            if r["round"] == rnd and r["phase"] == "train" and r["site"] != GLOBAL_SITE
        }
        assert steps == {n: 3.0 for n in names}
    central = stores["centralized"].read_metrics()
    # Same optimisation budget per round as a federated round: sites x local steps.
    assert [r["metrics"]["steps"] for r in central if r["phase"] == "train"] == [9.0, 9.0]
    for store in stores.values():
        last = max(r["round"] for r in store.read_metrics())
        evals = {r["site"] for r in store.read_metrics() if r["round"] == last and r["phase"] == "evaluate"}
        assert evals == names | {GLOBAL_SITE}
        assert store.read_config()["status"] == "finished"

    # Learning beats no learning on the pooled model after two rounds.
    def final_psnr(store):  # type: ignore[no-untyped-def]
        rows = [r for r in store.read_metrics() if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"]
        return max(rows, key=lambda r: r["round"])["metrics"]["psnr"]

    assert final_psnr(stores["centralized"]) > final_psnr(stores["zero-filled"])
    assert stores["local"].latest_checkpoint()[0] == 2


@pytest.mark.parametrize("kind", ["local", "centralized"])
def test_client_optimizer_keep_carries_adam_state_across_rounds(
    small_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """With ``client-optimizer = keep`` each model's Adam is the same object every round and its step count
    grows round after round (as a federated site's does); with ``reset`` every round starts a fresh Adam."""
    import server.baseline as baseline

    seen: list[tuple[int, int]] = []  # (id of the optimiser, Adam steps done when the round starts)
    real_train = baseline.train

    def spy(model, loader, **kwargs):  # type: ignore[no-untyped-def]
        opt = kwargs.get("optimiser")
        state = opt.state[next(iter(model.parameters()))] if opt is not None else {}
        seen.append((id(opt) if opt is not None else 0, int(state["step"]) if "step" in state else 0))
        return real_train(model, loader, **kwargs)

    monkeypatch.setattr(baseline, "train", spy)
    config = run_config(small_sites[:1], tmp_path / "keep", "keep").to_flat()
    Baseline(kind, RunConfig.from_flat({**config, "client-optimizer": "keep"})).execute()
    assert len({opt for opt, _ in seen}) == 1 and seen[0][0] != 0
    assert [steps for _, steps in seen] == [0, 3]  # round 2 continues round 1's 3 Adam steps
    seen.clear()
    Baseline(kind, RunConfig.from_flat({**config, "run-dir": str(tmp_path / "reset")})).execute()
    assert seen == [(0, 0), (0, 0)]


@pytest.mark.parametrize("kind", ["local", "centralized"])
def test_an_interrupted_baseline_resumes_after_its_last_complete_round(
    small_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Ctrl-C in round 2 (between its training and its evaluation) marks the run interrupted after round 1;
    resumed (what ``fedsense baseline`` does when it finds it), it trains round 2 only and ends with the weights
    of a run that was never stopped (the checkpoint carries the kept Adam state)."""
    import torch

    import server.baseline as baseline

    def config(run_dir: Path) -> RunConfig:
        flat = {
            **run_config(small_sites[:2], run_dir, kind).to_flat(),
            "num-server-rounds": 2,
            "local-steps": 1,
            "client-optimizer": "keep",
            "max-eval-slices": 1,
            "num-samples": 0,
        }
        return RunConfig.from_flat(flat)

    straight = Baseline(kind, config(tmp_path / "straight")).execute()
    real_evaluate = baseline.Baseline._evaluate

    def stop_in_round_2(self, rnd, models):  # type: ignore[no-untyped-def]
        if rnd == 2:
            raise KeyboardInterrupt
        return real_evaluate(self, rnd, models)

    monkeypatch.setattr(baseline.Baseline, "_evaluate", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        Baseline(kind, config(tmp_path / "stopped")).execute()
    monkeypatch.setattr(baseline.Baseline, "_evaluate", real_evaluate)
    stopped = Baseline(kind, config(tmp_path / "stopped")).store
    detail = stopped.read_config()["status_detail"]
    assert stopped.read_config()["status"] == "interrupted" and detail["last_complete_round"] == 1
    kept = stopped.checkpoint_path(1).stat().st_mtime_ns
    assert cli._continues(stopped, kind) and not cli._continues(stopped, "zero-filled")

    trained: list[int] = []
    real_train = baseline.train
    monkeypatch.setattr(
        baseline,
        "train",
        lambda *a, **k: (trained.append(k["batch_loss"].self_supervised.epoch), real_train(*a, **k))[1],
    )
    resumed = Baseline(kind, config(tmp_path / "stopped")).execute(resume=True)
    assert resumed.read_config()["status"] == "finished"
    assert not cli._continues(resumed, kind)
    assert sorted(set(trained)) == [2] and stopped.checkpoint_path(1).stat().st_mtime_ns == kept
    final, reference = resumed.load_checkpoint(2)["state_dict"], straight.load_checkpoint(2)["state_dict"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    rounds = {r["round"] for r in resumed.read_metrics(dedupe=True) if r["phase"] == "evaluate"}
    assert rounds == {0, 1, 2}
