"""Training at the machine's limit: counted FLOPs against this CPU's measured peak, fp32 / bf16 / compile.

``python -m bench.models --limit`` runs all of it in one process, side by side, and prints markdown tables:

1. the CPU's fp32 and bf16 matmul peak (GFLOP/s, 1024² ``torch.mm``, best of repeats);
2. for both default models at 128² (the U-Net of the run config's default, the unrolled-DC configuration of
   ``make demo``), 16 coils, batch 4: FLOPs per training slice (forward + backward, counted by
   ``torch.utils.flop_counter``: convolutions and matmuls; FFTs and element-wise maths are not counted),
   slices/s in fp32, bf16 autocast and bf16 + ``torch.compile``, the achieved GFLOP/s and its fraction of
   the peak of the same precision;
3. test PSNR after an equal step budget in fp32 and bf16, over several seeds, with the paired difference
   and its 95 % bootstrap interval over (seed, slice) pairs;
4. a real federated round (``fedsense simulate``, 3 sites, unrolled-DC): training steps per CPU-second and
   per wall second of each site, before (``precision = fp32``, slice cache off; with ``--before-ref REF`` the
   product's code as it was at git commit REF) and after (``precision = auto``, slice cache on, this code),
   both runs at the same time;
5. ``fedsense reconstruct``'s volumes/s on a 128², 16-slice (BraTS-style NIfTI) volume, fp32 and auto,
   with the model the "after" run trained.

Rates are per CPU-second of the process doing the work (``time.process_time``; 1 torch thread) where the
machine is shared: other jobs then slow the wall clock, not the count. Wall rates are printed beside
them for the federated round.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import markdown_table, model_recon, score_slices, write_sites
from bench.models import synthetic_batch, training_throughput
from common.data.loaders import InterleavedLoader, load_site, make_loader
from common.device import autocast, cpu_has_bf16
from common.models import build_model
from common.stats import paired_bootstrap
from common.training import train

logger = logging.getLogger("bench.limit")

#: The checkout this module belongs to: the "after" code of the federated round.
REPO = Path(__file__).resolve().parent.parent

#: The two default models: the run config's default and ``make demo``'s unrolled-DC configuration.
MODELS = {"unet": {}, "unrolled": {"num_cascades": 4, "chans": 32, "num_layers": 5}}


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """GFLOP/s of a square ``torch.mm`` in ``dtype`` per CPU-second: the best of ``repeats``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best / 1e9


def training_flops(model: nn.Module, inputs: tuple[Tensor, ...], target: Tensor) -> int:
    """FLOPs of one training step's forward and backward (fp32; the count is the same under bf16)."""
    twin = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        nn.functional.l1_loss(twin(*inputs), target).backward()
    return int(counter.get_total_flops())


def speed_table(args: argparse.Namespace, peaks: dict[str, float]) -> str:
    """FLOPs per slice, slices/s and the fraction of the measured peak, per model and precision."""
    kspace, mask, maps, target = synthetic_batch(args.batch, args.coils, args.size, seed=0)
    inputs = (kspace, mask, maps)
    rows = []
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, **kwargs)
        flops = training_flops(model, inputs, target) / args.batch
        variants = [("fp32", "fp32", False), ("bf16", "bf16", False)]
        if args.compile:
            variants.append(("bf16 + compile", "bf16", True))
        for label, precision, compiled in variants:
            logger.info("%s %s: timing %d training steps ...", name, label, args.steps)
            net = copy.deepcopy(model)
            started = time.perf_counter()
            runner = torch.compile(net) if compiled else net
            rate = max(
                training_throughput(runner, inputs, target, args.steps, precision, clock=time.process_time)
                for _ in range(args.limit_repeats)
            )
            gflops = rate * flops / 1e9
            rows.append(
                (
                    name,
                    label,
                    f"{flops / 1e9:.2f}",
                    f"{rate:.2f}",
                    f"{gflops:.1f}",
                    f"{100 * gflops / peaks[precision]:.0f} %",
                    f"{time.perf_counter() - started:.0f} s" if compiled else "",
                )
            )
    return markdown_table(
        [
            "model",
            "precision",
            "GFLOP / training slice",
            "slices per CPU-second",
            "GFLOP/s",
            "of this CPU's peak (same precision)",
            "compile + timing",
        ],
        rows,
    )


