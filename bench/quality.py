"""Reconstruction quality of every method side by side, per site and overall, on the held-out TEST split.

Fair by construction:

- every learned method (local-only, pooled centralized, site-balanced centralized, FedAvg, FedProx) trains
  until its *validation* PSNR has not improved for ``--patience`` rounds, up to ``--max-rounds``
  (``patience`` / ``select-metric`` of the product's run config: the run directory's ``best.json``), and is
  scored on the test split once, at its best validation round (local-only: each site's model at that
  site's own best validation round);
- centralized = one model on the pooled training slices, every slice equally likely (baseline kind
  ``centralized``); the site-balanced variant is a separate row (``centralized-balanced``);
- each method's budget is printed: rounds trained, best round, optimisation steps and data passes;
- every target comparison is a paired per-slice difference with a 95 % bootstrap CI (``common.stats``);
- personalisation: every federated run ends with each site fine-tuning the selected global model on its
  own training split (``fine-tune-steps``, validation-stopped); the sites' fine-tuned models are the
  "+ fine-tune" row. The best federated method (global or personalised) and the best global model are
  chosen on validation PSNR, never on test.

Scenarios: ``standard`` = the three product sites (``deploy/sites``); ``low-data`` adds ``site-d``
(``bench/sites``: fastMRI-style, 1.5 T, 12 coils, random mask) with few subjects per site. Every site's R
is overridden to each requested acceleration (masks stay different). The best federated global model is
also run on real MR images it never saw (``common.data.heldout``). Run::

    python -m bench.quality                 # the full comparison
    python -m bench.quality --quick         # a smoke run of the same code path (minutes)

It prints markdown tables and the status of the product's targets.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.harness import (
    LOW_DATA_SITE_NAMES,
    markdown_table,
    mean_std,
    model_recon,
    Recon,
    score_slices,
    SITE_NAMES,
    SliceScore,
    start_bench,
    Stopwatch,
    write_sites,
)
from client.site_state import FINETUNED_FILE
from common.config import ScannerConfig
from common.cs import l1_wavelet_sense
from common.data.dataset import SiteDataset
from common.data.heldout import score_heldout
from common.data.loaders import load_site, make_loader
from common.fft import center_crop
from common.models import build_model, count_parameters
from common.runconfig import RunConfig
from common.stats import PairedDifference, paired_bootstrap
from common.training import zero_filled
from server.baseline import Baseline
from server.best import best_round
from server.simulate import SimResources, simulate
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger("bench.quality")

# About equal parameter counts (116,385 vs 115,724): the "unrolled >= U-Net at equal parameters" target.
MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "U-Net": ("unet", {"chans": 16, "num_pool_layers": 2}),
    "Unrolled-DC": ("unrolled", {"num_cascades": 4, "chans": 32, "num_layers": 5}),
}
BASELINES = {"local": "local", "centralized": "centralized (pooled)", "centralized-balanced": "centralized (site-balanced)"}
STRATEGIES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam"}
FINE_TUNED = "+ fine-tune"  # suffix of a federated strategy's personalised row (each site fine-tunes it)
CS_GRID = tuple(itertools.product(("haar", "db4"), (0.003, 0.01, 0.03)))
SCENARIOS = {"standard": SITE_NAMES, "low-data": LOW_DATA_SITE_NAMES}


@dataclass
class Method:
    """One row of the tables: a reconstruction per site, and what its training cost."""

    label: str
    recon: dict[str, Recon]
    federated: bool = False
    rounds: int = 0  # rounds trained (early stop included)
    best: str = "-"  # the selected round(s)
    steps: int = 0  # optimisation steps up to the selected round, all sites together
    passes: float = 0.0  # data passes up to the selected round: steps x batch / training slices seen
    val_psnr: float = float("nan")  # global validation PSNR at the selected round (federated selection)
    model: nn.Module | None = None  # the one shared model (centralized, federated global); None: per-site models

    @property
    def personalised(self) -> bool:
        """A federated row whose sites each use their own model (fine-tuned from the global one)."""
        return self.federated and self.model is None


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
               run_dir: Path, strategy: str = "fedavg", fine_tune_steps: int = 0) -> RunConfig:
    """The one run config shared by the baselines and the federated strategies of a model.

    ``fine_tune_steps`` > 0 (federated runs): after the last round each site fine-tunes the selected
    global model on its own training split, validation-stopped (the personalised row).
    """
    return RunConfig.from_flat({
        "name": run_dir.name, "num-server-rounds": args.max_rounds, "strategy": strategy,
        "proximal-mu": args.mu if strategy == "fedprox" else 0.0, "model": model, "model-args": model_args,
        "local-steps": args.local_steps, "batch-size": args.batch, "learning-rate": args.lr, "loss": "l1",
        "min-train-nodes": len(sites), "min-evaluate-nodes": len(sites), "min-available-nodes": len(sites),
        "sites": ",".join(str(p) for p in sites), "run-dir": str(run_dir), "num-samples": 0, "seed": args.seed,
        "resume": False, "select-metric": "psnr", "patience": args.patience,
        # Federated runs: each training message also scores the model it carries (half the messages), and
        # each site keeps its Adam state across rounds (chosen on validation PSNR in a pilot: see BENCHMARKS.md).
        "evaluate-with-train": True, "client-optimizer": "keep",
        "fine-tune-steps": fine_tune_steps,
        "fine-tune-eval-every": args.fine_tune_eval_every, "fine-tune-patience": args.fine_tune_patience,
    })


def _load(model: str, model_args: dict[str, int], state: dict[str, torch.Tensor]) -> nn.Module:
    net = build_model(model, **model_args)
    net.load_state_dict(state)
    return net


def _state(store: RunDir, rnd: int) -> dict[str, torch.Tensor]:
    return store.load_checkpoint(rnd)["state_dict"]


def _trained(store: RunDir) -> tuple[int, dict[int, dict[str, float]], dict[tuple[int, str], float]]:
    """(rounds trained, steps per round and trainer, validation PSNR per (round, site)) from metrics.jsonl.

    Trainers are the sites (local-only, federated) or, for centralized runs, the one ``__global__`` model.
    """
    records = store.read_metrics(dedupe=True)
    steps: dict[int, dict[str, float]] = {}
    val: dict[tuple[int, str], float] = {}
    for r in records:
        if r["phase"] == "train" and "steps" in r["metrics"]:
            steps.setdefault(r["round"], {})[r["site"]] = r["metrics"]["steps"]
        if r["phase"] == "evaluate" and r["metrics"].get("psnr") is not None:
            val[(r["round"], r["site"])] = r["metrics"]["psnr"]
    for by_site in steps.values():
        if len(by_site) > 1:  # site records present: the __global__ one holds only their mean
            by_site.pop(GLOBAL_SITE, None)
    return max(steps, default=0), steps, val


def learned_methods(args: argparse.Namespace, label: str, sites: Sequence[Path], train_slices: dict[str, int],
                    out: Path, clock: Stopwatch, stage: str) -> list[Method]:
    """Train every learned row of one model to its best validation round (early stopping)."""
    model, model_args = MODELS[label]
    names = list(train_slices)
    total_slices = sum(train_slices.values())
    methods = []
    for kind, row in BASELINES.items():
        run = run_config(args, model, model_args, sites, out / f"{model}-{kind}")
        with clock.stage(f"{stage} {label} {kind}"):
            store = Baseline(kind, run).execute()  # type: ignore[arg-type]
        rounds, steps, val = _trained(store)
        if kind == "local":
            # Each site's own model at that site's best validation round: what a site alone would deploy.
            chosen = {n: best_round({r: v for (r, s), v in val.items() if s == n and r >= 1}, "psnr") for n in names}
            recon = {}
            for n, rnd in chosen.items():
                state = {k.split("/", 1)[1]: v for k, v in _state(store, rnd).items() if k.startswith(f"{n}/")}
                recon[n] = model_recon(_load(model, model_args, state))
            used = sum(steps[r][n] for n, rnd in chosen.items() for r in range(1, rnd + 1))
            best = ", ".join(f"{n} {rnd}" for n, rnd in chosen.items())
            val_psnr = float("nan")
        else:
            selected = store.best()
            assert selected is not None, f"{store.path}: no best.json"
            shared = model_recon(_load(model, model_args, _state(store, selected["round"])))
            recon = {n: shared for n in names}
            used = sum(sum(steps[r].values()) for r in range(1, selected["round"] + 1))
            best, val_psnr = str(selected["round"]), selected["value"]
        methods.append(Method(f"{label} {row}", recon, rounds=rounds, best=best, steps=int(used),
                              passes=used * args.batch / total_slices, val_psnr=val_psnr))
    for strategy in args.strategies:
        row = STRATEGIES[strategy]
        run = run_config(args, model, model_args, sites, out / f"{model}-{strategy}", strategy, args.fine_tune_steps)
        with clock.stage(f"{stage} {label} {row} (Flower simulation)"):
            store = simulate_sites(run, args.client_cpus)
        rounds, steps, _ = _trained(store)
        selected = store.best()
        assert selected is not None, f"{store.path}: no best.json"
        net = _load(model, model_args, _state(store, selected["round"]))
        shared = model_recon(net)
        used = sum(sum(steps[r].values()) for r in range(1, selected["round"] + 1))
        methods.append(Method(f"{label} {row}", {n: shared for n in names}, federated=True, rounds=rounds,
                              best=str(selected["round"]), steps=int(used), passes=used * args.batch / total_slices,
                              val_psnr=selected["value"], model=net))
        if args.fine_tune_steps:
            methods.append(_fine_tuned(f"{label} {row} {FINE_TUNED}", store, model, model_args, names,
                                       selected["round"], used, args.batch / total_slices))
    return methods


def simulate_sites(run: RunConfig, client_cpus: int) -> RunDir:
    """The Flower simulation, each site pinned to ``client_cpus`` cores and as many torch threads."""
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(client_cpus)  # inherited by the Ray workers that run the sites
    try:
        return simulate(run, timeout=3600, report=logger.info, resources=SimResources(client_cpus=client_cpus))
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


def _fine_tuned(label: str, store: RunDir, model: str, model_args: dict[str, int], names: Sequence[str],
                selected: int, used: int, passes_per_step: float) -> Method:
    """The personalised row of a federated run: each site's fine-tuned model, read from its site-local file.

    Selected like everything else on validation: each site kept its best fine-tuning step, and the row's
    validation PSNR is the run's aggregated ``finetune`` record (weighted as the global evaluation).
    """
    records = [r for r in store.read_metrics(dedupe=True) if r["phase"] == "finetune"]
    by_site = {r["site"]: r["metrics"] for r in records}
    missing = [n for n in [*names, GLOBAL_SITE] if n not in by_site]
    assert not missing, f"{store.path}: no finetune record for {missing}"
    recon = {}
    for n in names:
        saved = torch.load(store.path / "site-state" / n / FINETUNED_FILE, map_location="cpu", weights_only=True)
        recon[n] = model_recon(_load(model, model_args, saved["state_dict"]))
    tuned = sum(int(by_site[n]["best-step"]) for n in names)
    best = f"{selected}, then steps " + ", ".join(f"{n} {int(by_site[n]['best-step'])}" for n in names)
    return Method(label, recon, federated=True, rounds=int(records[0]["round"]), best=best, steps=int(used + tuned),
                  passes=(used + tuned) * passes_per_step, val_psnr=float(by_site[GLOBAL_SITE]["psnr"]))


def _cell(scores: Sequence[SliceScore], metric: str) -> str:
    digits = {"psnr": 2, "ssim": 3, "nmse": 4}[metric]
    return mean_std([getattr(s, metric) for s in scores], digits)


def _psnr(scores: Sequence[SliceScore]) -> np.ndarray:
    return np.array([s.psnr for s in scores])


def _verdict(diff: PairedDifference, threshold: float, need_ci_above_zero: bool) -> str:
    """Target status of a paired difference: its mean against ``threshold``, optionally its CI against 0."""
    if diff.mean < threshold:
        return f"missed by {threshold - diff.mean:.2f} dB"
    if need_ci_above_zero and diff.low <= 0:
        return "missed (CI includes 0)"
    return "met"


def report(r: float, names: Sequence[str], methods: list[Method], results: dict[str, dict[str, list[SliceScore]]],
           heldout: dict[str, tuple[float, float, PairedDifference]]) -> list[tuple]:
    """Print the tables of one acceleration; returns its target rows."""
    print(f"\n### R = {r:g}: all sites pooled (test split, mean ± std over slices)\n")
    rows = []
    for m in methods:
        pooled = [s for n in names for s in results[m.label][n]]
        rows.append((m.label, m.rounds or "-", m.best, f"{m.steps:,}" if m.steps else "-",
                     f"{m.passes:.1f}" if m.steps else "-", len(pooled),
                     _cell(pooled, "psnr"), _cell(pooled, "ssim"), _cell(pooled, "nmse")))
    print(markdown_table(("method", "rounds trained", "best val. round", "steps to best", "data passes to best",
                          "slices", "PSNR (dB)", "SSIM", "NMSE"), rows))

    print(f"\n### R = {r:g}: per site (test split, mean ± std over slices)\n")
    headers = ["method"] + [f"{n} {m}" for n in names for m in ("PSNR", "SSIM", "NMSE")]
    print(markdown_table(headers, ([m.label] + [_cell(results[m.label][n], k) for n in names
                                               for k in ("psnr", "ssim", "nmse")] for m in methods)))

    targets = []
    for model in MODELS:
        fed = [m for m in methods if m.federated and m.label.startswith(f"{model} ")]
        if not fed:
            continue
        # The best federated method (global or personalised) and the best global model are chosen on
        # validation, never on test.
        best = max(fed, key=lambda m: m.val_psnr)
        best_global = max((m for m in fed if not m.personalised), key=lambda m: m.val_psnr)
        local = results[f"{model} {BASELINES['local']}"]
        for n in names:
            d = paired_bootstrap(_psnr(results[best.label][n]), _psnr(local[n]))
            targets.append((f"R={r:g}", f"{best.label} − {model} local at {n}", "≥ +1.00 dB, CI > 0", str(d),
                            _verdict(d, 1.0, True)))
        central = results[f"{model} {BASELINES['centralized']}"]
        d = paired_bootstrap(np.concatenate([_psnr(results[best_global.label][n]) for n in names]),
                             np.concatenate([_psnr(central[n]) for n in names]))
        targets.append((f"R={r:g}", f"{best_global.label} − {model} centralized (pooled), all sites", "≥ −0.30 dB", str(d),
                        _verdict(d, -0.3, False)))
        for n in names:
            d = paired_bootstrap(_psnr(results[best.label][n]), _psnr(results["CS L1-wavelet"][n]))
            targets.append((f"R={r:g}", f"{best.label} − CS L1-wavelet at {n}", "> 0 dB, CI > 0", str(d),
                            _verdict(d, 0.0, True)))
        if best_global.label in heldout:
            zf_mean, model_mean, d = heldout[best_global.label]
            targets.append((f"R={r:g}", f"{best_global.label} − zero-filled on held-out real MR "
                            f"({d.n} images: {zf_mean:.2f} → {model_mean:.2f} dB)",
                            "≥ +3.00 dB", str(d), _verdict(d, 3.0, False)))
    return targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything to a smoke run of the same code path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"), help="sites, data and run dirs")
    parser.add_argument("--scenario", choices=list(SCENARIOS), default="low-data")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=["fedavg", "fedprox"],
                        help="federated strategies (each also gives a fine-tuned row); fedadam: a server optimiser")
    parser.add_argument("--size", type=int, default=64, help="image matrix (pixels per side)")
    parser.add_argument("--center-fraction", type=float, default=None,
                        help="fully sampled centre of every site's mask (calibration lines = fraction x size); "
                             "default 0.64 / R: fastMRI's pairs (R 4: 0.08, R 8: 0.04) doubled for 64², i.e. "
                             "10 calibration lines at R 4 and 5 at R 8 (an R 8 mask of 64 columns has 8 in all)")
    # 8 subjects of 4 slices, not 4 of 8: one subject is one contrast at the fastMRI-style sites, so a
    # 1-subject validation split would select models on a contrast the test split does not have.
    parser.add_argument("--subjects", type=int, default=8, help="demo subjects per site (split 50/25/25)")
    parser.add_argument("--slices", type=int, default=4, help="slices per volume")
    parser.add_argument("--max-rounds", type=int, default=20, help="budget: rounds at most")
    parser.add_argument("--patience", type=int, default=4, help="stop after this many rounds without a better val PSNR")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    parser.add_argument("--fine-tune-steps", type=int, default=60,
                        help="after each federated run every site fine-tunes its selected model (0: no personalised rows)")
    parser.add_argument("--fine-tune-eval-every", type=int, default=10, help="fine-tuning: validate every N steps")
    parser.add_argument("--fine-tune-patience", type=int, default=3, help="fine-tuning: stop after N validations without gain")
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per simulated site (1: two sites at once on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cs-iterations", type=int, default=60)
    parser.add_argument("--cs-tune-slices", type=int, default=6, help="validation slices per site for CS tuning")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads of the in-process baselines (each simulated site: --client-cpus)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 slices per volume, 1 acceleration, U-Net, FedAvg, 2 rounds (numbers meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        args.accelerations, args.models, args.strategies = args.accelerations[:1], ["U-Net"], ["fedavg"]
        args.size, args.subjects, args.slices = 64, 4, 2
        args.max_rounds, args.patience, args.local_steps = 2, 1, 2
        args.cs_iterations, args.cs_tune_slices = 5, 2
        args.fine_tune_steps, args.fine_tune_eval_every = 2, 1
    return args


def center_fraction(args: argparse.Namespace, r: float) -> float:
    """The fully sampled centre at acceleration ``r``: ``--center-fraction``, else 0.64 / R (see its help)."""
    return args.center_fraction if args.center_fraction is not None else 0.64 / r


def heldout_scanner(size: int, r: float, center_fraction: float) -> ScannerConfig:
    """How the held-out images are acquired: 8 coils, 1.5 T noise level, random mask (site-b's scanner)."""
    return ScannerConfig(field_strength_t=1.5, coils=8, matrix=(size, size), noise_std=0.02, mask="random",
                         acceleration=r, center_fraction=center_fraction)


def run_acceleration(args: argparse.Namespace, r: float, params: dict[str, int], clock: Stopwatch) -> list[tuple]:
    """Every method at one acceleration: train, score the test split, print the tables; returns target rows."""
    out = args.out / f"R{r:g}"
    shutil.rmtree(out, ignore_errors=True)
    with clock.stage(f"R={r:g} demo data"):
        sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices, acceleration=r,
                            names=SCENARIOS[args.scenario], center_fraction=center_fraction(args, r))
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sites)}
    names = list(data)
    print(f"\nR = {r:g}: train/val/test slices per site: "
          + ", ".join(f"{n} {len(d['train'])}/{len(d['val'])}/{len(d['test'])}" for n, d in data.items()))
    with clock.stage(f"R={r:g} CS tuning"):
        cs_choice = {n: tune_cs(data[n]["val"], args.cs_iterations, args.batch, args.cs_tune_slices) for n in names}
    print(f"CS (L1-wavelet SENSE, FISTA, {args.cs_iterations} iterations) tuned on validation slices: "
          + ", ".join(f"{n} {w} lam={lam:g} (val {v:.2f} dB)" for n, (w, lam, v) in cs_choice.items()))
    methods = [Method("zero-filled", {n: zero_filled for n in names}),
               Method("CS L1-wavelet", {n: cs_recon(w, lam, args.cs_iterations) for n, (w, lam, _) in cs_choice.items()})]
    train_slices = {n: len(d["train"]) for n, d in data.items()}
    for label in params:
        methods += learned_methods(args, label, sites, train_slices, out / "runs", clock, f"R={r:g}")

    def test(recon: Recon, site: str) -> list[SliceScore]:
        return score_slices(recon, make_loader(data[site]["test"], 4, shuffle=False, seed=0))

    with clock.stage(f"R={r:g} test scoring (incl. CS)"):
        results = {m.label: {n: test(m.recon[n], n) for n in names} for m in methods}
    heldout = {}
    with clock.stage(f"R={r:g} held-out real MR"):
        scanner = heldout_scanner(args.size, r, center_fraction(args, r))
        for m in methods:
            if m.federated and m.model is not None:
                scores = score_heldout(m.model, scanner, seed=args.seed)
                zf, rec = np.array([s.zero_filled_psnr for s in scores]), np.array([s.model_psnr for s in scores])
                heldout[m.label] = (float(zf.mean()), float(rec.mean()), paired_bootstrap(rec, zf))
    return report(r, names, methods, results, heldout)


