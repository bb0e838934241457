"""How the federated-vs-centralized and federated-vs-local gaps move with the optimisation budget.

``bench.quality`` has to fit in minutes, so its models stop far from convergence. This benchmark trains
longer on the same R = 4 sites and reads the test PSNR at several round counts of one run: local-only and
centralized with the product's baselines (``server.baseline``, a checkpoint every round), FedAvg emulated
in-process (``bench.harness.emulate_fedavg``: the ClientApp's training, Flower's weighted average, none
of the framework's ~1 minute start-up per run). The emulation is checked against one real Flower
simulation of the first round count: the weights must agree to float rounding. Run::

    python -m bench.budget
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench.harness import (
    emulate_fedavg,
    fresh_output,
    markdown_table,
    model_recon,
    score_slices,
    start_bench,
    write_sites,
)
from bench.quality import MODELS, run_config
from common.config_layers import updated
from common.data.dataset import SiteDataset
from common.data.loaders import load_site, make_loader
from common.models import build_model
from common.runconfig import RunConfig
from server.baseline import Baseline
from server.simulate import simulate
from server.store import RunDir

logger = logging.getLogger("bench.budget")


def _checkpoint_state(store: RunDir, rnd: int) -> dict[str, torch.Tensor]:
    return store.load_checkpoint(rnd)["state_dict"]


def _variant(run: RunConfig, out: Path, kind: str, **update: object) -> RunConfig:
    """``run`` under its own name and run directory ``<model>-<kind>``, with ``update`` applied."""
    name = f"{run.model}-{kind}"
    return updated(run, f"variant {kind}", name=name, run_dir=str(out / name), **update)


def site_psnr(
    model: str,
    model_args: dict[str, int],
    data: dict[str, dict[str, SiteDataset]],
    states: dict[str, dict[str, torch.Tensor]],
) -> dict[str, float]:
    """Mean test PSNR per site of the per-site weights ``states`` (one model per site)."""
    out = {}
    for site, weights in states.items():
        net = build_model(model, **model_args)
        net.load_state_dict(weights)
        scores = score_slices(model_recon(net), make_loader(data[site]["test"], 4, shuffle=False, seed=0))
        out[site] = float(np.mean([s.psnr for s in scores]))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults take 7 – 10 minutes on two shared cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-budget"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--acceleration", type=float, default=4.0)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[8, 16, 32], help="round counts read out")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.checkpoints = sorted(set(args.checkpoints))
    args.rounds = args.checkpoints[-1]
    # The rest of bench.quality's run config: a fixed budget of rounds, no early stop, no fine-tuning.
    args.max_rounds, args.patience, args.stop_rule, args.tracking_uri = args.rounds, 0, "global", ""
    args.fine_tune_eval_every, args.fine_tune_patience, args.fine_tune_warmup = 10, 0, 0
    return args


def main(argv: list[str] | None = None) -> None:
    """Train each model for the largest budget, score the test split at every checkpoint, print the gaps."""
    args = parse_args(argv)
    started = start_bench("budget", args.threads)
    print(
        f"R = {args.acceleration:g}, {args.size}², {args.subjects} subjects/site, {args.local_steps} local steps x "
        f"batch {args.batch} per round and site (centralized: 3x that per round), Adam lr {args.lr}"
    )
    out = args.out.resolve()
    fresh_output(out, args.overwrite)
    sites = write_sites(
        out / "sites", size=args.size, subjects=args.subjects, slices=args.slices, acceleration=args.acceleration
    )
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sites)}
    names = list(data)
    smallest = min(names, key=lambda n: len(data[n]["train"]))
    rows, checks = [], []
    for label in args.models:
        model, model_args = MODELS[label]
        test_psnr = partial(site_psnr, model, model_args, data)
        run = run_config(args, model, model_args, sites, out / model, args.seed)
        stores = {
            kind: Baseline(kind, _variant(run, out, kind)).execute()  # type: ignore[arg-type]
            for kind in ("local", "centralized")
        }
        fedavg = {}
        for rnd, state in emulate_fedavg(run, data):  # type: ignore[arg-type]
            if rnd in args.checkpoints:
                fedavg[rnd] = {k: v.clone() for k, v in state.items()}
        flower_run = _variant(run, out, "flower", num_server_rounds=args.checkpoints[0])
        flower = _checkpoint_state(simulate(flower_run, timeout=1800, report=logger.info), args.checkpoints[0])
        emulated = fedavg[args.checkpoints[0]]
        weight_gap = max(float((flower[k] - emulated[k]).abs().max()) for k in flower)
        flower_psnr = test_psnr({n: flower for n in names})
        for rnd in args.checkpoints:
            local_state = _checkpoint_state(stores["local"], rnd)
            local = test_psnr(
                {n: {k.split("/", 1)[1]: v for k, v in local_state.items() if k.startswith(f"{n}/")} for n in names}
            )
            central = test_psnr({n: _checkpoint_state(stores["centralized"], rnd) for n in names})
            fed = test_psnr({n: fedavg[rnd] for n in names})
            pooled = {
                k: float(np.average([v[n] for n in names], weights=[len(data[n]["test"]) for n in names]))
                for k, v in (("local", local), ("central", central), ("fed", fed))
            }
            rows.append(
                (
                    label,
                    rnd,
                    rnd * args.local_steps,
                    f"{pooled['local']:.2f}",
                    f"{pooled['central']:.2f}",
                    f"{pooled['fed']:.2f}",
                    f"{pooled['fed'] - pooled['central']:+.2f}",
                    f"{fed[smallest] - local[smallest]:+.2f}",
                )
            )
        checks.append(
            (
                label,
                args.checkpoints[0],
                f"{weight_gap:.2e}",
                " / ".join(f"{flower_psnr[n]:.2f}" for n in names),
                " / ".join(f"{v:.2f}" for v in test_psnr({n: emulated for n in names}).values()),
            )
        )
    print(f"\n### FedAvg emulation vs a real Flower simulation of the same config (test PSNR {' / '.join(names)})\n")
    print(markdown_table(("model", "rounds", "max abs Δweight", "Flower PSNR", "emulated PSNR"), checks))
    print(
        f"\n### Test PSNR (dB, mean over slices, all sites pooled) against the budget; {smallest} is the smallest site\n"
    )
    print(
        markdown_table(
            (
                "model",
                "rounds",
                "steps per site",
                "local",
                "centralized",
                "FedAvg",
                "FedAvg − centralized",
                f"FedAvg − local at {smallest}",
            ),
            rows,
        )
    )
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
