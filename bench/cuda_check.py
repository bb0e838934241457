"""Check the CUDA path on a machine with a GPU: same outputs as the CPU within tolerance, and the speed-up.

For each model (small configurations, synthetic multi-coil batch, the same weights on both devices):

- forward output on CUDA (fp32, TF32 off) vs CPU fp32: relative max error below ``--tol-fp32``;
- forward output on CUDA under bf16 autocast vs CPU fp32: below ``--tol-bf16``;
- :func:`common.training.evaluate` with ``device="cuda"`` vs ``"cpu"``: PSNR within 0.05 dB;
- one :func:`common.training.train` step on each device: the weights stay CPU-storable
  (:func:`common.device.cpu_state_dict`) and agree within ``--tol-fp32`` relative;
- training throughput (slices/s) on CPU fp32, CUDA fp32 and CUDA bf16.

Run from the repository root::

    python -m bench.cuda_check            # exits with status 1 and says so when there is no CUDA device

Prints one markdown table and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys

import torch

from bench.models import synthetic_batch, training_throughput
from common.device import autocast, cpu_state_dict
from common.models import build_model
from common.training import evaluate, train

logger = logging.getLogger("bench.cuda_check")

SMALL = {
    "unet": {"chans": 16, "num_pool_layers": 3},
    "unrolled": {"num_cascades": 3, "chans": 16, "num_layers": 4},
    "varnet": {"num_cascades": 3, "chans": 8, "sens_chans": 4},
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _batches(
    kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor, target: torch.Tensor
) -> list[dict[str, object]]:
    """The synthetic batch as evaluation batches of one slice each (one volume per slice)."""
    out = []
    for i in range(kspace.shape[0]):
        out.append(
            {
                "masked_kspace": kspace[i : i + 1],
                "mask": mask[i : i + 1],
                "sens_maps": maps[i : i + 1],
                "target": target[i : i + 1],
                "scale": torch.ones(1),
                "max_value": target[i].max()[None],
                "site": ["synthetic"],
                "fname": [f"slice{i}"],
                "slice_idx": torch.tensor([0]),
            }
        )
    return out


class _Batches(list):
    """Batches with the ``dataset`` attribute :func:`train` reads its example count from."""

    @property
    def dataset(self) -> list[int]:
        return list(range(len(self)))


def check_model(name: str, args: argparse.Namespace) -> tuple[list[object], bool]:
    """One table row for ``name`` and whether all its checks passed."""
    cuda = torch.device("cuda")
    kspace, mask, maps, target = synthetic_batch(args.batch, args.coils, args.size, seed=0)
    torch.manual_seed(0)
    cpu_model = build_model(name, **SMALL[name]).eval()
    gpu_model = copy.deepcopy(cpu_model).to(cuda).eval()
    inputs = (kspace, mask, maps)
    gpu_inputs = tuple(t.to(cuda) for t in inputs)
    with torch.no_grad():
        reference = cpu_model(*inputs)
        fp32_error = _rel(gpu_model(*gpu_inputs), reference)
        with autocast(cuda, "bf16"):
            bf16_error = _rel(gpu_model(*gpu_inputs), reference)
    batches = _batches(kspace, mask, maps, target)
    psnr_cpu = evaluate(cpu_model, batches).metrics["psnr"]
    psnr_gpu = evaluate(gpu_model, batches, device=cuda).metrics["psnr"]
    stepped: dict[str, dict[str, torch.Tensor]] = {}
    for label, device in (("cpu", torch.device("cpu")), ("cuda", cuda)):
        model = copy.deepcopy(cpu_model)
        train(model, _Batches(batches), steps=1, lr=1e-4, device=device)
        stepped[label] = cpu_state_dict(model)
    weights_ok = all(v.device.type == "cpu" for v in stepped["cuda"].values())
    step_error = max(
        _rel(stepped["cuda"][k], stepped["cpu"][k]) for k in stepped["cpu"] if stepped["cpu"][k].is_floating_point()
    )
    speeds = []
    for device, precision in ((torch.device("cpu"), "fp32"), (cuda, "fp32"), (cuda, "bf16")):
        model = copy.deepcopy(cpu_model).to(device)
        speeds.append(
            training_throughput(model, tuple(t.to(device) for t in inputs), target.to(device), args.steps, precision)
        )
    ok = (
        fp32_error < args.tol_fp32
        and bf16_error < args.tol_bf16
        and abs(psnr_gpu - psnr_cpu) < 0.05
        and weights_ok
        and step_error < args.tol_fp32
    )
    row = [
        name,
        f"{fp32_error:.1e}",
        f"{bf16_error:.1e}",
        f"{psnr_cpu - psnr_gpu:+.3f}",
        f"{step_error:.1e}",
        f"{speeds[0]:.1f}",
        f"{speeds[1]:.1f}",
        f"{speeds[2]:.1f}",
        "ok" if ok else "FAIL",
    ]
    return row, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per throughput figure")
    parser.add_argument("--tol-fp32", type=float, default=1e-3, help="relative max error, CUDA fp32 vs CPU fp32")
    parser.add_argument("--tol-bf16", type=float, default=5e-2, help="relative max error, CUDA bf16 vs CPU fp32")
    parser.add_argument("--models", nargs="+", choices=sorted(SMALL), default=sorted(SMALL))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print(
            f"bench.cuda_check: no CUDA device visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    rows, all_ok = [], True
    for name in args.models:
        row, ok = check_model(name, args)
        rows.append(row)
        all_ok &= ok
    print(
        f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {args.size}² px, {args.coils} coils, batch {args.batch}"
    )
    print(
        "| model | fp32 rel err | bf16 rel err | PSNR cpu−cuda (dB) | train-step rel err | CPU slices/s | CUDA fp32 | CUDA bf16 | |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
