"""CPU benchmark of the reconstruction models: size, training throughput and inference latency.

Sites train on hospital CPUs, so this tells an operator what a round will cost for each model. Run from
the repository root::

    python -m bench.models --size 96 --coils 4 --batch 2 --steps 5
    python -m bench.models --compare-fastmri --steps 10   # ours vs the fastmri package's U-Net and VarNet
    python -m bench.models --precision-compare           # fp32 vs bf16 autocast: speed and test PSNR
    python -m bench.models --limit --size 128 --coils 16 --batch 4   # FLOPs vs peak, federated round (bench.limit)

Training throughput counts forward + backward + Adam step; inference is ``eval()`` under ``no_grad``.
The inputs are synthetic (random image, birdcage maps, column mask): speed does not depend on content.

The fastMRI reference implementations live in a separate, git-ignored virtual environment ``.bench-venv``
(``fastmri`` pins old torchvision / Lightning versions the product does not want; setup in
docs/BENCHMARKS.md); when ``fastmri`` is not importable here,
``--compare-fastmri`` re-runs this script under ``--reference-python`` with the repository on
``PYTHONPATH``, so both implementations are timed in the same process with the same torch.
"""

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from common.coils import birdcage_maps
from common.device import autocast, cpu_has_bf16
from common.fft import fft2c
from common.models import MODEL_NAMES, build_model, count_parameters
from common.models.unet import Unet
from common.models.varnet import VarNet

logger = logging.getLogger("bench.models")

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = ROOT / ".bench-venv" / "bin" / "python"


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


