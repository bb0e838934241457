"""precision = auto: the decision rule, its on-disk cache, and that choosing never changes what training computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import precision as auto
from common.errors import ConfigError
from common.models import build_model
from common.training import train
from tests.test_device import _batches, _Listed

CPU = torch.device("cpu")


@pytest.fixture
def unpinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache directory, no pin, an empty in-process memo, and a CPU that could run bf16."""
    monkeypatch.delenv(auto.ENV_PIN, raising=False)
    monkeypatch.setenv(auto.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(auto, "_decided", {})
    monkeypatch.setattr(auto, "cpu_has_bf16", lambda: True)
    return tmp_path


class Timings:
    """An injected measurement: fixed seconds per step, counting how often it was asked."""

    def __init__(self, fp32: float, bf16: float) -> None:
        self.result = {"fp32": fp32, "bf16": bf16}
        self.calls = 0

    def __call__(self, model: object, batch: object, device: object, mode: object) -> dict[str, float]:
        self.calls += 1
        return dict(self.result)


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [(1.0, 0.5, "bf16"), (1.1, 1.0, "bf16"), (1.09, 1.0, "fp32"), (1.0, 1.0, "fp32"), (0.5, 1.0, "fp32")],
)
def test_bf16_only_where_at_least_1_1x_faster(fp32: float, bf16: float, expected: str) -> None:
    assert auto.decide({"fp32": fp32, "bf16": bf16}) == expected


def test_measured_once_then_cached_on_disk_per_model_and_shape(unpinned: Path) -> None:
    model = build_model("unrolled", num_cascades=1, chans=4, num_layers=2)
    batch = _batches(1)[0]
    timings = Timings(fp32=1.0, bf16=0.6)
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=timings) == "bf16"
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=timings) == "bf16"
    assert timings.calls == 1
    (record,) = [json.loads(p.read_text()) for p in unpinned.glob("*.json")]
    assert record["choice"] == "bf16" and record["seconds_per_step"] == {"fp32": 1.0, "bf16": 0.6}
    assert record["facts"]["torch"] == torch.__version__

    auto._decided.clear()  # a new process: the disk answers, nothing is timed
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=Timings(1.0, 1.0)) == "bf16"
    # Another shape, another model or the inference mode is a new question.
    slower = Timings(fp32=1.0, bf16=1.0)
    assert auto.choose_precision("auto", model, _batches(1, size=48)[0], CPU, measure_fn=slower) == "fp32"
    assert (
        auto.choose_precision("auto", build_model("unet", chans=4, num_pool_layers=2), batch, CPU, measure_fn=slower)
        == "fp32"
    )
    assert auto.choose_precision("auto", model, batch, CPU, "infer", measure_fn=slower) == "fp32"
    assert slower.calls == 3 and len(list(unpinned.glob("*.json"))) == 4


def test_a_damaged_cache_file_is_measured_again(unpinned: Path) -> None:
    model = build_model("unrolled", num_cascades=1, chans=4, num_layers=2)
    batch = _batches(1)[0]
    key = auto.decision_key(auto.machine_facts(CPU), model, batch, "train")
    (unpinned / f"{key}.json").write_text("{not json", encoding="utf-8")
    timings = Timings(fp32=1.0, bf16=0.5)
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=timings) == "bf16"
    assert timings.calls == 1 and json.loads((unpinned / f"{key}.json").read_text())["choice"] == "bf16"


