"""Self-supervised sites (SSDU): what a site without fully sampled data gets, on the held-out TEST split.

One site (default site-b) is trained three ways with the same data, mask (R = 4), unrolled model and budget
(``rounds x local-steps`` steps of batch ``batch``): supervised on its references (local), self-supervised
on its acquired k-space only (local, ``supervision = "self"``), and self-supervised inside a FedAvg
federation whose other two sites are supervised (a real Flower simulation). An all-supervised federation
is run for context. Every model is scored on the same test slices against the reference (which the
self-supervised runs never trained on). Differences are paired per slice, with 95 % bootstrap intervals over
test slices and over test volumes. Run::

    python -m bench.ssdu

It prints markdown tables and the status of the targets.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.harness import (
    SliceScore,
    Stopwatch,
    fresh_output,
    markdown_table,
    mean_std,
    model_recon,
    score_slices,
    start_bench,
    write_sites,
)
from common.data.loaders import load_site, make_loader
from common.models import build_model, count_parameters
from common.runconfig import RunConfig
from common.training import zero_filled
from server.baseline import Baseline
from server.simulate import simulate
from server.store import RunDir

logger = logging.getLogger("bench.ssdu")

MODEL = "unrolled"
MODEL_ARGS = {"num_cascades": 4, "chans": 32, "num_layers": 5}  # bench.quality's Unrolled-DC


def run_config(args: argparse.Namespace, sites: Sequence[Path], run_dir: Path) -> RunConfig:
    """One run config for every arm: same model, budget, optimiser and seed."""
    return RunConfig.from_flat(
        {
            "name": run_dir.name,
            "num-server-rounds": args.rounds,
            "strategy": "fedavg",
            "proximal-mu": 0.0,
            "model": MODEL,
            "model-args": MODEL_ARGS,
            "local-steps": args.local_steps,
            "batch-size": args.batch,
            "learning-rate": args.lr,
            "loss": "l1",
            "min-train-nodes": len(sites),
            "min-evaluate-nodes": len(sites),
            "min-available-nodes": len(sites),
            "sites": ",".join(str(p) for p in sites),
            "run-dir": str(run_dir),
            "num-samples": 0,
            "seed": args.seed,
            "resume": False,
            "ssdu-rho": args.rho,
            "ssdu-masks": args.masks,
        }
    )


def _final_state(store: RunDir, rounds: int, prefix: str = "") -> dict[str, torch.Tensor]:
    latest = store.latest_checkpoint()
    if latest is None or latest[0] != rounds:
        raise RuntimeError(f"{store.path}: expected a checkpoint of round {rounds}, found {latest and latest[0]}")
    state = latest[1]["state_dict"]
    if prefix:
        state = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{prefix}/")}
    return state


def _model(state: dict[str, torch.Tensor]) -> nn.Module:
    net = build_model(MODEL, **MODEL_ARGS)
    net.load_state_dict(state)
    return net


def bootstrap_ci(diffs: np.ndarray, groups: np.ndarray | None, samples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean paired difference: resampling slices, or whole ``groups``
    (volumes) with all their slices when given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, diffs.size, size=(samples, diffs.size))
        means = diffs[idx].mean(axis=1)
    else:
        labels = np.unique(groups)
        members = [diffs[groups == g] for g in labels]
        picks = rng.integers(0, labels.size, size=(samples, labels.size))
        means = np.array([np.concatenate([members[j] for j in row]).mean() for row in picks])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired(a: list[SliceScore], b: list[SliceScore], args: argparse.Namespace) -> tuple[float, tuple, tuple, int]:
    """Mean PSNR of ``a`` minus ``b`` over the same slices, with slice and volume bootstrap intervals."""
    key = lambda s: (s.volume, s.slice_idx)  # noqa: E731
    by_b = {key(s): s.psnr for s in b}
    diffs = np.array([s.psnr - by_b[key(s)] for s in a])
    volumes = np.array([s.volume for s in a])
    return (
        float(diffs.mean()),
        bootstrap_ci(diffs, None, args.bootstrap, args.seed),
        bootstrap_ci(diffs, volumes, args.bootstrap, args.seed),
        len(set(volumes)),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in about 10 minutes on two shared cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ssdu"), help="sites, data and run dirs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument(
        "--site",
        default="site-b",
        choices=("site-a", "site-b", "site-c"),
        help="the site that has no fully sampled data",
    )
    parser.add_argument("--acceleration", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=64, help="image matrix (pixels per side)")
    parser.add_argument("--subjects", type=int, default=8, help="demo subjects per site (split 60/20/20)")
    parser.add_argument("--slices", type=int, default=6, help="slices per volume")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rho", type=float, default=0.4, help="ssdu-rho: fraction of Ω held back as Θ")
    parser.add_argument("--masks", type=int, default=1, help="ssdu-masks: Λ/Θ splits per slice and step")
    parser.add_argument("--bootstrap", type=int, default=5000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (here and in Flower)")
    parser.add_argument(
        "--no-federation",
        action="store_true",
        help="only the site's local arms (e.g. to see how the gap moves with the budget)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train the arms, score the site's test split, print the tables and the targets' status."""
    args = parse_args(argv)
    started = start_bench("ssdu", args.threads)
    clock = Stopwatch()
    print(
        f"{args.size}² images, R = {args.acceleration:g}, {args.subjects} subjects/site ({args.slices} slices per "
        f"volume), {args.rounds} rounds x {args.local_steps} local steps x batch {args.batch}, Adam lr {args.lr}; "
        f"model {MODEL} {MODEL_ARGS} ({count_parameters(build_model(MODEL, **MODEL_ARGS)):,} parameters); "
        f"supervised loss L1, SSDU rho {args.rho}, {args.masks} mask(s) per slice; seed {args.seed}"
    )
    out = args.out
    fresh_output(out, args.overwrite)
    with clock.stage("demo data"):
        sites = write_sites(
            out / "sites", size=args.size, subjects=args.subjects, slices=args.slices, acceleration=args.acceleration
        )
    supervised = next(p for p in sites if p.stem == args.site)
    selfsup = supervised.with_name(f"{args.site}-self.toml")
    # Top-level key first: appended, it would land in the TOML's last table.
    selfsup.write_text('supervision = "self"\n' + supervised.read_text(encoding="utf-8"), encoding="utf-8")
    others = [p for p in sites if p != supervised]
    _, data = load_site(str(supervised))
    print(f"{args.site}: train/val/test slices {len(data['train'])}/{len(data['val'])}/{len(data['test'])}")

    states: dict[str, dict[str, torch.Tensor]] = {}
    for label, path in (("self-supervised local", selfsup), ("supervised local", supervised)):
        run = run_config(args, [path], out / "runs" / label.replace(" ", "-"))
        with clock.stage(label):
            store = Baseline("local", run).execute()
        states[label] = _final_state(store, args.rounds, prefix=args.site)
    federations = (
        ("FedAvg, this site self-supervised", [selfsup, *others]),
        ("FedAvg, all supervised (context)", [supervised, *others]),
    )
    for label, members in () if args.no_federation else federations:
        run = run_config(args, members, out / "runs" / ("fedavg-mixed" if "self" in label else "fedavg-supervised"))
        with clock.stage(f"{label} (Flower simulation)"):
            store = simulate(run, timeout=1800, report=logger.info)
        states[label] = _final_state(store, args.rounds)

    with clock.stage("test scoring"):
        loader = make_loader(data["test"], 4, shuffle=False, seed=0)
        scores = {"zero-filled": score_slices(zero_filled, loader)}
        scores.update({label: score_slices(model_recon(_model(state)), loader) for label, state in states.items()})

    print(f"\n### {args.site} at R = {args.acceleration:g}: test split (mean ± std over slices)\n")
    print(
        markdown_table(
            ("method", "slices", "PSNR (dB)", "SSIM", "NMSE"),
            (
                (
                    label,
                    len(s),
                    mean_std([x.psnr for x in s], 2),
                    mean_std([x.ssim for x in s], 3),
                    mean_std([x.nmse for x in s], 4),
                )
                for label, s in scores.items()
            ),
        )
    )

    comparisons = [
        ("self-supervised local − supervised local", "self-supervised local", "supervised local", -1.0),
        ("self-supervised local − zero-filled", "self-supervised local", "zero-filled", 3.0),
        (
            "federated (self-supervised in FedAvg) − self-supervised local",
            "FedAvg, this site self-supervised",
            "self-supervised local",
            0.0,
        ),
        ("context: supervised FedAvg − supervised local", "FedAvg, all supervised (context)", "supervised local", None),
    ]
    rows = []
    for text, a, b, target in comparisons:
        if a not in scores:  # --no-federation
            continue
        mean, by_slice, by_volume, volumes = paired(scores[a], scores[b], args)
        if target is None:
            goal, status = "-", "-"
        elif target == 0.0:  # "gains": the whole interval above zero
            goal = "> 0 dB (95 % CI above 0)"
            status = "met" if min(by_slice[0], by_volume[0]) > 0 else "not shown"
        else:
            goal = f"≥ {target:+.2f} dB"
            status = "met" if mean >= target else f"missed by {target - mean:.2f} dB"
        rows.append(
            (
                text,
                f"{mean:+.2f} dB",
                f"[{by_slice[0]:+.2f}, {by_slice[1]:+.2f}]",
                f"[{by_volume[0]:+.2f}, {by_volume[1]:+.2f}] ({volumes} volumes)",
                goal,
                status,
            )
        )
    print(
        f"\n### Targets: paired PSNR differences at {args.site} (test split; 95 % bootstrap CI, "
        f"{args.bootstrap} resamples)\n"
    )
    print(markdown_table(("comparison", "mean", "CI over slices", "CI over volumes", "target", "status"), rows))
    print("\n### Wall time per stage\n")
    print(markdown_table(("stage", "seconds"), ((k, f"{v:.0f}") for k, v in clock.seconds.items())))
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