def main(argv: list[str] | None = None) -> list[tuple]:
    """Run every method at every acceleration; print the tables and the targets' status (also returned)."""
    args = parse_args(argv)
    started = start_bench("quality", args.threads)
    clock = Stopwatch()
    params = {label: count_parameters(build_model(m, **kw)) for label, (m, kw) in MODELS.items() if label in args.models}
    calibration = ", ".join(f"R {r:g}: centre fraction {center_fraction(args, r):g} "
                            f"({round(center_fraction(args, r) * args.size)} calibration lines)" for r in args.accelerations)
    print(f"scenario {args.scenario} ({', '.join(SCENARIOS[args.scenario])}), {args.size}² images, {calibration}; "
          f"{args.subjects} subjects/site ({args.slices} slices per volume); up to {args.max_rounds} rounds x "
          f"{args.local_steps} local steps x batch {args.batch}, early stop after {args.patience} rounds without a "
          f"better validation PSNR; Adam lr {args.lr}, L1 loss, FedProx mu {args.mu}, seed {args.seed}; federated: "
          f"{', '.join(STRATEGIES[k] for k in args.strategies)}, sites keep their Adam state, then each fine-tunes up to "
          f"{args.fine_tune_steps} steps (validated every {args.fine_tune_eval_every}, patience "
          f"{args.fine_tune_patience}); parameters: {', '.join(f'{k} {v:,}' for k, v in params.items())}")
    targets = [row for r in args.accelerations for row in run_acceleration(args, r, params, clock)]
    print("\n### Targets (paired per-slice PSNR differences, mean [95 % bootstrap CI])\n")
    print(markdown_table(("R", "comparison", "target", "measured (dB)", "status"), targets))
    print("\n### Wall time per stage\n")
    print(markdown_table(("stage", "seconds"), ((k, f"{v:.0f}") for k, v in clock.seconds.items())))
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")
    return targets


if __name__ == "__main__":
    main()
