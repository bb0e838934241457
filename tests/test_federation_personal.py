"""Real Flower runs of the server optimisers and personalisation (FedAdam, local layers, fine-tuning, resume).

Three small simulations (two sites, 64², a few steps): a personalised FedAdam run ("personal": local
layers, kept client Adam state, fine-tuning), the same run resumed from its round-1 checkpoint, and
one FedAvg round with the same sites and seeds, whose aggregate is the example-weighted average that
FedAdam's first step must start from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.loaders import load_site, make_loader
from common.models import build_model
from common.personalise import split_state
from common.training import evaluate
from server.simulate import simulate
from server.store import GLOBAL_SITE, RunDir
from tests.test_federation import MODEL_ARGS, small_run

pytestmark = pytest.mark.slow

LOCAL = "unet.up_conv.1.*"  # with 2 pool layers: the last decoder block and the output head
ETA, BETA_1, BETA_2, TAU = 0.01, 0.9, 0.99, 1e-3
PERSONAL = {
    "strategy": "fedadam",
    "proximal-mu": 0.0,
    "server-eta": ETA,
    "server-beta-1": BETA_1,
    "server-beta-2": BETA_2,
    "server-tau": TAU,
    "local-layers": LOCAL,
    "client-optimizer": "keep",
    "fine-tune-steps": 4,
    "fine-tune-eval-every": 2,
    "max-eval-slices": 4,
}


def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the run seed: how the ServerApp builds the initial model
    return build_model("unet", **json.loads(MODEL_ARGS)).state_dict()


def shared_keys() -> set[str]:
    shared, _ = split_state(initial_state(), (LOCAL,))
    return set(shared)


@pytest.fixture(scope="module")
def personal(small_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, Path]:
    run_dir = tmp_path_factory.mktemp("personal") / "run"
    audit = run_dir.parent / "egress.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSENSE_AUDIT_LOG", str(audit))
    try:
        store = simulate(small_run(small_sites[:2], run_dir, rounds=2, **PERSONAL), timeout=900)
    finally:
        mp.undo()
    return store, audit


def test_local_layers_never_leave_the_site(personal: tuple[RunDir, Path]) -> None:
    _, audit = personal
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    types = sorted(e["type"] for e in entries)
    # 2 sites x (evaluate rounds 0-2, train rounds 1-2, one fine-tuning)
    assert types == ["evaluate"] * 6 + ["train"] * 4 + ["train.finetune"] * 2
    for entry in entries:
        assert "error" not in entry
        if entry["type"] == "train":
            (arrays,) = entry["arrays"].values()
            assert set(arrays) == shared_keys()
        else:
            assert entry["arrays"] == {}


def test_server_aggregates_and_checkpoints_only_the_shared_part(personal: tuple[RunDir, Path]) -> None:
    store, _ = personal
    for rnd in (1, 2):
        payload = torch.load(store.checkpoint_path(rnd), weights_only=True)
        assert set(payload["state_dict"]) == shared_keys()
        assert set(payload["server_optimizer"]["m_t"]) == shared_keys()


def test_each_site_evaluates_its_own_personalised_model(personal: tuple[RunDir, Path], small_sites: list[Path]) -> None:
    store, _ = personal
    shared = torch.load(store.checkpoint_path(2), weights_only=True)["state_dict"]
    recorded = {
        r["site"]: r["metrics"]["psnr"]
        for r in store.read_metrics()
        if r["round"] == 2 and r["phase"] == "evaluate" and r["site"] != GLOBAL_SITE
    }
    heads = {}
    for path in small_sites[:2]:
        config, datasets = load_site(str(path))
        local = torch.load(store.path / "site-state" / config.name / "round-0002.pt", weights_only=True)["local"]
        assert set(local) == set(initial_state()) - shared_keys()
        heads[config.name] = local
        model = build_model("unet", **json.loads(MODEL_ARGS))
        model.load_state_dict({**shared, **local})
        result = evaluate(model, make_loader(datasets["val"], 2, shuffle=False, seed=0), max_slices=4)
        assert result.metrics["psnr"] == pytest.approx(recorded[config.name], abs=1e-3)
    a, b = heads.values()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # each site trained its own head


def test_fine_tuning_is_recorded_and_its_weights_stay_at_the_site(personal: tuple[RunDir, Path]) -> None:
    store, _ = personal
    rows = [r for r in store.read_metrics() if r["phase"] == "finetune"]
    assert {r["site"] for r in rows} == {"site-a", "site-b", GLOBAL_SITE} and {r["round"] for r in rows} == {2}
    for row in rows:
        if row["site"] == GLOBAL_SITE:
            continue
        m = row["metrics"]
        assert m["psnr"] >= m["start-psnr"] and m["best-step"] in (0, 2, 4) and m["steps"] <= 4
        saved = torch.load(store.path / "site-state" / row["site"] / "finetuned.pt", weights_only=True)
        assert set(saved["state_dict"]) == set(initial_state()) and saved["round"] == 2
        assert saved["metrics"]["psnr"] == pytest.approx(m["psnr"])


def test_fedadam_step_is_adam_on_the_example_weighted_pseudo_gradient(
    personal: tuple[RunDir, Path], small_sites: list[Path], tmp_path: Path
) -> None:
    """Round 1 of the personal run against one FedAvg round of the same sites and seeds.

    The sites' first-round training does not depend on the server strategy, so FedAvg's aggregate is
    the example-weighted average of exactly the updates FedAdam received.
    """
    store, _ = personal
    one_round = {
        **PERSONAL,
        "strategy": "fedavg",
        "fine-tune-steps": 0,
        "fraction-evaluate": 0.0,
        "min-evaluate-nodes": 0,
    }
    average = simulate(small_run(small_sites[:2], tmp_path / "avg", rounds=1, **one_round), timeout=900)
    x0 = {k: v.double().numpy() for k, v in initial_state().items() if k in shared_keys()}
    mean = {
        k: v.double().numpy()
        for k, v in torch.load(average.checkpoint_path(1), weights_only=True)["state_dict"].items()
    }
    got = {
        k: v.double().numpy() for k, v in torch.load(store.checkpoint_path(1), weights_only=True)["state_dict"].items()
    }
    t = 2  # Flower numbers FedAdam's steps from server_round + 1
    step = ETA * np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
    for k in x0:
        delta = mean[k] - x0[k]  # minus the pseudo-gradient
        m, v = (1 - BETA_1) * delta, (1 - BETA_2) * delta**2  # Adam's moments after one step from zero
        np.testing.assert_allclose(got[k], x0[k] + step * m / (np.sqrt(v) + TAU), rtol=1e-4, atol=1e-6)
    assert any(np.abs(got[k] - mean[k]).max() > 1e-4 for k in x0)  # FedAdam is not FedAvg here


def test_a_resumed_run_restores_local_layers_and_optimiser_states(
    personal: tuple[RunDir, Path], small_sites: list[Path], tmp_path: Path
) -> None:
    """The server dies after the sites trained round 2 but before its checkpoint: resumed as a new Flower
    run (empty Contexts), round 2 must repeat exactly, from round 1's files, as it went straight through."""
    straight, _ = personal
    run_dir = tmp_path / "resumed"
    shutil.copytree(straight.path, run_dir)
    (run_dir / "checkpoints" / "round-0002.pt").unlink()  # the sites' round-0002.pt files stay, stale
    resumed = simulate(small_run(small_sites[:2], run_dir, rounds=2, **PERSONAL), timeout=900)
    assert resumed.latest_checkpoint()[0] == 2
    a = torch.load(straight.checkpoint_path(2), weights_only=True)
    b = torch.load(resumed.checkpoint_path(2), weights_only=True)
    for k, v in a["state_dict"].items():  # also needs FedAdam's moments of round 1, from checkpoint 1
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-6)
    for site in ("site-a", "site-b"):
        la = torch.load(straight.path / "site-state" / site / "round-0002.pt", weights_only=True)
        lb = torch.load(run_dir / "site-state" / site / "round-0002.pt", weights_only=True)
        for k, v in la["local"].items():
            torch.testing.assert_close(lb["local"][k], v, rtol=1e-4, atol=1e-6)
        # client-optimizer = keep: round 2 continued round 1's Adam (8 steps in all, 4 per round).
        assert all(int(s["step"]) == 8 for s in lb["optimizer"]["state"].values())
