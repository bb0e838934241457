"""Personalisation logic without Flower: the shared / local split and validation-selected fine-tuning."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.models import build_model
from common.personalise import fine_tune, is_local, split_state

MODEL_ARGS = {"chans": 4, "num_pool_layers": 2}


def test_split_by_fnmatch_patterns() -> None:
    state = build_model("unet", **MODEL_ARGS).state_dict()
    shared, local = split_state(state, ("unet.up_conv.1.*",))
    assert set(local) == {
        "unet.up_conv.1.0.layers.0.weight",
        "unet.up_conv.1.0.layers.4.weight",
        "unet.up_conv.1.1.weight",
        "unet.up_conv.1.1.bias",
    }
    assert set(shared) | set(local) == set(state) and not set(shared) & set(local)
    assert list(shared) == [k for k in state if k not in local]  # model order is kept
    assert split_state(state, ()) == (dict(state), {})
    # Several patterns; '*' crosses dots as fnmatch does.
    _, lam = split_state(build_model("unrolled").state_dict(), ("*.dc.log_lam", "cascades.4.cnn.net.8.*"))
    assert set(lam) == {f"cascades.{i}.dc.log_lam" for i in range(5)} | {
        "cascades.4.cnn.net.8.weight",
        "cascades.4.cnn.net.8.bias",
    }
    assert is_local("sens_net.norm_unet.unet.bottleneck.layers.0.weight", ("sens_net.*",))


def test_bad_patterns_are_config_errors() -> None:
    state = build_model("unet", **MODEL_ARGS).state_dict()
    with pytest.raises(ConfigError, match=r"local-layers.*'unet.decoder.\*'"):
        split_state(state, ("unet.up_conv.1.*", "unet.decoder.*"))
    with pytest.raises(ConfigError, match="nothing is left to share"):
        split_state(state, ("*",))


class Scale(nn.Module):
    """A one-parameter 'reconstruction': the zero-filled image times a learned gain."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return self.gain * kspace.abs().sum(dim=1)


def batches(target_gain: float, n: int = 2) -> list[dict[str, object]]:
    """Tiny batches whose best gain is ``target_gain``."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = torch.rand((1, 1, 8, 8), generator=gen).to(torch.complex64)
        out.append(
            {
                "masked_kspace": k,
                "mask": torch.ones(1, 1, 8, 8),
                "sens_maps": torch.ones(1, 1, 8, 8, dtype=torch.complex64),
                "target": target_gain * k.abs().sum(dim=1),
                "max_value": torch.tensor([target_gain * 1.0]),
                "scale": torch.tensor([1.0]),
                "fname": [f"v{i}"],
                "site": ["s"],
                "slice_idx": torch.tensor([0]),
            }
        )
    return out


class Loader(list):
    dataset: ClassVar[list[int]] = [0, 0]


def test_fine_tune_keeps_the_best_validated_model_and_reports_it() -> None:
    model = Scale(0.5)
    result = fine_tune(model, Loader(batches(1.0)), batches(1.0), steps=30, eval_every=5, lr=0.05)
    assert result.metrics["psnr"] > result.start_metrics["psnr"] + 5
    assert result.best_step > 0 and result.steps == 30
    best = max(v for _, v in result.history)
    assert result.metrics["psnr"] == pytest.approx(best)
    assert [s for s, _ in result.history] == [0, 5, 10, 15, 20, 25, 30]
    assert float(model.gain.detach()) == pytest.approx(float(result.state_dict["gain"]))


def test_fine_tune_never_returns_worse_than_its_start_and_stops_early() -> None:
    # Training data wants gain 2, validation wants 0.9: every step from 1.0 makes validation worse.
    model = Scale(1.0)
    result = fine_tune(model, Loader(batches(2.0)), batches(0.9), steps=40, eval_every=4, patience=2, lr=0.05)
    assert result.best_step == 0 and result.steps == 8  # two validations without improvement, then stop
    assert float(model.gain.detach()) == pytest.approx(1.0)
    assert result.metrics == result.start_metrics
    json.dumps(result.metrics)  # scalars only: what a site may send


def test_fine_tune_warmup_ramps_the_learning_rate_linearly() -> None:
    # Adam's first step moves each weight by lr whatever the gradient's size: with warm-up w, by lr / w.
    steps_taken = []
    for warmup in (0, 4):
        model = Scale(1.0)
        fine_tune(model, Loader(batches(2.0)), batches(2.0), steps=1, eval_every=1, lr=0.05, warmup=warmup)
        steps_taken.append(float(model.gain.detach()) - 1.0)
    assert steps_taken == pytest.approx([0.05, 0.05 / 4], rel=1e-4)
    # Over the first w steps the rates are lr/w, 2 lr/w, ..., lr; Adam's steps stay about the rate (constant
    # gradient sign), so w = 4 steps move about 2.5 lr and the 5th a full lr.
    model = Scale(1.0)
    result = fine_tune(model, Loader(batches(3.0)), batches(3.0), steps=5, eval_every=1, lr=0.01, warmup=4)
    assert result.best_step == 5
    assert float(model.gain.detach()) - 1.0 == pytest.approx(0.01 * (2.5 + 1), rel=0.05)
    with pytest.raises(ValueError, match="warmup"):
        fine_tune(Scale(1.0), Loader(batches(2.0)), batches(2.0), steps=1, eval_every=1, warmup=-1)


NEW_KEYS = (
    "augment",
    "server-eta",
    "server-tau",
    "server-beta-1",
    "server-beta-2",
    "server-learning-rate",
    "server-momentum",
    "client-optimizer",
    "local-layers",
    "site-state-dir",
    "fine-tune-steps",
    "fine-tune-eval-every",
    "fine-tune-patience",
    "fine-tune-warmup",
)


def test_new_run_config_keys_have_the_same_defaults_in_pyproject() -> None:
    import tomllib
    from pathlib import Path

    from common.runconfig import RunConfig

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as fh:
        flat = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_flat()
    assert {k: flat[k] for k in NEW_KEYS} == {k: defaults[k] for k in NEW_KEYS}
    assert RunConfig.from_flat({"local-layers": " unet.up_conv.2.* ,*.dc.eta,"}).local_layer_patterns == (
        "unet.up_conv.2.*",
        "*.dc.eta",
    )
    for key, bad in (
        ("client-optimizer", "sgd"),
        ("server-beta-1", 1.0),
        ("fine-tune-steps", -1),
        ("strategy", "fedadamw"),
    ):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flat({key: bad})
