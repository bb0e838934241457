"""Device and precision selection: CPU/CUDA resolution, bf16 autocast of the network only."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
import torch

from common.coils import birdcage_maps
from common.dc import DataConsistency
from common.device import autocast, cpu_state_dict, resolve_device
from common.errors import ConfigError
from common.fft import fft2c
from common.models import build_model
from common.training import evaluate, train


def _batches(count: int, size: int = 32, coils: int = 4) -> list[dict[str, object]]:
    """Synthetic slices: a smooth phantom, birdcage maps, a column mask at R = 3."""
    out = []
    maps = torch.from_numpy(birdcage_maps(coils, (size, size)))
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for k in range(count):
        image = ((x**2 + (1.3 * y) ** 2) < 0.6 - 0.05 * k).float() * (1 + 0.3 * x)
        kspace = fft2c(image.to(torch.complex64) * maps)
        mask = torch.zeros(1, size, size)
        mask[..., ::3] = 1
        mask[..., size // 2 - 3 : size // 2 + 3] = 1
        out.append(
            {
                "masked_kspace": (kspace * mask)[None],
                "mask": mask[None],
                "sens_maps": maps[None],
                "target": image[None],
                "scale": torch.ones(1),
                "max_value": image.max()[None],
                "site": ["s"],
                "fname": [f"v{k}"],
                "slice_idx": torch.tensor([0]),
            }
        )
    return out


def test_resolve_device_and_precision() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda", "--device")
    with pytest.raises(ConfigError, match="--device: must be one of"):
        resolve_device("tpu", "--device")


def test_bf16_autocasts_the_network_but_dc_stays_complex64() -> None:
    torch.manual_seed(0)
    model = build_model("unrolled", num_cascades=2, chans=8, num_layers=3).eval()
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, DataConsistency):
            module.register_forward_hook(lambda m, inputs, output: seen.extend([inputs[0].dtype, output.dtype]))
    conv_dtypes: list[torch.dtype] = []
    model.cascades[0].cnn.net[0].register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    batch = _batches(1)[0]
    with torch.no_grad():
        reference = model(batch["masked_kspace"], batch["mask"], batch["sens_maps"])
        with autocast(torch.device("cpu"), "bf16"):
            mixed = model(batch["masked_kspace"], batch["mask"], batch["sens_maps"])
    assert conv_dtypes == [torch.float32, torch.bfloat16]  # the convolution really ran in bf16 under autocast
    assert seen and set(seen) == {torch.complex64}
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))


SMALL = {
    "unet": {"chans": 8, "num_pool_layers": 2},
    "unrolled": {"num_cascades": 2, "chans": 8, "num_layers": 3},
    "varnet": {"num_cascades": 2, "chans": 4, "sens_chans": 2},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_training_and_evaluation_stay_close_to_fp32(name: str) -> None:
    batches = _batches(3)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(name, **SMALL[name])
        outcome = train(model, _Listed(batches), steps=2, lr=1e-3, precision=precision)
        assert torch.isfinite(torch.tensor(outcome.loss))
        weights = cpu_state_dict(model)
        assert all(v.dtype in (torch.float32, torch.int64) and v.device.type == "cpu" for v in weights.values())
        results[precision] = evaluate(model, batches, precision=precision).metrics  # type: ignore[arg-type]
    assert abs(results["bf16"]["psnr"] - results["fp32"]["psnr"]) < 1.0, results


class _Listed(list):
    """A list of batches with the ``dataset`` attribute ``train`` reports example counts from."""

    dataset: ClassVar[list[int]] = [0, 1, 2]


def test_cpu_allotment_follows_omp_then_cgroup_quota(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.device import cpu_allotment

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_allotment(tmp_path) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_allotment(tmp_path) == affinity  # no cgroup file: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_allotment(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert cpu_allotment(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 4) * 100000} 100000\n")  # quota above the affinity
    assert cpu_allotment(tmp_path) == affinity