def quality_table(args: argparse.Namespace, sites: list[Path]) -> str:
    """Test PSNR after ``quality_steps`` pooled training steps, fp32 against bf16, over ``seeds`` seeds."""
    loaded = [load_site(str(p)) for p in sites]
    rows = []
    for name, kwargs in MODELS.items():
        scores: dict[str, list[float]] = {"fp32": [], "bf16": []}
        per_seed: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for seed in range(args.seeds):
            for precision in scores:
                logger.info(
                    "%s %s seed %d: %d training steps, then test PSNR ...", name, precision, seed, args.quality_steps
                )
                torch.manual_seed(seed)
                model = build_model(name, **kwargs)
                loader = InterleavedLoader(
                    [make_loader(d["train"], args.batch, shuffle=True, seed=seed, augment=True) for _, d in loaded]
                )
                train(model, loader, steps=args.quality_steps, lr=1e-3, precision=precision)
                model.eval()
                slices = [
                    s.psnr
                    for _, d in loaded
                    for s in score_slices(_at(model, precision), make_loader(d["test"], args.batch, False, 0))
                ]
                scores[precision] += slices
                per_seed[precision].append(float(np.mean(slices)))
        diff = paired_bootstrap(scores["bf16"], scores["fp32"])
        rows.append(
            (
                name,
                args.quality_steps,
                args.seeds,
                " / ".join(f"{v:.2f}" for v in per_seed["fp32"]),
                " / ".join(f"{v:.2f}" for v in per_seed["bf16"]),
                f"{diff} (n = {diff.n})",
            )
        )
    return markdown_table(
        [
            "model",
            "steps",
            "seeds",
            "test PSNR fp32 per seed (dB)",
            "bf16 per seed",
            "bf16 − fp32, mean [95 % CI] over (seed, slice)",
        ],
        rows,
    )


def _at(model: nn.Module, precision: str):  # returns a Recon callable
    """The model's evaluation reconstruction at ``precision`` (bf16: autocast network, metrics fp32)."""
    recon = model_recon(model)

    def run(batch: dict[str, object]) -> Tensor:
        with autocast(torch.device("cpu"), precision):
            return recon(batch).float()

    return run


