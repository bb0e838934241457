"""Stragglers: round time and final quality with one slow site, without and with the round deadline.

Three simulated sites at 64²; site-c rehearses a machine ``--slowdown`` times slower (its site TOML's
``[rehearsal] slowdown``). Three arms run the same rounds: no deadline (every round waits for site-c),
``round-deadline`` (rounds aggregate without it), and the deadline with ``adaptive-local-steps`` (site-c
gets the steps that fit). Printed side by side: the mean train-phase seconds of rounds 2.. (round 1 holds
the simulation's start-up), the final model's validation PSNR over every site's slices (scored here,
from the last checkpoint), and the ratios to the no-deadline arm. Run::

    python -m bench.stragglers [--rounds 6 --slowdown 4 --deadline 0.8 --out runs/bench-stragglers]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import numpy as np

from bench.harness import fresh_output, markdown_table, model_recon, score_slices, start_bench, write_sites
from bench.quality import simulate_sites
from common.data.loaders import load_site, make_loader
from common.errors import FedSenseError
from common.models import build_model
from common.runconfig import RunConfig
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger(__name__)

MODEL_ARGS = {"chans": 8, "num_pool_layers": 2}
SLOW_SITE = "site-c"
#: name -> (round-deadline on?, adaptive-local-steps)
ARMS = {"no deadline": (False, False), "deadline": (True, False), "deadline + adaptive": (True, True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-stragglers"), help="sites and run directories")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--slowdown", type=float, default=4.0, help=f"{SLOW_SITE}'s rehearsal slowdown")
    parser.add_argument("--deadline", type=float, default=0.8, help="round-deadline of the deadline arms (s)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--client-cpus", type=int, default=1, help="cores (and torch threads) per simulated site")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of: {', '.join(ARMS)}")
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    return args


def sites(args: argparse.Namespace) -> list[Path]:
    """The three demo sites, site-c slowed by ``--slowdown``."""
    paths = write_sites(args.out / "sites", size=args.size, subjects=args.subjects, slices=args.slices)
    slow = next(p for p in paths if p.stem == SLOW_SITE)
    slow.write_text(
        slow.read_text(encoding="utf-8") + f"\n[rehearsal]\nslowdown = {args.slowdown!r}\n", encoding="utf-8"
    )
    return paths


def run_arm(args: argparse.Namespace, name: str, paths: list[Path]) -> dict[str, float]:
    """One arm's simulation: mean round seconds (rounds 2..), stragglers per round, final validation PSNR."""
    deadline, adaptive = ARMS[name]
    run = RunConfig.from_flat(
        {
            "name": f"stragglers-{name.replace(' ', '').replace('+', '-')}",
            "num-server-rounds": args.rounds,
            "strategy": "fedavg",
            "model-args": json.dumps(MODEL_ARGS),
            "local-steps": args.local_steps,
            "batch-size": 2,
            "learning-rate": 3e-3,
            "fraction-evaluate": 0.0,
            "min-train-nodes": 2,
            "min-available-nodes": len(paths),
            "round-deadline": args.deadline if deadline else 0.0,
            "adaptive-local-steps": adaptive,
            "round-timeout": 600.0,
            "precision": "fp32",
            "seed": args.seed,
            "sites": ",".join(map(str, paths)),
            "run-dir": str(args.out / "runs" / name.replace(" ", "")),
            "resume": False,
        }
    )
    store = simulate_sites(run, args.client_cpus)
    train = sorted(
        (r for r in store.read_metrics() if r["phase"] == "train" and r["site"] == GLOBAL_SITE),
        key=lambda r: r["round"],
    )
    later = [r["seconds"] for r in train if r["round"] >= 2]
    return {
        "round_seconds": statistics.mean(later),
        "stragglers": statistics.mean(len(r.get("stragglers", [])) for r in train),
        "psnr": final_psnr(store, paths),
    }


def final_psnr(store: RunDir, paths: list[Path]) -> float:
    """Mean per-slice validation PSNR of the run's last global model over every site."""
    latest = store.latest_checkpoint()
    if latest is None:
        raise FedSenseError(f"{store.checkpoint_dir}: no checkpoint")
    model = build_model("unet", **MODEL_ARGS)
    model.load_state_dict(latest[1]["state_dict"])
    recon = model_recon(model)
    scores = [
        s.psnr
        for p in paths
        for s in score_slices(recon, make_loader(load_site(str(p))[1]["val"], 4, shuffle=False, seed=0))
    ]
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> list[tuple]:
    args = parse_args(argv)
    start_bench("stragglers", args.client_cpus)
    fresh_output(args.out, args.overwrite)
    paths = sites(args)
    results = {name: run_arm(args, name, paths) for name in args.arms}
    base = results.get("no deadline")

    def ratio(r: dict[str, float]) -> tuple[str, str]:
        if base is None:
            return "-", "-"
        return f"{r['round_seconds'] / base['round_seconds']:.2f}×", f"{r['psnr'] - base['psnr']:+.2f}"

    rows = [
        (name, f"{r['round_seconds']:.2f}", ratio(r)[0], f"{r['stragglers']:.2f}", f"{r['psnr']:.2f}", ratio(r)[1])
        for name, r in results.items()
    ]
    print(
        f"{args.rounds} rounds, {args.local_steps} local steps, {SLOW_SITE} {args.slowdown:g}× slower, "
        f"round-deadline {args.deadline:g} s, seed {args.seed}"
    )
    print(
        markdown_table(
            ("arm", "round s (2..)", "× no deadline", "stragglers / round", "final val PSNR (dB)", "Δ dB"), rows
        )
    )
    return rows


if __name__ == "__main__":
    main()
