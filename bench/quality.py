"""Reconstruction quality of every method side by side, per site and overall, on the held-out TEST split.

Rows: zero-filled, classical CS (L1-wavelet SENSE, ``common.cs``), and for each learned model (U-Net,
unrolled-DC at about equal parameter counts) the local-only and centralized baselines
(``server.baseline``) and FedAvg / FedProx run as real Flower simulations (``server.simulate``), all with
the same optimisation budget: every site takes ``rounds x local-steps`` steps (local-only: on its own
model; federated: on the global one), the centralized model takes ``sites x rounds x local-steps``.
Sites are the three ``deploy/sites`` configs (16/8/4 coils, 3 T/1.5 T, different contrasts, equispaced /
random / Poisson masks) with every site's R overridden to each requested acceleration. Run::

    python -m bench.quality

It prints markdown tables (mean ± std over test slices) and the status of the product's targets.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.harness import (
    Recon,
    SliceScore,
    Stopwatch,
    machine_line,
    markdown_table,
    mean_std,
    model_recon,
    score_slices,
    set_threads,
    write_sites,
)
from common.cs import l1_wavelet_sense
from common.data.dataset import SiteDataset
from common.data.loaders import load_site, make_loader
from common.fft import center_crop
from common.models import build_model, count_parameters
from common.runconfig import RunConfig
from common.training import zero_filled
from server.baseline import Baseline
from server.simulate import simulate
from server.store import RunDir

logger = logging.getLogger("bench.quality")

# About equal parameter counts (116,385 vs 115,724): the "unrolled >= U-Net at equal parameters" target.
MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "U-Net": ("unet", {"chans": 16, "num_pool_layers": 2}),
    "Unrolled-DC": ("unrolled", {"num_cascades": 4, "chans": 32, "num_layers": 5}),
}
LEARNED = ("local", "centralized", "FedAvg", "FedProx")
CS_GRID = tuple(itertools.product(("haar", "db4"), (0.003, 0.01, 0.03)))


@dataclass
class Method:
    """One row of the tables: a reconstruction per site (learned methods may differ per site)."""

    label: str
    recon: dict[str, Recon]


def cs_recon(wavelet: str, lam: float, iterations: int) -> Recon:
    """Magnitude of the L1-wavelet SENSE reconstruction, cropped to the target."""

    def run(batch: dict[str, object]) -> torch.Tensor:
        image = l1_wavelet_sense(batch["masked_kspace"], batch["mask"], batch["sens_maps"],  # type: ignore[arg-type]
                                 lam=lam, iterations=iterations, wavelet=wavelet)
        target = batch["target"]
        assert isinstance(target, torch.Tensor)
        return center_crop(image.abs(), tuple(target.shape[-2:]))

    return run


def tune_cs(dataset: SiteDataset, iterations: int, batch_size: int, max_slices: int) -> tuple[str, float, float]:
    """(wavelet, lam, val PSNR) with the best mean validation PSNR: what a site would do with no training."""
    subset = torch.utils.data.Subset(dataset, range(min(max_slices, len(dataset))))
    best: tuple[str, float, float] | None = None
    for wavelet, lam in CS_GRID:
        loader = make_loader(subset, batch_size, shuffle=False, seed=0)
        value = float(np.mean([s.psnr for s in score_slices(cs_recon(wavelet, lam, iterations), loader)]))
        if best is None or value > best[2]:
            best = (wavelet, lam, value)
    assert best is not None
    return best


def run_config(args: argparse.Namespace, model: str, model_args: dict[str, int], sites: Sequence[Path],
               run_dir: Path, strategy: str = "fedavg") -> RunConfig:
    """The one run config shared by the baselines and both federated strategies of a model."""
    return RunConfig.from_flat({
        "name": run_dir.name, "num-server-rounds": args.rounds, "strategy": strategy,
        "proximal-mu": args.mu if strategy == "fedprox" else 0.0, "model": model, "model-args": model_args,
        "local-steps": args.local_steps, "batch-size": args.batch, "learning-rate": args.lr, "loss": "l1",
        "min-train-nodes": len(sites), "min-evaluate-nodes": len(sites), "min-available-nodes": len(sites),
        "sites": ",".join(str(p) for p in sites), "run-dir": str(run_dir), "num-samples": 0, "seed": args.seed,
        "resume": False,
    })


def _checkpoint(store: RunDir, rounds: int) -> dict[str, torch.Tensor]:
    latest = store.latest_checkpoint()
    if latest is None or latest[0] != rounds:
        raise RuntimeError(f"{store.path}: expected a checkpoint of round {rounds}, found {latest and latest[0]}")
    return latest[1]["state_dict"]


def _load(model: str, model_args: dict[str, int], state: dict[str, torch.Tensor]) -> nn.Module:
    net = build_model(model, **model_args)
    net.load_state_dict(state)
    return net


def learned_methods(args: argparse.Namespace, label: str, sites: Sequence[Path], names: Sequence[str],
                    out: Path, clock: Stopwatch, stage: str) -> list[Method]:
    """Train the four learned rows of one model; each returns its final-round weights."""
    model, model_args = MODELS[label]
    methods = []
    for kind in ("local", "centralized"):
        run = run_config(args, model, model_args, sites, out / f"{model}-{kind}")
        with clock.stage(f"{stage} {label} {kind}"):
            store = Baseline(kind, run).execute()  # type: ignore[arg-type]
        state = _checkpoint(store, args.rounds)
        if kind == "local":
            recon = {n: model_recon(_load(model, model_args, {k.split("/", 1)[1]: v for k, v in state.items()
                                                              if k.startswith(f"{n}/")})) for n in names}
        else:
            shared = model_recon(_load(model, model_args, state))
            recon = {n: shared for n in names}
        methods.append(Method(f"{label} {kind}", recon))
    for strategy, row in (("fedavg", "FedAvg"), ("fedprox", "FedProx")):
        run = run_config(args, model, model_args, sites, out / f"{model}-{strategy}", strategy)
        with clock.stage(f"{stage} {label} {row} (Flower simulation)"):
            store = simulate(run, timeout=1800, report=logger.info)
        shared = model_recon(_load(model, model_args, _checkpoint(store, args.rounds)))
        methods.append(Method(f"{label} {row}", {n: shared for n in names}))
    return methods


def _cell(scores: Sequence[SliceScore], metric: str) -> str:
    digits = {"psnr": 2, "ssim": 3, "nmse": 4}[metric]
    return mean_std([getattr(s, metric) for s in scores], digits)


def _mean(scores: Sequence[SliceScore], metric: str = "psnr") -> float:
    return float(np.mean([getattr(s, metric) for s in scores]))


def report(r: float, names: Sequence[str], results: dict[str, dict[str, list[SliceScore]]],
           params: dict[str, int], smallest: str, cross: dict[str, dict[str, dict[str, list[SliceScore]]]]) -> list[tuple]:
    """Print the tables of one acceleration; returns its target rows."""
    print(f"\n### R = {r:g}: all sites pooled (test split, mean ± std over slices)\n")
    rows = []
    for label, by_site in results.items():
        pooled = [s for n in names for s in by_site[n]]
        model = label.split(" ")[0]
        rows.append((label, f"{params[model]:,}" if model in params else "-", len(pooled),
                     _cell(pooled, "psnr"), _cell(pooled, "ssim"), _cell(pooled, "nmse")))
    print(markdown_table(("method", "params", "slices", "PSNR (dB)", "SSIM", "NMSE"), rows))

    print(f"\n### R = {r:g}: per site (test split, mean ± std over slices)\n")
    headers = ["method"] + [f"{n} {m}" for n in names for m in ("PSNR", "SSIM", "NMSE")]
    print(markdown_table(headers, ([label] + [_cell(by_site[n], m) for n in names for m in ("psnr", "ssim", "nmse")]
                                   for label, by_site in results.items())))

    for label, table in cross.items():
        print(f"\n### R = {r:g}: {label} trained at one site, tested at each (test PSNR dB, mean ± std)\n")
        print(markdown_table(["trained at \\ tested at"] + list(names),
                             ([row] + [_cell(table[row][n], "psnr") for n in names] for row in table)))

    targets = []
    for model in params:
        central = _mean([s for n in names for s in results[f"{model} centralized"][n]])
        for fed in ("FedAvg", "FedProx"):
            gap = _mean([s for n in names for s in results[f"{model} {fed}"][n]]) - central
            targets.append((f"R={r:g}", model, f"{fed} − centralized, all sites", "≥ −0.30 dB", f"{gap:+.2f} dB",
                            "met" if gap >= -0.3 else f"missed by {-0.3 - gap:.2f} dB"))
        local = _mean(results[f"{model} local"][smallest])
        for fed in ("FedAvg", "FedProx"):
            gain = _mean(results[f"{model} {fed}"][smallest]) - local
            targets.append((f"R={r:g}", model, f"{fed} − local at {smallest} (smallest)", "≥ +1.00 dB",
                            f"{gain:+.2f} dB", "met" if gain >= 1.0 else f"missed by {1.0 - gain:.2f} dB"))
    if len(params) != 2:
        return targets
    unet, unrolled = params
    for kind in LEARNED:
        gap = (_mean([s for n in names for s in results[f"{unrolled} {kind}"][n]])
               - _mean([s for n in names for s in results[f"{unet} {kind}"][n]]))
        targets.append((f"R={r:g}", f"{unrolled} vs {unet}", f"{kind}: unrolled − U-Net, all sites", "≥ 0 dB",
                        f"{gap:+.2f} dB", "met" if gap >= 0 else f"missed by {-gap:.2f} dB"))
    return targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in about 15 minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"), help="sites, data and run dirs")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--size", type=int, default=64, help="image matrix (pixels per side)")
    parser.add_argument("--subjects", type=int, default=4, help="demo subjects per site (split 50/25/25)")
    parser.add_argument("--slices", type=int, default=6, help="slices per volume")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cs-iterations", type=int, default=60)
    parser.add_argument("--cs-tune-slices", type=int, default=6, help="validation slices per site for CS tuning")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (here and in Flower)")
    return parser.parse_args(argv)


def run_acceleration(args: argparse.Namespace, r: float, params: dict[str, int], clock: Stopwatch) -> list[tuple]:
    """Every method at one acceleration: train, score the test split, print the tables; returns target rows."""
    out = args.out / f"R{r:g}"
    shutil.rmtree(out, ignore_errors=True)
    with clock.stage(f"R={r:g} demo data"):
        sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices, acceleration=r)
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sites)}
    names = list(data)
    print(f"\nR = {r:g}: train/val/test slices per site: "
          + ", ".join(f"{n} {len(d['train'])}/{len(d['val'])}/{len(d['test'])}" for n, d in data.items()))
    smallest = min(names, key=lambda n: len(data[n]["train"]))
    with clock.stage(f"R={r:g} CS tuning"):
        cs_choice = {n: tune_cs(data[n]["val"], args.cs_iterations, args.batch, args.cs_tune_slices) for n in names}
    print(f"CS (L1-wavelet SENSE, FISTA, {args.cs_iterations} iterations) tuned on validation slices: "
          + ", ".join(f"{n} {w} lam={lam:g} (val {v:.2f} dB)" for n, (w, lam, v) in cs_choice.items()))
    methods = [Method("zero-filled", {n: zero_filled for n in names}),
               Method("CS L1-wavelet", {n: cs_recon(w, lam, args.cs_iterations) for n, (w, lam, _) in cs_choice.items()})]
    for label in params:
        methods += learned_methods(args, label, sites, names, out / "runs", clock, f"R={r:g}")

    def test(recon: Recon, site: str) -> list[SliceScore]:
        return score_slices(recon, make_loader(data[site]["test"], 4, shuffle=False, seed=0))

    with clock.stage(f"R={r:g} test scoring (incl. CS and cross-site)"):
        results = {m.label: {n: test(m.recon[n], n) for n in names} for m in methods}
        cross = {}
        for label in params:
            local = next(m for m in methods if m.label == f"{label} local")
            table = {f"{label} local @ {a}": {b: test(local.recon[a], b) for b in names} for a in names}
            table[f"{label} FedAvg (global)"] = results[f"{label} FedAvg"]
            cross[label] = table
    return report(r, names, results, params, smallest, cross)


def main(argv: list[str] | None = None) -> None:
    """Run every method at every acceleration and print the tables and the targets' status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    clock = Stopwatch()
    params = {label: count_parameters(build_model(m, **kw)) for label, (m, kw) in MODELS.items() if label in args.models}
    print(f"# bench.quality — {machine_line(args.threads)}")
    print(f"{args.size}² images, {args.subjects} subjects/site ({args.slices} slices per volume), {args.rounds} rounds "
          f"x {args.local_steps} local steps x batch {args.batch}, Adam lr {args.lr}, L1 loss, FedProx mu {args.mu}, "
          f"seed {args.seed}; parameters: {', '.join(f'{k} {v:,}' for k, v in params.items())}")
    targets = [row for r in args.accelerations for row in run_acceleration(args, r, params, clock)]
    print("\n### Targets\n")
    print(markdown_table(("R", "model", "comparison", "target", "measured", "status"), targets))
    print("\n### Wall time per stage\n")
    print(markdown_table(("stage", "seconds"), ((k, f"{v:.0f}") for k, v in clock.seconds.items())))
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