def simulate(
    sites: list[Path],
    run_dir: Path,
    label: str,
    precision: str,
    args: argparse.Namespace,
    env: dict[str, str],
    code: Path = REPO,
) -> subprocess.Popen:
    """Start one ``fedsense simulate`` of the unrolled-DC demo configuration (output to ``run_dir``), running
    the packages found in ``code`` (first on PYTHONPATH and the working directory)."""
    model_args = json.dumps(MODELS["unrolled"])
    command = [
        str(Path(sys.executable).with_name("fedsense")),
        "simulate",
        "--sites",
        *map(str, sites),
        "--rounds",
        str(args.rounds),
        "--strategy",
        "fedavg",
        "--name",
        label,
        "--run-dir",
        str(run_dir),
        "--client-cpus",
        "1",
        "--model",
        "unrolled",
        "--set",
        f"model-args={model_args}",
        "--set",
        f"local-steps={args.local_steps}",
        "--set",
        "client-optimizer=keep",
        "--set",
        f"max-eval-slices={args.eval_slices}",
        "--set",
        f"precision={precision}",
    ]
    logger.info("%s (code in %s): %s", label, code, " ".join(command))
    env = {**env, "PYTHONPATH": os.pathsep.join([str(code), env.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, env=env, cwd=code, stdout=subprocess.DEVNULL)


def checkout(ref: str, dest: Path) -> Path:
    """The product's files at git commit ``ref`` (``git archive``), for a "before" run of older code."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--before-ref {ref}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def federated_table(args: argparse.Namespace, sites: list[Path], root: Path) -> tuple[str, Path]:
    """Training steps per CPU-second (and per wall second) per site and round, before and after.

    Both runs go at the same time, so whatever else loads the machine loads both alike; the rates come
    from the sites' own ``compute-cpu-seconds`` / ``compute-seconds`` in each run's metrics.jsonl.
    """
    # A fresh precision cache: round 1 of "after" pays auto's one-off timing, as on a new machine.
    base = {**os.environ, "FEDSENSE_PRECISION_CACHE": str(root / "precision-cache")}
    before_code = checkout(args.before_ref, root / "before-code") if args.before_ref else REPO
    at = f", code at {args.before_ref}" if args.before_ref else ""
    runs = {
        f"before (fp32, no slice cache{at})": ("fp32", {**base, "FEDSENSE_SLICE_CACHE_MB": "0"}, before_code),
        "after (auto, slice cache)": ("auto", base, REPO),
    }
    started = time.perf_counter()
    procs = [
        simulate(sites, root / f"run{i}", f"limit-{i}", precision, args, env, code)
        for i, (precision, env, code) in enumerate(runs.values())
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"fedsense simulate failed with status {proc.returncode}")
    logger.info("both federated runs: %.0f s", time.perf_counter() - started)
    cpu: list[dict[tuple[int, str], float]] = []
    wall: list[dict[tuple[int, str], float]] = []
    precisions: list[set[str]] = []
    for i in range(len(runs)):
        lines = (root / f"run{i}" / "metrics.jsonl").read_text().splitlines()
        records = [
            r for r in map(json.loads, filter(str.strip, lines)) if r["phase"] == "train" and r["site"] != "__global__"
        ]
        cpu.append(
            {(r["round"], r["site"]): r["metrics"]["steps"] / r["metrics"]["compute-cpu-seconds"] for r in records}
        )
        wall.append({(r["round"], r["site"]): r["metrics"]["steps"] / r["metrics"]["compute-seconds"] for r in records})
        precisions.append({str(r.get("precision", "?")) for r in records})
    rows = []
    for key in sorted(cpu[0]):
        rows.append(
            (
                key[0],
                key[1],
                f"{cpu[0][key]:.3f}",
                f"{cpu[1][key]:.3f}",
                f"{cpu[1][key] / cpu[0][key]:.2f}x",
                f"{wall[0][key]:.3f}",
                f"{wall[1][key]:.3f}",
                f"{wall[1][key] / wall[0][key]:.2f}x",
            )
        )
    last = max(k[0] for k in cpu[0])
    means = [[float(np.mean([v for k, v in d.items() if k[0] == last])) for d in pair] for pair in (cpu, wall)]
    rows.append(
        (
            f"{last}",
            "mean",
            f"{means[0][0]:.3f}",
            f"{means[0][1]:.3f}",
            f"{means[0][1] / means[0][0]:.2f}x",
            f"{means[1][0]:.3f}",
            f"{means[1][1]:.3f}",
            f"{means[1][1] / means[1][0]:.2f}x",
        )
    )
    before, after = runs
    table = markdown_table(
        ["round", "site", f"steps/CPU-s {before}", f"{after}", "ratio", f"steps/s wall {before}", f"{after}", "ratio"],
        rows,
    )
    table += (
        f"\n\nprecision recorded per site: before {sorted(precisions[0])}, after {sorted(precisions[1])}; "
        "round 1 of 'after' includes auto's one-off timing of fp32 against bf16 (empty precision cache)"
    )
    return table, root / "run1"


def reconstruct_seconds(model_dir: str, site: str, precision: str, repeats: int) -> tuple[str, int, float]:
    """CPU-seconds of ``fedsense reconstruct``'s Reconstructor for one volume of ``site``'s test split (best of
    ``repeats`` after a warm-up), the precision it ran at and the slice count.

    Self-contained (imports inside) so that its own source can time an older checkout's code too.
    """
    import time
    from pathlib import Path

    import torch

    from client.reconstruct import Reconstructor
    from common.artifact import load_artifact
    from common.data.loaders import load_site

    config, datasets = load_site(site)
    volume = datasets["test"].reader.examples[datasets["test"].indices[0]].path
    recon = Reconstructor(load_artifact(Path(model_dir)), device=torch.device("cpu"), precision=precision, site=config)
    prepared = recon.check(volume)
    recon.volume(volume, prepared)  # warm-up (and auto's one-off timing when uncached)
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        recon.volume(volume, prepared)
        best = min(best, time.process_time() - started)
    return str(recon.precision), len(prepared), best


def reconstruct_seconds_at(code: Path, *call_args: object) -> tuple[str, int, float]:
    """:func:`reconstruct_seconds` run in a fresh interpreter on the packages in ``code`` (an older checkout)."""
    script = "\n".join(
        [
            "import json, torch",
            f"torch.set_num_threads({torch.get_num_threads()})",  # this process's count: CPU-seconds compare
            inspect.getsource(reconstruct_seconds),
            f"print(json.dumps(reconstruct_seconds{call_args!r}))",
        ]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=code, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"timing reconstruct with the code in {code} failed:\n{done.stderr[-2000:]}")
    ran_at, slices, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return ran_at, slices, seconds


def reconstruct_table(args: argparse.Namespace, run_dir: Path, site: Path, root: Path) -> str:
    """``fedsense reconstruct``'s Reconstructor on one 128², 16-slice NIfTI volume (re-acquired by ``site``'s
    scanner, as the CLI does with --site-config): volumes/s at fp32 and at auto, best of the repeats; with
    ``--before-ref`` also fp32 with the code of that commit (the same model file)."""
    from server.export import export_run

    export_run(run_dir, root / "model", which="last")
    call = (str(root / "model"), str(site))
    runs: dict[str, tuple[str, int, float]] = {}
    if args.before_ref:
        runs[f"fp32, code at {args.before_ref}"] = reconstruct_seconds_at(
            root / "before-code", *call, "fp32", args.limit_repeats
        )
    for precision in ("fp32", "auto"):
        runs[precision] = reconstruct_seconds(*call, precision, args.limit_repeats)
    rows: list[tuple[object, ...]] = [
        (label, ran_at, slices, f"{seconds:.2f}", f"{1.0 / seconds:.2f}")
        for label, (ran_at, slices, seconds) in runs.items()
    ]
    first = next(iter(runs))
    rows += [(f"{label} ÷ {first}", "", "", "", f"{runs[first][2] / runs[label][2]:.2f}x") for label in list(runs)[1:]]
    return markdown_table(["--precision", "ran at", "slices", "CPU-s / volume", "volumes per CPU-second"], rows)


def run(args: argparse.Namespace) -> None:
    """All five parts, in one process on one warm machine; prints the tables as it goes."""
    started = time.perf_counter()
    print(
        f"load average at start {os.getloadavg()[0]:.2f}; {args.size}² px, {args.coils} coils, batch {args.batch}, "
        f"{torch.get_num_threads()} thread(s), native bf16 {cpu_has_bf16()}"
    )
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(
        f"\nmatmul peak (1024² torch.mm, best of 8, per CPU-second): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} "
        f"GFLOP/s ({peaks['bf16'] / peaks['fp32']:.2f}x)\n"
    )
    if "speed" in args.parts:
        print(speed_table(args, peaks), flush=True)
    with tempfile.TemporaryDirectory(prefix="fedsense-limit-") as tmp:
        root = Path(tmp)
        sites = write_sites(root / "sites", size=args.size, subjects=3, slices=args.slices)
        if "quality" in args.parts:
            print("\n" + quality_table(args, sites), flush=True)
        if "federated" in args.parts:
            table, after_run = federated_table(args, sites, root)
            print("\n" + table, flush=True)
            if "reconstruct" in args.parts:
                print("\n" + reconstruct_table(args, after_run, sites[1], root), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--limit`` options of ``python -m bench.models``."""
    group = parser.add_argument_group("machine limit (--limit): FLOPs vs peak, precisions, federated round")
    group.add_argument("--limit", action="store_true", help="run the machine-limit benchmark")
    group.add_argument(
        "--parts",
        nargs="+",
        default=["speed", "quality", "federated", "reconstruct"],
        choices=["speed", "quality", "federated", "reconstruct"],
    )
    group.add_argument("--no-compile", dest="compile", action="store_false", help="skip bf16 + torch.compile")
    group.add_argument("--limit-repeats", type=int, default=2, help="timing repeats (best kept)")
    group.add_argument("--seeds", type=int, default=3, help="seeds of the equal-budget PSNR comparison")
    group.add_argument("--limit-quality-steps", dest="quality_steps", type=int, default=30)
    group.add_argument("--slices", type=int, default=16, help="slices per demo volume")
    group.add_argument("--rounds", type=int, default=2, help="rounds of each federated run")
    group.add_argument("--local-steps", type=int, default=6, help="training steps per site and round")
    group.add_argument("--eval-slices", type=int, default=4, help="validation slices per site and round")
    group.add_argument(
        "--before-ref",
        help="git commit whose code runs the federated round's 'before' arm (default: this code at fp32)",
    )
