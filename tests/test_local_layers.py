"""The local-layers lever: which parameters stay at a site per model, and which round's the site restores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client.site_state import SiteMemory
from common.errors import ConfigError
from common.models import build_model
from common.personalise import personal_layers, split_state
from common.runconfig import RunConfig


def _local_count(name: str, **kwargs: int) -> tuple[int, int, tuple[str, ...]]:
    model = build_model(name, **kwargs)
    patterns = personal_layers(model)
    _, local = split_state(dict(model.named_parameters()), patterns)
    return sum(p.numel() for p in local.values()), sum(p.numel() for p in model.parameters()), patterns


def test_unrolled_keeps_each_cascades_last_conv_and_dc_weight() -> None:
    local, total, patterns = _local_count("unrolled", num_cascades=4, chans=32, num_layers=5)
    assert (local, total) == (2316, 115724)  # 4 x (2x32x3x3 + 2 + 1 scalar DC weight)
    assert patterns == ("cascades.*.cnn.net.8.*", "cascades.*.dc.*")
    hard = build_model(
        "unrolled", num_cascades=2, chans=8, num_layers=3, lam=None, learnable_lam=False
    )  # hard DC: no DC weight
    assert personal_layers(hard) == ("cascades.*.cnn.net.4.*",)


def test_unet_keeps_its_final_1x1_conv() -> None:
    local, _total, patterns = _local_count("unet", chans=16, num_pool_layers=2)
    assert patterns == ("unet.up_conv.1.1.*",) and local == 16 + 1  # InstanceNorms carry no parameters
    assert personal_layers(build_model("unet", chans=8, num_pool_layers=3)) == ("unet.up_conv.2.1.*",)


def test_a_model_without_a_chosen_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="local-layers: no personal layers chosen for model 'varnet'"):
        personal_layers(build_model("varnet"))


def _memory(tmp_path: Path, patience: int, stop_rule: str = "global") -> SiteMemory:
    run = RunConfig.from_flat(
        {
            "model": "unrolled",
            "model-args": {"num_cascades": 2, "chans": 4, "num_layers": 3},
            "local-layers": "cascades.*.dc.*",
            "patience": patience,
            "stop-rule": stop_rule,
            "site-state-dir": str(tmp_path / "state"),
        }
    )
    return SiteMemory(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), run, "site-a")


def _remember_rounds(memory: SiteMemory, rounds: int) -> None:
    model = build_model(memory.run.model, **memory.run.model_kwargs)
    for rnd in range(1, rounds + 1):
        with torch.no_grad():
            for cascade in model.cascades:
                cascade.dc.log_lam.fill_(float(rnd))  # round r's local layers hold r
        memory.remember(rnd, model, None)


def test_the_site_keeps_patience_plus_two_rounds_and_restores_the_round_asked_for(tmp_path: Path) -> None:
    memory = _memory(tmp_path, patience=3)
    _remember_rounds(memory, 9)
    assert sorted(p.name for p in memory.directory.iterdir()) == [f"round-{r:04d}.pt" for r in range(5, 10)]
    # Early stopping after 3 stale rounds: the best round (6) is 3 behind the last (9); fine-tuning asks for it.
    best = memory.restore(6)
    assert best is not None and best.round == 6
    assert all(float(v) == 6.0 for v in best.local.values())
    assert memory.restore(9).round == 9  # the newest comes from the Context


def test_with_every_site_stopping_the_best_round_may_be_far_behind_so_every_round_is_kept(tmp_path: Path) -> None:
    # stop-rule = every-site: the mean's best round was 2 and a site kept improving until round 9; fine-tuning
    # starts from round 2, 7 rounds behind the last (patience 3 would have deleted it).
    memory = _memory(tmp_path, patience=3, stop_rule="every-site")
    _remember_rounds(memory, 9)
    assert sorted(p.name for p in memory.directory.iterdir()) == [f"round-{r:04d}.pt" for r in range(1, 10)]
    best = memory.restore(2)
    assert best is not None and best.round == 2
    assert all(float(v) == 2.0 for v in best.local.values())


def test_with_patience_off_every_rounds_state_is_kept(tmp_path: Path) -> None:
    memory = _memory(tmp_path, patience=0)
    _remember_rounds(memory, 5)
    assert len(list(memory.directory.iterdir())) == 5
    assert float(next(iter(memory.restore(1).local.values()))) == 1.0


def _remember_with_adam(memory: SiteMemory, rounds: int) -> None:
    model = build_model(memory.run.model, **memory.run.model_kwargs)
    optimiser = torch.optim.Adam(model.parameters())
    for rnd in range(1, rounds + 1):
        sum(p.square().sum() for p in model.parameters()).backward()  # any gradient fills Adam's moments
        optimiser.step()
        memory.remember(rnd, model, optimiser)


def test_older_rounds_keep_only_their_local_layers_the_last_two_stay_whole(tmp_path: Path) -> None:
    """The Adam moments are model-sized: hundreds of rounds must not keep hundreds of copies."""
    memory = _memory(tmp_path, patience=0)
    memory.run = memory.run.model_copy(update={"client_optimizer": "keep"})
    _remember_with_adam(memory, 5)
    files = {p.name: torch.load(p, weights_only=True) for p in memory.directory.iterdir()}
    assert sorted(files) == [f"round-{r:04d}.pt" for r in range(1, 6)]
    for rnd in range(1, 6):
        payload = files[f"round-{rnd:04d}.pt"]
        assert payload["local"] and (payload["optimizer"] is not None) == (rnd >= 4), rnd
    assert memory.restore(2).local.keys() == files["round-0005.pt"]["local"].keys()  # fine-tuning's read


def test_without_local_layers_only_the_last_two_rounds_files_are_kept(tmp_path: Path) -> None:
    memory = _memory(tmp_path, patience=0)
    memory.run = memory.run.model_copy(update={"client_optimizer": "keep", "local_layers": ""})
    memory.patterns = memory.run.local_layer_patterns
    _remember_with_adam(memory, 5)
    assert sorted(p.name for p in memory.directory.iterdir()) == ["round-0004.pt", "round-0005.pt"]


def test_without_a_state_dir_an_older_round_gets_the_newest_state_not_initial_weights(tmp_path: Path) -> None:
    memory = _memory(tmp_path, patience=0)
    memory.directory = None
    _remember_rounds(memory, 4)
    restored = memory.restore(2)  # fine-tuning from best round 2; only round 4 is in memory
    assert restored is not None and restored.round == 4
    assert all(float(v) == 4.0 for v in restored.local.values())
