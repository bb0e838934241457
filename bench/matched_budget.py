"""Does the local arm of a finished ``bench.quality`` run win only because it trained longer?

``server.baseline``'s local arm trains until *every* site has run out of its own patience, so it can train
more rounds than a federated arm that stops on its mean validation PSNR. This re-selects each local site's
model at its best validation round within the first N rounds, N = the rounds the reference federated arm
trained in the same seed (the same steps per site), scores it on the test split, and reports
``local (own stop) − local (capped at N)`` per site with the hierarchical bootstrap CI (seeds, subjects,
slices): the part of any "local beats federated" gap that the longer training explains. Checkpoints of
every round must still be in the run directories (``bench.quality`` keeps them). Run::

    python -m bench.matched_budget runs/bench-quality/R4 --arms local-layers fedavg
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from bench.harness import model_recon, set_threads
from bench.quality import MODELS, MULTI_SEED_MODEL, learn_subjects, load_model, score_split, subject_of
from common.data.loaders import load_site
from common.errors import ConfigError
from common.stats import hierarchical_bootstrap
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger("bench.matched_budget")


def site_psnr(run: Path) -> dict[str, dict[int, float]]:
    """site (and ``__global__``) -> round -> validation PSNR of a run directory (rounds >= 1)."""
    store = RunDir(run)
    if not store.metrics_path.is_file():
        raise ConfigError(f"{store.metrics_path}: no metrics (is {run} a bench.quality run directory?)")
    values: dict[str, dict[int, float]] = {}
    for record in store.read_metrics(dedupe=True):
        if record["phase"] == "evaluate" and record["round"] >= 1 and record["metrics"].get("psnr") is not None:
            values.setdefault(record["site"], {})[record["round"]] = record["metrics"]["psnr"]
    return values


def best_within(values: dict[int, float], cap: int) -> int:
    """The round <= ``cap`` with the best value (the earliest one on a tie)."""
    rounds = [r for r in sorted(values) if r <= cap]
    if not rounds:
        raise ConfigError(f"no validated round at or before round {cap}")
    return max(rounds, key=lambda r: (values[r], -r))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="one acceleration's folder of a bench.quality --out (e.g. OUT/R4)")
    parser.add_argument("--arms", nargs="+", default=["local-layers", "fedavg"], help="federated arms' run keys")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, model_args = MODELS[MULTI_SEED_MODEL]
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sorted((args.root / "sites").glob("*.toml")))}
    for datasets in data.values():
        learn_subjects(datasets.values())
    for arm in args.arms:
        own: dict[str, list[list[float]]] = {n: [] for n in data}
        capped: dict[str, list[list[float]]] = {n: [] for n in data}
        subjects: dict[str, list[str]] = {}
        for seed in args.seeds:
            local = args.root / "runs" / f"{model}-local-s{seed}"
            values = site_psnr(local)
            cap = max(site_psnr(args.root / "runs" / f"{model}-{arm}-s{seed}")[GLOBAL_SITE])
            for name, datasets in data.items():
                chosen = []
                for limit in (max(values[GLOBAL_SITE]), cap):
                    rnd = best_within(values[name], limit)
                    state = torch.load(local / "checkpoints" / f"round-{rnd:04d}.pt", weights_only=True)["state_dict"]
                    mine = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
                    scores = score_split(model_recon(load_model(model, model_args, mine)), datasets["test"])
                    chosen.append((rnd, [s.psnr for s in scores]))
                    subjects[name] = [f"{name}/{subject_of(s.volume)}" for s in scores]
                own[name].append(chosen[0][1])
                capped[name].append(chosen[1][1])
                logger.info(
                    "%s seed %d %s: local trained %d rounds, best %d (test %.2f dB); capped at %s's %d: best %d "
                    "(test %.2f dB)",
                    arm,
                    seed,
                    name,
                    max(values[GLOBAL_SITE]),
                    chosen[0][0],
                    np.mean(chosen[0][1]),
                    arm,
                    cap,
                    chosen[1][0],
                    np.mean(chosen[1][1]),
                )
        for name in data:
            diff = hierarchical_bootstrap(np.array(own[name]), np.array(capped[name]), subjects[name])
            logger.info(
                "%s %s: local (own stop) − local (capped at %s's rounds): %s dB", args.root.name, name, arm, diff
            )


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:  # a wrong folder or an unfinished run: one line, not a traceback
        raise SystemExit(f"bench.matched_budget: {exc}") from None
