"""A model's capabilities are read from its one registry entry by every feature that depends on them."""

from __future__ import annotations

import pytest
from torch import nn

from common import dp, registry, ssdu
from common.errors import ConfigError
from common.registry import MODEL_ENTRIES, ModelEntry
from common.runconfig import RunConfig


def test_ssdu_and_dp_sgd_read_a_new_models_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        MODEL_ENTRIES,
        "toy",
        ModelEntry("a toy", dc_operator="gradient", supports_ssdu=True, dp_refusal="the toy mixes slices"),
    )
    ssdu.check_model("toy")  # accepted: its entry says it predicts k-space
    with pytest.raises(ConfigError, match="'toy' cannot be trained with DP-SGD: the toy mixes slices"):
        dp.check_model("toy", nn.Linear(1, 1))
    monkeypatch.setitem(MODEL_ENTRIES, "toy", ModelEntry("a toy", dc_operator="none", supports_ssdu=False))
    with pytest.raises(ConfigError, match="'toy' cannot train at a self-supervised site"):
        ssdu.check_model("toy")
    dp.check_model("toy", nn.Linear(1, 1))  # no refusal declared: DP-SGD may train it


def test_the_run_config_refuses_dp_sgd_for_a_model_whose_entry_refuses_it() -> None:
    refused = [name for name, entry in MODEL_ENTRIES.items() if not entry.supports_dp]
    assert refused == ["varnet"]
    with pytest.raises(ValueError, match=MODEL_ENTRIES["varnet"].dp_refusal[:40]):
        RunConfig(model="varnet", dp_noise_multiplier=1.0)


def test_an_entry_with_an_unknown_dc_operator_is_refused() -> None:
    with pytest.raises(ValueError, match="dc_operator: 'magic'"):
        ModelEntry("bad", dc_operator="magic", supports_ssdu=False)
    assert set(registry.MODELS) == set(MODEL_ENTRIES)
