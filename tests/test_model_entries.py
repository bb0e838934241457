"""A model's facts are read from its one registry entry by every feature that depends on them.

A toy model (a class in this file and one ``MODEL_ENTRIES`` entry naming it, no other module edited) is
built by name, named back from an instance, accepted or refused by SSDU and DP-SGD as its entry says, and
exported to ONNX through its own hook; once its entry is gone, nothing knows it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from common import dp, registry, ssdu
from common.coils import rss
from common.errors import ConfigError
from common.fft import RealIfft2c, ifft2c
from common.models import build_model, model_name
from common.registry import MODEL_ENTRIES, ModelEntry
from common.runconfig import RunConfig

TOY_CLASS = f"{__name__}:ToyModel"


class ToyModel(nn.Module):
    """A learnt gain on the zero-filled RSS image: the smallest model honouring the forward contract."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        return self.gain * rss(ifft2c(masked_kspace), dim=1)

    def onnx_module(self, height: int, width: int) -> nn.Module:
        return _RealToy(self, height, width)


class _RealToy(nn.Module):
    def __init__(self, model: ToyModel, height: int, width: int) -> None:
        super().__init__()
        self.model = model
        self.ifft = RealIfft2c(height, width)

    def forward(self, kspace: Tensor) -> Tensor:
        return self.model.gain * self.ifft.rss(kspace)


def toy_entry(
    *, dc_operator: str = "none", supports_ssdu: bool = False, onnx_exportable: bool = False, dp_refusal: str = ""
) -> ModelEntry:
    """The toy's registry entry: its class in this file, and the facts a test gives it."""
    return ModelEntry(
        "a toy",
        implementation=TOY_CLASS,
        dc_operator=dc_operator,
        supports_ssdu=supports_ssdu,
        onnx_exportable=onnx_exportable,
        dp_refusal=dp_refusal,
    )


def test_a_model_is_its_class_and_its_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown model 'toy'"):
        build_model("toy")
    monkeypatch.setitem(MODEL_ENTRIES, "toy", toy_entry())
    model = build_model("toy", gain=2.0)
    assert type(model) is ToyModel and model_name(model) == "toy"
    with pytest.raises(ConfigError, match=r"model\.scale: not an option of model 'toy'; options are gain"):
        build_model("toy", scale=2.0)
    monkeypatch.undo()  # unregistered: the built model is no registered model any more
    assert "toy" not in MODEL_ENTRIES
    with pytest.raises(ConfigError, match="ToyModel is no registered model"):
        model_name(model)


def test_onnx_export_follows_the_entry_and_the_models_own_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.onnx_export import export_onnx

    monkeypatch.setitem(MODEL_ENTRIES, "toy", toy_entry())
    model = build_model("toy", gain=0.5)
    with pytest.raises(ConfigError, match="model toy cannot be exported"):
        export_onnx(model, shape=(1, 2, 16, 16))  # the entry does not declare it exportable
    monkeypatch.setitem(MODEL_ENTRIES, "toy", toy_entry(onnx_exportable=True))
    blob, info = export_onnx(model, shape=(1, 2, 16, 16))
    assert info.input_shape == (1, 2, 16, 16, 2) and info.max_abs_error <= info.tolerance

    import onnxruntime as ort

    kspace = np.random.default_rng(0).standard_normal((1, 2, 16, 16, 2)).astype(np.float32)
    out = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"kspace": kspace})[0]
    with torch.no_grad():
        expected = model(torch.view_as_complex(torch.from_numpy(kspace)), torch.ones(1), torch.ones(1)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_ssdu_and_dp_sgd_read_a_new_models_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        MODEL_ENTRIES,
        "toy",
        toy_entry(dc_operator="gradient", supports_ssdu=True, dp_refusal="the toy mixes slices"),
    )
    ssdu.check_model("toy")  # accepted: its entry says it predicts k-space
    with pytest.raises(ConfigError, match="'toy' cannot be trained with DP-SGD: the toy mixes slices"):
        dp.check_model("toy", nn.Linear(1, 1))
    monkeypatch.setitem(MODEL_ENTRIES, "toy", toy_entry())
    with pytest.raises(ConfigError, match="'toy' cannot train at a self-supervised site"):
        ssdu.check_model("toy")
    dp.check_model("toy", nn.Linear(1, 1))  # no refusal declared: DP-SGD may train it


def test_the_run_config_refuses_dp_sgd_for_a_model_whose_entry_refuses_it() -> None:
    refused = [name for name, entry in MODEL_ENTRIES.items() if not entry.supports_dp]
    assert refused == ["varnet"]
    with pytest.raises(ValueError, match=MODEL_ENTRIES["varnet"].dp_refusal[:40]):
        RunConfig(model="varnet", dp_noise_multiplier=1.0)


def test_an_entry_with_an_unknown_dc_operator_or_no_class_is_refused() -> None:
    with pytest.raises(ValueError, match="dc_operator: 'magic'"):
        ModelEntry("bad", implementation=TOY_CLASS, dc_operator="magic", supports_ssdu=False)
    with pytest.raises(ValueError, match=r"implementation: 'ToyModel' is not 'package\.module:Class'"):
        ModelEntry("bad", implementation="ToyModel", dc_operator="none", supports_ssdu=False)
    assert set(registry.MODELS) == set(MODEL_ENTRIES)