def test_cache_off_pin_explicit_and_no_native_bf16(unpinned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("unrolled", num_cascades=1, chans=4, num_layers=2)
    batch = _batches(1)[0]
    never = Timings(fp32=1.0, bf16=0.1)
    assert auto.choose_precision("fp32", model, batch, CPU, measure_fn=never) == "fp32"
    assert auto.choose_precision("bf16", model, batch, CPU, measure_fn=never) == "bf16"
    monkeypatch.setenv(auto.ENV_PIN, "fp32")
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=never) == "fp32"
    monkeypatch.setenv(auto.ENV_PIN, "fp16")
    with pytest.raises(ConfigError, match="FEDSENSE_AUTO_PRECISION"):
        auto.choose_precision("auto", model, batch, CPU, measure_fn=never)
    monkeypatch.delenv(auto.ENV_PIN)
    monkeypatch.setattr(auto, "cpu_has_bf16", lambda: False)  # emulated bf16 never wins: not even timed
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=never) == "fp32"
    assert never.calls == 0
    with pytest.raises(ConfigError, match="--precision: must be one of"):
        auto.choose_precision("fp16", model, batch, CPU, source="--precision")
    monkeypatch.setattr(auto, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv(auto.ENV_DIR, "off")
    assert auto.default_cache_dir() is None
    assert auto.choose_precision("auto", model, batch, CPU, measure_fn=never) == "bf16"
    assert list(unpinned.glob("*.json")) == []


def test_cuda_is_bf16_where_supported_else_fp32(unpinned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path without a GPU: CUDA's bf16 support decides whether bf16 is timed at all."""
    model = build_model("unrolled", num_cascades=1, chans=4, num_layers=2)
    batch = _batches(1)[0]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock H100")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto.choose_precision("auto", model, batch, cuda, measure_fn=Timings(1.0, 0.2)) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto.choose_precision("auto", model, batch, cuda, measure_fn=Timings(1.0, 0.2)) == "bf16"
    (record,) = [json.loads(p.read_text()) for p in unpinned.glob("*.json")]
    assert record["facts"]["gpu"] == "Mock H100" and record["facts"]["device"] == "cuda"


def test_real_measurement_leaves_the_model_and_rng_untouched(unpinned: Path) -> None:
    torch.manual_seed(0)
    model = build_model("unet", chans=4, num_pool_layers=2, drop_prob=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    ticks = iter(range(1000))
    timings = auto.measure(model, _batches(1)[0], CPU, "train", repeats=2, clock=lambda: float(next(ticks)))
    assert set(timings) == {"fp32", "bf16", "spread"} and all(t == 1.0 for t in timings.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state())


def test_train_with_auto_reports_the_choice_and_matches_that_precision(
    unpinned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto that chose fp32 trains exactly as fp32 does, and the result says which precision ran."""
    batches = _batches(3)
    monkeypatch.setattr(auto, "measure", Timings(fp32=1.0, bf16=1.0))
    weights = {}
    for spec in ("fp32", "auto"):
        torch.manual_seed(0)
        model = build_model("unrolled", num_cascades=2, chans=4, num_layers=2)
        result = train(model, _Listed(batches), steps=2, lr=1e-3, precision=spec)
        assert result.precision == "fp32"
        weights[spec] = model.state_dict()
    assert all(torch.equal(weights["fp32"][k], weights["auto"][k]) for k in weights["fp32"])
    monkeypatch.setattr(auto, "_decided", {})
    monkeypatch.setenv(auto.ENV_DIR, "off")
    monkeypatch.setattr(auto, "measure", Timings(fp32=1.0, bf16=0.5))
    result = train(
        build_model("unrolled", num_cascades=2, chans=4, num_layers=2), _Listed(batches), steps=1, precision="auto"
    )
    assert result.precision == "bf16"


def test_learned_values_do_not_change_the_key_but_the_architecture_does() -> None:
    """A site's model after a round (new lambda, new weights) is the same question; another size is not."""
    facts = auto.machine_facts(CPU)
    batch = _batches(1)[0]
    model = build_model("unrolled", num_cascades=2, chans=4, num_layers=2)
    key = auto.decision_key(facts, model, batch, "train")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the DC weights' log-lambda too: repr(model) changes, the key must not
    assert auto.decision_key(facts, model, batch, "train") == key
    assert (
        auto.decision_key(facts, build_model("unrolled", num_cascades=2, chans=8, num_layers=2), batch, "train") != key
    )


class Noisy:
    """A measurement whose paired ratios vary by ``spreads[i]`` on call i; records the thread count it ran at."""

    def __init__(self, *spreads: float) -> None:
        self.spreads = list(spreads)
        self.threads: list[int] = []

    def __call__(self, model: object, batch: object, device: object, mode: object) -> dict[str, float]:
        self.threads.append(torch.get_num_threads())
        return {"fp32": 1.0, "bf16": 0.5, "spread": self.spreads[len(self.threads) - 1]}


def test_noisy_timings_are_measured_again_on_one_thread(
    unpinned: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Sites sharing cores made the ratio of one model 0.71x to 1.31x: such a measurement is retaken on one
    thread (clean under that load), and the choice is cached under the caller's thread count, which is restored."""
    model = build_model("unet", chans=4, num_pool_layers=2)
    batch = _batches(1)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        noisy_then_clean = Noisy(auto.MAX_SPREAD * 3, 1.2)
        assert auto.choose_precision("auto", model, batch, CPU, measure_fn=noisy_then_clean) == "bf16"
        assert noisy_then_clean.threads == [2, 1] and torch.get_num_threads() == 2
        (record,) = [json.loads(p.read_text()) for p in unpinned.glob("*.json")]
        assert record["measured_threads"] == 1 and record["facts"]["threads"] == 2
        assert "measuring again on one thread" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_timings_that_stay_noisy_choose_fp32_and_are_not_cached(
    unpinned: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model("unet", chans=4, num_pool_layers=2)
    batch = _batches(1)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread already: nothing to retry on
    try:
        always = Noisy(auto.MAX_SPREAD * 3)
        assert auto.choose_precision("auto", model, batch, CPU, measure_fn=always) == "fp32"  # bf16 looked 2x faster
        assert always.threads == [1] and not list(unpinned.glob("*.json"))
        assert "too noisy to decide" in caplog.text
    finally:
        torch.set_num_threads(before)