def training_throughput(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    target: Tensor,
    steps: int,
    precision: str = "fp32",
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Slices per second of full training steps, after one untimed warm-up step (bf16: autocast network).

    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time only, which
    other jobs on a shared machine do not inflate.
    """
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = target.device

    def step() -> None:
        with autocast(device, precision):
            pred = model(*inputs)
        loss = nn.functional.l1_loss(pred.float(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    step()
    _sync(device)
    start = clock()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * target.shape[0] / (clock() - start)


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall time measures the GPU's work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_latency(model: nn.Module, inputs: tuple[Tensor, ...], repeats: int) -> float:
    """Milliseconds per slice in eval mode, after one untimed warm-up pass."""
    model.eval()
    with torch.no_grad():
        model(*inputs)
        start = time.perf_counter()
        for _ in range(repeats):
            model(*inputs)
    return 1000.0 * (time.perf_counter() - start) / (repeats * inputs[0].shape[0])


Pair = tuple[str, nn.Module, nn.Module, tuple[Tensor, ...], tuple[Tensor, ...], Tensor]


def reference_pairs(args: argparse.Namespace, kspace: Tensor, mask: Tensor, maps: Tensor, target: Tensor) -> list[Pair]:
    """(name, ours, fastMRI's, our inputs, fastMRI's inputs, target) at equal configurations.

    The U-Nets are the bare networks on a one-channel image; the VarNets take the same k-space, ours as
    complex (B,C,H,W) with a (B,1,H,W) mask, fastMRI's as (B,C,H,W,2) real with a (B,1,1,W,1) column mask.
    """
    import fastmri.models as reference

    torch.manual_seed(0)
    image = (target.unsqueeze(1),)
    unet = (
        f"U-Net chans={args.unet_chans} pools={args.unet_pools}",
        Unet(1, 1, args.unet_chans, args.unet_pools),
        reference.Unet(1, 1, args.unet_chans, args.unet_pools),
        image,
        image,
        target.unsqueeze(1),
    )
    columns = mask[:, :, :1, :].unsqueeze(-1).bool()  # synthetic_batch draws whole columns
    varnet = (
        (
            f"VarNet cascades={args.varnet_cascades} chans={args.varnet_chans} pools={args.varnet_pools} "
            f"sens {args.varnet_sens_chans}/{args.varnet_sens_pools}"
        ),
        VarNet(
            args.varnet_cascades, args.varnet_chans, args.varnet_pools, args.varnet_sens_chans, args.varnet_sens_pools
        ),
        reference.VarNet(
            num_cascades=args.varnet_cascades,
            sens_chans=args.varnet_sens_chans,
            sens_pools=args.varnet_sens_pools,
            chans=args.varnet_chans,
            pools=args.varnet_pools,
        ),
        (kspace, mask, maps),
        (torch.view_as_real(kspace).contiguous(), columns),
        target,
    )
    return [unet, varnet]


def compare_fastmri(args: argparse.Namespace, argv: list[str]) -> None:
    """Time ours and fastMRI's models alternately in this process; print the best of the repeats and ratios."""
    try:
        import fastmri
    except ImportError:
        python = Path(args.reference_python)
        if not python.exists():
            raise SystemExit(f"fastmri is not importable and {python} does not exist; see docs/BENCHMARKS.md") from None
        logger.info("fastmri not importable here; re-running under %s", python)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        raise SystemExit(
            subprocess.run([str(python), "-m", "bench.models", *argv], cwd=ROOT, env=env, check=False).returncode
        ) from None

    kspace, mask, maps, target = synthetic_batch(args.batch, args.coils, args.size, seed=0)
    rows = []
    for name, ours, ref, ours_in, ref_in, goal in reference_pairs(args, kspace, mask, maps, target):
        logger.info("timing %s (%d repeats, alternating) ...", name, args.repeats)
        timings: dict[str, list[tuple[float, float]]] = {"ours": [], "fastmri": []}
        for _ in range(args.repeats):
            for label, model, inputs in (("ours", ours, ours_in), ("fastmri", ref, ref_in)):
                timings[label].append(
                    (training_throughput(model, inputs, goal, args.steps), inference_latency(model, inputs, args.steps))
                )
        # Best of the repeats: on a shared machine other jobs only ever slow a repeat down.
        train_o, train_r = (max(t[0] for t in timings[k]) for k in ("ours", "fastmri"))
        infer_o, infer_r = (min(t[1] for t in timings[k]) for k in ("ours", "fastmri"))
        rows.append(
            (
                name,
                count_parameters(ours),
                count_parameters(ref),
                train_o,
                train_r,
                train_o / train_r,
                infer_o,
                infer_r,
                infer_r / infer_o,
            )
        )
    print(
        f"CPU, {args.threads} thread(s), torch {torch.__version__}, fastmri {fastmri.__version__}: "
        f"{args.size}x{args.size} px, {args.coils} coils, batch {args.batch}, {args.steps} timed steps x "
        f"{args.repeats} alternating repeats (best of the repeats)"
    )
    print(
        "| model | params ours | params fastMRI | train slices/s ours | fastMRI | speed ratio | "
        "infer ms/slice ours | fastMRI | speed ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, p_ours, p_ref, tr_o, tr_r, tr_ratio, inf_o, inf_r, inf_ratio in rows:
        print(
            f"| {name} | {p_ours:,} | {p_ref:,} | {tr_o:.2f} | {tr_r:.2f} | {tr_ratio:.2f} | "
            f"{inf_o:.1f} | {inf_r:.1f} | {inf_ratio:.2f} |"
        )
    print(
        "\nspeed ratio = ours ÷ fastMRI in slices/s (training) and fastMRI ÷ ours in ms/slice (inference): "
        "> 1 means ours is faster"
    )


def precision_quality(name: str, precision: str, sites: list[Path], steps: int, batch: int) -> float:
    """Example-weighted test PSNR after ``steps`` pooled training steps at ``precision`` (same seed, data, budget)."""
    from common.data.loaders import InterleavedLoader, load_site, make_loader
    from common.training import evaluate, train

    loaded = [load_site(str(p)) for p in sites]
    torch.manual_seed(0)
    model = build_model(name)
    loader = InterleavedLoader([make_loader(d["train"], batch, shuffle=True, seed=0) for _, d in loaded])
    train(model, loader, steps=steps, lr=1e-3, precision=precision)
    total, weighted = 0, 0.0
    for _, datasets in loaded:
        result = evaluate(model, make_loader(datasets["test"], batch, shuffle=False, seed=0), precision=precision)
        total += result.num_examples
        weighted += result.metrics["psnr"] * result.num_examples
    return weighted / total


def compare_precision(args: argparse.Namespace) -> None:
    """fp32 vs bf16 autocast per model: training throughput (synthetic) and test PSNR at equal budget (demo sites)."""
    import tempfile

    from bench.harness import write_sites

    kspace, mask, maps, target = synthetic_batch(args.batch, args.coils, args.size, seed=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsense-precision-") as tmp:
        sites = write_sites(Path(tmp), size=args.size, subjects=3, slices=args.quality_slices)
        for name in args.models:
            speed, quality = {}, {}
            for precision in ("fp32", "bf16"):
                logger.info(
                    "%s %s: throughput, then %d training steps for test PSNR ...", name, precision, args.quality_steps
                )
                torch.manual_seed(0)
                speed[precision] = training_throughput(
                    build_model(name), (kspace, mask, maps), target, args.steps, precision
                )
                quality[precision] = precision_quality(name, precision, sites, args.quality_steps, args.batch)
            rows.append((name, speed["fp32"], speed["bf16"], quality["fp32"], quality["bf16"]))
    print(
        f"CPU, {args.threads} thread(s), torch {torch.__version__}, native bf16: {cpu_has_bf16()}: "
        f"throughput at {args.size}x{args.size} px, {args.coils} coils, batch {args.batch}, {args.steps} timed steps; "
        f"test PSNR after {args.quality_steps} pooled steps on the three demo sites at {args.size}²"
    )
    print("| model | train slices/s fp32 | bf16 | speed-up | test PSNR fp32 (dB) | bf16 | bf16 − fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, s32, s16, q32, q16 in rows:
        print(f"| {name} | {s32:.2f} | {s16:.2f} | {s16 / s32:.2f} | {q32:.2f} | {q16:.2f} | {q16 - q32:+.2f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in well under two minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="image height and width in pixels")
    parser.add_argument("--coils", type=int, default=4, help="number of receive coils")
    parser.add_argument("--batch", type=int, default=2, help="slices per batch")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps and inference passes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    prec = parser.add_argument_group("fp32 vs bf16 autocast (throughput and test PSNR at the same budget)")
    prec.add_argument("--precision-compare", action="store_true", help="compare fp32 with bf16 autocast")
    prec.add_argument("--quality-steps", type=int, default=60, help="pooled training steps before the test PSNR")
    prec.add_argument("--quality-slices", type=int, default=6, help="slices per demo volume")
    ref = parser.add_argument_group("fastMRI comparison (equal configurations of both implementations)")
    ref.add_argument("--compare-fastmri", action="store_true", help="time ours against the fastmri package")
    ref.add_argument("--reference-python", default=str(REFERENCE_PYTHON), help="interpreter that has fastmri")
    ref.add_argument("--repeats", type=int, default=5, help="alternating repeats per implementation")
    ref.add_argument("--unet-chans", type=int, default=32)
    ref.add_argument("--unet-pools", type=int, default=4)
    ref.add_argument("--varnet-cascades", type=int, default=4)
    ref.add_argument("--varnet-chans", type=int, default=8)
    ref.add_argument("--varnet-pools", type=int, default=2)
    ref.add_argument("--varnet-sens-chans", type=int, default=4)
    ref.add_argument("--varnet-sens-pools", type=int, default=2)
    from bench import limit

    limit.add_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.size, args.coils, args.batch, args.steps, args.threads, args.repeats) < 1:
        parser.error("--size, --coils, --batch, --steps, --threads and --repeats must all be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Benchmark each model with its default (build_model) configuration, or (``--compare-fastmri``) ours
    against fastMRI's at equal configurations, and print a table to stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.compare_fastmri:
        compare_fastmri(args, argv)
        return
    if args.limit:
        from bench import limit

        limit.run(args)
        return
    if args.precision_compare:
        compare_precision(args)
        return
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
