"""CPU benchmark of the reconstruction models: size, training throughput and inference latency.

Sites train on hospital CPUs, so this tells an operator what a round will cost for each model. Run from
the repository root::

    python -m bench.models --size 96 --coils 4 --batch 2 --steps 5

Training throughput counts forward + backward + Adam step; inference is ``eval()`` under ``no_grad``.
The inputs are synthetic (random image, birdcage maps, column mask): speed does not depend on content.
"""

import argparse
import logging
import time

import torch
from torch import Tensor, nn

from common.coils import birdcage_maps
from common.fft import fft2c
from common.models import MODEL_NAMES, build_model, count_parameters

logger = logging.getLogger("bench.models")


def synthetic_batch(batch: int, coils: int, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(masked_kspace, mask, sens_maps, target) at 4x column undersampling with 8% centre lines."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, size, size, dtype=torch.complex64, generator=generator)
    maps = torch.from_numpy(birdcage_maps(coils, (size, size))).expand(batch, -1, -1, -1)
    cols = torch.rand(batch, 1, 1, size, generator=generator) < 0.25
    centre = max(1, round(0.08 * size))
    cols[..., (size - centre + 1) // 2 : (size - centre + 1) // 2 + centre] = True
    mask = cols.expand(batch, 1, size, size).float()
    kspace = fft2c(image.unsqueeze(1) * maps) * mask
    return kspace, mask, maps.contiguous(), image.abs()


def training_throughput(model: nn.Module, inputs: tuple[Tensor, Tensor, Tensor], target: Tensor, steps: int) -> float:
    """Slices per second of full training steps, after one untimed warm-up step."""
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = nn.functional.l1_loss(model(*inputs), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * target.shape[0] / (time.perf_counter() - start)


def inference_latency(model: nn.Module, inputs: tuple[Tensor, Tensor, Tensor], repeats: int) -> float:
    """Milliseconds per slice in eval mode, after one untimed warm-up pass."""
    model.eval()
    with torch.no_grad():
        model(*inputs)
        start = time.perf_counter()
        for _ in range(repeats):
            model(*inputs)
    return 1000.0 * (time.perf_counter() - start) / (repeats * inputs[0].shape[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in well under two minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="image height and width in pixels")
    parser.add_argument("--coils", type=int, default=4, help="number of receive coils")
    parser.add_argument("--batch", type=int, default=2, help="slices per batch")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps and inference passes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    args = parser.parse_args(argv)
    if min(args.size, args.coils, args.batch, args.steps, args.threads) < 1:
        parser.error("--size, --coils, --batch, --steps and --threads must all be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Benchmark each model with its default (build_model) configuration and print a table to stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kspace, mask, maps, target = synthetic_batch(args.batch, args.coils, args.size, seed=0)
    inputs = (kspace, mask, maps)

    rows = []
    for name in args.models:
        logger.info("benchmarking %s ...", name)
        model = build_model(name)
        rows.append(
            (
                name,
                count_parameters(model),
                training_throughput(model, inputs, target, args.steps),
                inference_latency(model, inputs, args.steps),
            )
        )

    print(
        f"CPU, {args.threads} thread(s), torch {torch.__version__}: "
        f"{args.size}x{args.size} px, {args.coils} coils, batch {args.batch}, {args.steps} timed steps"
    )
    print(f"{'model':<10} {'params':>10} {'train slices/s':>15} {'infer ms/slice':>15}")
    for name, params, throughput, latency in rows:
        print(f"{name:<10} {params:>10,} {throughput:>15.2f} {latency:>15.1f}")


if __name__ == "__main__":
    main()
