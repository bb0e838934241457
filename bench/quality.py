"""Reconstruction quality of every method side by side, per site and overall, on the held-out TEST split:
does joining the federation pay off, site by site, on evidence a referee accepts?

Fair by construction:

- every learned arm (local-only, pooled centralized, FedAvg, FedProx, each federated strategy's
  personalised "+ fine-tune" row) trains until its *validation* PSNR has not improved for ``--patience``
  rounds, up to ``--max-rounds``, and is scored on the test split once, at its best validation round
  (local-only: each site's model at its own best round, training until every site has run out of its own
  patience; personalised: each site's best fine-tuning step). An arm whose best round is its last (it
  stopped while still improving) is flagged "not converged" and every target it takes part in counts as
  missed;
- one optimiser semantics for every arm: each model keeps its Adam state across rounds
  (``client-optimizer = keep``, which :mod:`server.baseline` follows too);
- the unrolled-DC model is trained with ``--seeds`` (>= 3) seeds per arm, the U-Net with the first seed;
  every paired difference is reported with a hierarchical bootstrap 95 % CI (``common.stats``: seeds, then
  test subjects, then slices within a subject);
- CS (L1-wavelet SENSE, FISTA) is tuned per site and R on validation over lambda on a log grid 1e-4 … 1e-1
  (7 values) x iterations {50, 100, 200}; the table says where CS stays below zero-filled on validation;
- the best federated method (global or personalised) and the best global model are chosen on validation
  PSNR (mean over seeds), never on test;
- two kinds of data no arm ever trained on are reported apart: *unseen acquisition* (``bench/sites/site-x``:
  field strength, coil count, noise and mask family of no training site, new subjects) and *unseen anatomy*
  (real MR images re-acquired with a training site's simulator: ``common.data.heldout``);
- learning curves (validation PSNR against optimisation steps and wall time, every arm) go to a PNG, with
  the wall time each federation needs to come within 0.3 dB of pooled centralized;
- a per-site verdict: best personalised federated − local, its CI, and join / no benefit / harmful;
- levers against site heterogeneity (``--strategies``: FedProx with each ``--mu``, SCAFFOLD drift correction,
  FedPer/FedBN-like ``local-layers`` kept per site, each also fine-tuned): per site, the lever with the best
  *validation* PSNR at that site is selected and its test gain over local (and over FedAvg) reported.

Scenarios: ``standard`` = the three product sites (``deploy/sites``); ``low-data`` adds ``site-d``
(``bench/sites``). Every site's R is overridden to each requested acceleration (masks stay different).
``--train-subjects N`` keeps every site's validation and test subjects and trains on N subjects per site (the
scarce-data scenario; ``--section scarce`` writes it to its own docs section).
Run::

    python -m bench.quality            # the full comparison; rewrites the quality section of docs/BENCHMARKS.md
    python -m bench.quality --quick    # a smoke run of the same code path (minutes; writes no docs)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.harness import (
    LOW_DATA_SITE_NAMES,
    ROOT,
    SITE_NAMES,
    Recon,
    SliceScore,
    Stopwatch,
    check_output,
    fresh_output,
    markdown_table,
    mean_std,
    model_recon,
    score_slices,
    start_bench,
    write_sites,
)
from common.coils import sense_adjoint
from common.config import ScannerConfig
from common.cs import l1_wavelet_sense, l1_wavelet_sense_iterates
from common.data.dataset import SiteDataset
from common.data.heldout import score_heldout
from common.data.loaders import load_site, make_loader
from common.fft import center_crop
from common.models import build_model, count_parameters
from common.personalise import FINETUNED_FILE, personal_layers, stopped_by_patience
from common.runconfig import RunConfig
from common.stats import PairedDifference, hierarchical_bootstrap, join_verdict
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
MULTI_SEED_MODEL = "Unrolled-DC"  # carries the multi-seed targets; the U-Net runs the first seed only
BASELINES = {
    "local": "local",
    "centralized": "centralized (pooled)",
    "centralized-balanced": "centralized (site-balanced)",
}
# local-layers: FedAvg of the shared part while each site keeps common.personalise.personal_layers (FedPer/FedBN).
STRATEGIES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "scaffold": "SCAFFOLD",
    "local-layers": "FedAvg + local layers",
}
FINE_TUNED = "+ fine-tune"  # suffix of a federated strategy's personalised row (each site fine-tunes it)
CS_LAMBDAS = tuple(float(v) for v in np.logspace(-4, -1, 7))  # 1e-4, 3.2e-4, ..., 1e-1
CS_ITERATIONS = (50, 100, 200)
CS_WAVELET = "db4"
SCENARIOS = {"standard": SITE_NAMES, "low-data": LOW_DATA_SITE_NAMES}
UNSEEN_SITE = "site-x"  # bench/sites/site-x.toml: the unseen-acquisition site, never trained on
OPTIMISER_SEMANTICS = (
    "every arm keeps its Adam state across rounds (client-optimizer = keep: federated sites, "
    "local and centralized models alike)"
)


def doc_markers(section: str, tool: str = "bench.quality") -> tuple[str, str]:
    """The begin/end markers of a docs section: the main one, or ``--section NAME``'s (of ``tool``)."""
    if not section:
        return f"<!-- {tool}: begin -->", f"<!-- {tool}: end -->"
    return f"<!-- {tool} {section}: begin -->", f"<!-- {tool} {section}: end -->"


DOC_BEGIN, DOC_END = doc_markers("")


class Output:
    """Everything the benchmark prints, kept so the docs section can be regenerated from it verbatim."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text)
        self.lines.append(text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Method:
    """One arm at one seed: a reconstruction per site, what its training cost, and its validation curve."""

    label: str
    recon: dict[str, Recon]
    seed: int = 0
    federated: bool = False
    personalised: bool = False  # each site uses its own model (fine-tuned from the global one)
    rounds: int = 0  # rounds trained (early stop included)
    best: str = "-"  # the selected round(s)
    steps: int = 0  # optimisation steps up to the selected round, all sites together
    passes: float = 0.0  # epochs to the selected round: steps x batch / training slices
    val_psnr: float = float("nan")  # validation PSNR at the selected round (selection among arms)
    converged: bool = True  # False: the best validation round (or fine-tuning step) was the last one
    model: nn.Module | None = None  # the one shared model (centralized, federated global); None: per-site models
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (cumulative steps, seconds, val PSNR)
    learned: bool = True
    val_site: dict[str, float] = field(default_factory=dict)  # validation PSNR per site at the selected round(s)


@dataclass(frozen=True)
class FederatedArm:
    """One federated arm of ``--strategies``: its row label, its run directory's name part, its run config."""

    key: str  # run directory part, e.g. "fedprox-mu0.01"
    row: str  # table label after the model, e.g. "FedProx mu=0.01"
    strategy: str  # the run config's strategy
    mu: float = 0.0  # FedProx's proximal weight
    local_layers: bool = False  # each site keeps the model's personal_layers


def federated_arms(strategies: Sequence[str], mus: Sequence[float]) -> list[FederatedArm]:
    """The federated arms: one per strategy, FedProx once per ``mus`` value (a swept lever)."""
    arms = []
    for key in strategies:
        if key == "fedprox":
            arms += [FederatedArm(f"fedprox-mu{mu:g}", f"{STRATEGIES[key]} mu={mu:g}", key, mu) for mu in mus]
        elif key == "local-layers":
            arms.append(FederatedArm(key, STRATEGIES[key], "fedavg", local_layers=True))
        else:
            arms.append(FederatedArm(key, STRATEGIES[key], key))
    return arms


SUBJECTS: dict[str, str] = {}  # volume file name -> subject id, filled from the readers (see learn_subjects)


def learn_subjects(datasets: Iterable[SiteDataset]) -> None:
    """Record which subject each volume belongs to (a BraTS / IXI subject has one volume per contrast)."""
    for dataset in datasets:
        SUBJECTS.update({ex.path.name: ex.subject for ex in dataset.reader.examples})


def subject_of(volume: str) -> str:
    """The subject a test volume belongs to, as its site's reader knows it."""
    return SUBJECTS[volume]


def cs_recon(lam: float, iterations: int) -> Recon:
    """Magnitude of the L1-wavelet SENSE reconstruction, cropped to the target."""

    def run(batch: dict[str, object]) -> torch.Tensor:
        image = l1_wavelet_sense(
            batch["masked_kspace"],
            batch["mask"],
            batch["sens_maps"],  # type: ignore[arg-type]
            lam=lam,
            iterations=iterations,
            wavelet=CS_WAVELET,
        )
        target = batch["target"]
        assert isinstance(target, torch.Tensor)
        return center_crop(image.abs(), tuple(target.shape[-2:]))

    return run


@dataclass(frozen=True)
class CSChoice:
    """CS tuned on one site's validation slices, and zero-filled on the same slices."""

    lam: float
    iterations: int
    val_psnr: float
    zero_filled_psnr: float
    start_psnr: float  # FISTA's starting image A^H y: the SENSE-combined zero-filled image

    @property
    def note(self) -> str:
        """Where CS stays below zero-filled on validation, the measured reason (none needed otherwise)."""
        if self.val_psnr >= self.zero_filled_psnr:
            return "≥ zero-filled"
        gap = f"below zero-filled by {self.zero_filled_psnr - self.val_psnr:.2f} dB at its best grid point"
        if self.start_psnr < self.zero_filled_psnr:
            return (
                f"{gap}; its start, the SENSE-combined zero-filled image, is already "
                f"{self.zero_filled_psnr - self.start_psnr:.2f} dB below the RSS zero-filled one: the coil-map "
                "combination loses, not lambda or the iterations"
            )
        return f"{gap}, although its start is not: no grid point of lambda x iterations recovers it"


def tune_cs(dataset: SiteDataset, iterations: Sequence[int], batch_size: int, max_slices: int) -> CSChoice:
    """(lambda, iterations) with the best mean validation PSNR over the grid: what a site would do untrained."""
    subset = torch.utils.data.Subset(dataset, range(min(max_slices, len(dataset))))
    loader = list(make_loader(subset, batch_size, shuffle=False, seed=0))
    zf = float(np.mean([s.psnr for s in score_slices(zero_filled, loader)]))
    start = float(np.mean([s.psnr for s in score_slices(_sense_start, loader)]))
    scores: dict[tuple[float, int], list[float]] = defaultdict(list)
    for lam in CS_LAMBDAS:
        for batch in loader:
            kept = l1_wavelet_sense_iterates(
                batch["masked_kspace"],
                batch["mask"],
                batch["sens_maps"],
                lam=lam,
                iterations=tuple(iterations),
                wavelet=CS_WAVELET,
            )
            target = batch["target"]
            for count, image in kept.items():
                cropped = center_crop(image.abs(), tuple(target.shape[-2:]))
                scores[(lam, count)] += [s.psnr for s in score_slices(lambda _b, c=cropped: c, [batch])]
    (lam, count), values = max(scores.items(), key=lambda item: float(np.mean(item[1])))
    return CSChoice(lam, count, float(np.mean(values)), zf, start)


def _sense_start(batch: dict[str, object]) -> torch.Tensor:
    """A^H y, cropped: the SENSE-combined zero-filled image every FISTA run starts from."""
    image = sense_adjoint(batch["masked_kspace"] * batch["mask"], batch["sens_maps"])  # type: ignore[operator]
    target = batch["target"]
    assert isinstance(target, torch.Tensor)
    return center_crop(image.abs(), tuple(target.shape[-2:]))


def run_config(
    args: argparse.Namespace,
    model: str,
    model_args: dict[str, int],
    sites: Sequence[Path],
    run_dir: Path,
    seed: int,
    arm: FederatedArm | None = None,
    fine_tune_steps: int = 0,
) -> RunConfig:
    """The one run config shared by the baselines and the federated arms of a model and seed.

    ``fine_tune_steps`` > 0 (federated runs): after the last round each site fine-tunes the selected
    global model on its own training split, validation-stopped (the personalised row).
    """
    arm = arm or FederatedArm("fedavg", STRATEGIES["fedavg"], "fedavg")
    local = personal_layers(build_model(model, **model_args)) if arm.local_layers else ()
    return RunConfig.from_flat(
        {
            "name": run_dir.name,
            "num-server-rounds": args.max_rounds,
            "strategy": arm.strategy,
            "proximal-mu": arm.mu,
            "local-layers": ",".join(local),
            "model": model,
            "model-args": model_args,
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
            "seed": seed,
            "resume": False,
            "select-metric": "psnr",
            "patience": args.patience,
            "stop-rule": args.stop_rule,
            # Federated runs: each training message also scores the model it carries (half the messages).
            # Every arm keeps its Adam state across rounds (OPTIMISER_SEMANTICS).
            "evaluate-with-train": True,
            "client-optimizer": "keep",
            "fine-tune-steps": fine_tune_steps,
            "fine-tune-eval-every": args.fine_tune_eval_every,
            "fine-tune-patience": args.fine_tune_patience,
            "fine-tune-warmup": args.fine_tune_warmup,
            # --tracking-uri: every arm and seed is an MLflow run of its own, named after its run directory.
            **({"tracking": "mlflow", "tracking-uri": args.tracking_uri} if args.tracking_uri else {}),
        }
    )


def load_model(model: str, model_args: dict[str, int], state: dict[str, torch.Tensor]) -> nn.Module:
    """A benchmark model (``MODELS``' name and arguments) holding ``state``."""
    net = build_model(model, **model_args)
    net.load_state_dict(state)
    return net


def _state(store: RunDir, rnd: int) -> dict[str, torch.Tensor]:
    return store.load_checkpoint(rnd)["state_dict"]


@dataclass
class Trained:
    """What a run directory's metrics say about its training."""

    rounds: int
    steps: dict[int, dict[str, float]]  # round -> trainer -> steps
    val: dict[tuple[int, str], float]  # (round, site) -> validation PSNR
    curve: list[tuple[int, float, float]]  # (cumulative steps, seconds since the run's first record, global val PSNR)


def _trained(store: RunDir) -> Trained:
    """Rounds trained, steps per round and trainer, validation PSNR per (round, site) and the learning curve.

    Trainers are the sites (local-only, federated) or, for centralized runs, the one ``__global__`` model.
    """
    records = store.read_metrics(dedupe=True)
    start = min((r["time"] for r in records), default=0.0)
    steps: dict[int, dict[str, float]] = {}
    val: dict[tuple[int, str], float] = {}
    when: dict[int, float] = {}
    for r in records:
        if r["phase"] == "train" and "steps" in r["metrics"]:
            steps.setdefault(r["round"], {})[r["site"]] = r["metrics"]["steps"]
        if r["phase"] == "evaluate" and r["metrics"].get("psnr") is not None:
            val[(r["round"], r["site"])] = r["metrics"]["psnr"]
            if r["site"] == GLOBAL_SITE:
                when[r["round"]] = r["time"] - start
    for by_site in steps.values():
        if len(by_site) > 1:  # site records present: the __global__ one holds only their mean
            by_site.pop(GLOBAL_SITE, None)
    curve, done = [], 0.0
    for rnd in sorted(when):
        done += sum(steps.get(rnd, {}).values())
        curve.append((int(done), when[rnd], val[(rnd, GLOBAL_SITE)]))
    return Trained(max(steps, default=0), steps, val, curve)


def learned_methods(
    args: argparse.Namespace,
    label: str,
    sites: Sequence[Path],
    train_slices: dict[str, int],
    out: Path,
    clock: Stopwatch,
    stage: str,
    seed: int,
) -> list[Method]:
    """Train every learned arm of one model at one seed to its best validation round (early stopping)."""
    model, model_args = MODELS[label]
    names = list(train_slices)
    total_slices = sum(train_slices.values())
    methods = []
    for kind in args.baselines:
        row = BASELINES[kind]
        run = run_config(args, model, model_args, sites, out / f"{model}-{kind}-s{seed}", seed)
        with clock.stage(f"{stage} {label} {kind} seed {seed}"):
            store = Baseline(kind, run).execute()  # type: ignore[arg-type]
        t = _trained(store)
        if kind == "local":
            # Each site's own model at that site's best validation round: what a site alone would deploy.
            chosen = {n: best_round({r: v for (r, s), v in t.val.items() if s == n and r >= 1}, "psnr") for n in names}
            recon = {}
            for n, rnd in chosen.items():
                state = {k.split("/", 1)[1]: v for k, v in _state(store, rnd).items() if k.startswith(f"{n}/")}
                recon[n] = model_recon(load_model(model, model_args, state))
            used = sum(t.steps[r][n] for n, rnd in chosen.items() for r in range(1, rnd + 1))
            best = ", ".join(f"{n} {rnd}" for n, rnd in chosen.items())
            converged = all(rnd < t.rounds for rnd in chosen.values())  # every site trains every round
            val_site = {n: t.val[(rnd, n)] for n, rnd in chosen.items()}
            val_psnr = float(np.mean(list(val_site.values())))
            net = None
        else:
            selected = store.best()
            assert selected is not None, f"{store.path}: no best.json"
            net = load_model(model, model_args, _state(store, selected["round"]))
            recon = {n: model_recon(net) for n in names}
            used = sum(sum(t.steps[r].values()) for r in range(1, selected["round"] + 1))
            best, val_psnr = str(selected["round"]), selected["value"]
            converged = selected["round"] < t.rounds
            val_site = {n: t.val[(selected["round"], n)] for n in names if (selected["round"], n) in t.val}
        methods.append(
            Method(
                f"{label} {row}",
                recon,
                seed,
                rounds=t.rounds,
                best=best,
                steps=int(used),
                passes=used * args.batch / total_slices,
                val_psnr=val_psnr,
                converged=converged,
                model=net,
                curve=t.curve,
                val_site=val_site,
            )
        )
    for arm in federated_arms(args.strategies, args.mu):
        run = run_config(
            args, model, model_args, sites, out / f"{model}-{arm.key}-s{seed}", seed, arm, args.fine_tune_steps
        )
        with clock.stage(f"{stage} {label} {arm.row} seed {seed} (Flower simulation)"):
            store = simulate_sites(run, args.client_cpus)
        t = _trained(store)
        selected = store.best()
        assert selected is not None, f"{store.path}: no best.json"
        rnd = selected["round"]
        shared = _state(store, rnd)
        if arm.local_layers:
            # No one global model: each site's is the shared part plus its own local layers of the best round.
            net = None
            recon = {
                n: model_recon(load_model(model, model_args, {**shared, **_site_local(store, n, rnd)})) for n in names
            }
        else:
            net = load_model(model, model_args, shared)
            recon = {n: model_recon(net) for n in names}
        used = sum(sum(t.steps[r].values()) for r in range(1, rnd + 1))
        glob = Method(
            f"{label} {arm.row}",
            recon,
            seed,
            federated=True,
            personalised=arm.local_layers,
            rounds=t.rounds,
            best=str(rnd),
            steps=int(used),
            passes=used * args.batch / total_slices,
            val_psnr=selected["value"],
            converged=rnd < t.rounds,
            model=net,
            curve=t.curve,
            val_site={n: t.val[(rnd, n)] for n in names if (rnd, n) in t.val},
        )
        methods.append(glob)
        if args.fine_tune_steps:
            methods.append(
                _fine_tuned(
                    f"{label} {arm.row} {FINE_TUNED}",
                    store,
                    glob,
                    model,
                    model_args,
                    names,
                    args.batch / total_slices,
                    args,
                )
            )
    return methods


def _site_local(store: RunDir, site: str, rnd: int) -> dict[str, torch.Tensor]:
    """Site ``site``'s local layers of round ``rnd``, from its site-state file (kept patience + 2 rounds)."""
    path = store.path / "site-state" / site / f"round-{rnd:04d}.pt"
    return dict(torch.load(path, map_location="cpu", weights_only=True)["local"])


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


def _fine_tuned(
    label: str,
    store: RunDir,
    glob: Method,
    model: str,
    model_args: dict[str, int],
    names: Sequence[str],
    passes_per_step: float,
    args: argparse.Namespace,
) -> Method:
    """The personalised row of a federated run: each site's fine-tuned model, read from its site-local file.

    Selected like everything else on validation: each site kept its best fine-tuning step, and the row's
    validation PSNR is the run's aggregated ``finetune`` record. It has converged when the global model it
    started from did and every site's fine-tuning was stopped by its patience, not by the step budget.
    """
    records = [r for r in store.read_metrics(dedupe=True) if r["phase"] == "finetune"]
    by_site = {r["site"]: r["metrics"] for r in records}
    missing = [n for n in [*names, GLOBAL_SITE] if n not in by_site]
    assert not missing, f"{store.path}: no finetune record for {missing}"
    recon = {}
    for n in names:
        saved = torch.load(store.path / "site-state" / n / FINETUNED_FILE, map_location="cpu", weights_only=True)
        recon[n] = model_recon(load_model(model, model_args, saved["state_dict"]))
    tuned = sum(int(by_site[n]["best-step"]) for n in names)
    sites_converged = all(
        stopped_by_patience(
            int(by_site[n]["steps"]), int(by_site[n]["best-step"]), args.fine_tune_patience, args.fine_tune_eval_every
        )
        for n in names
    )
    best = f"{glob.best}, then steps " + ", ".join(f"{n} {int(by_site[n]['best-step'])}" for n in names)
    start = min(r["time"] for r in store.read_metrics(dedupe=True))
    end = max(r["time"] for r in records) - start
    curve = [
        *glob.curve,
        (glob.curve[-1][0] + tuned if glob.curve else tuned, end, float(by_site[GLOBAL_SITE]["psnr"])),
    ]
    return Method(
        label,
        recon,
        glob.seed,
        federated=True,
        personalised=True,
        rounds=glob.rounds,
        best=best,
        steps=glob.steps + tuned,
        passes=(glob.steps + tuned) * passes_per_step,
        val_psnr=float(by_site[GLOBAL_SITE]["psnr"]),
        converged=glob.converged and sites_converged,
        curve=curve,
        val_site={n: float(by_site[n]["psnr"]) for n in names},
    )


# ----------------------------------------------------------------------------- scores and comparisons

Scores = dict[str, dict[int, dict[str, list[SliceScore]]]]  # label -> seed -> site -> per-slice scores


def _matrix(scores: Scores, label: str, sites: Sequence[str]) -> tuple[np.ndarray, list[str], list[tuple]]:
    """(seeds, slices) PSNR of one arm over ``sites``, each slice's subject, and the slices' identities."""
    rows, subjects, keys = [], [], []
    for i, seed in enumerate(sorted(scores[label])):
        flat = [s for n in sites for s in scores[label][seed][n]]
        rows.append([s.psnr for s in flat])
        if i == 0:
            subjects = [f"{s.site}/{subject_of(s.volume)}" for s in flat]
            keys = [(s.site, s.volume, s.slice_idx) for s in flat]
    return np.array(rows), subjects, keys


def compare(scores: Scores, a: str, b: str, sites: Sequence[str], seed: int = 0) -> PairedDifference:
    """Paired PSNR difference ``a − b`` on ``sites``' test slices, hierarchical bootstrap CI."""
    left, subjects, keys = _matrix(scores, a, sites)
    right, _, other = _matrix(scores, b, sites)
    assert keys == other, f"{a} and {b} were scored on different slices"
    return hierarchical_bootstrap(left, right, subjects, seed=seed)


def _arms(methods: Iterable[Method]) -> dict[str, list[Method]]:
    grouped: dict[str, list[Method]] = defaultdict(list)
    for m in methods:
        grouped[m.label].append(m)
    return grouped


def _val(arm: list[Method]) -> float:
    return float(np.mean([m.val_psnr for m in arm]))


def _converged(arm: list[Method]) -> bool:
    return all(m.converged for m in arm)


def _cell(values: Sequence[float], digits: int) -> str:
    return mean_std(values, digits)


def _target(diff: PairedDifference, threshold: float, need_ci_above_zero: bool, unconverged: Sequence[str]) -> str:
    """Target status of a paired difference; an unconverged arm makes it a miss whatever the numbers."""
    if unconverged:
        return "missed (not converged: " + ", ".join(unconverged) + ")"
    if diff.mean < threshold:
        return f"missed by {threshold - diff.mean:.2f} dB"
    if need_ci_above_zero and diff.low <= 0:
        return "missed (CI includes 0)"
    return "met"


def _site_val(arm: list[Method], site: str) -> float:
    """Mean over seeds of the arm's validation PSNR at ``site`` (-inf when it has none: never selected)."""
    values = [m.val_site[site] for m in arm if site in m.val_site]
    return float(np.mean(values)) if len(values) == len(arm) else -math.inf


def levers(r: float, arms: dict[str, list[Method]], scores: Scores, names: Sequence[str], model: str) -> list[tuple]:
    """Per site, the federated arm (lever) with the best validation PSNR at that site, and its test result.

    Selection uses validation only; the test differences (− local, − FedAvg) carry the same hierarchical
    bootstrap CIs as every other comparison. An unconverged lever or baseline is named in the last column.
    """
    fed = {k: v for k, v in arms.items() if v[0].federated and k.startswith(f"{model} ")}
    local, fedavg = f"{model} {BASELINES['local']}", f"{model} {STRATEGIES['fedavg']}"
    rows = []
    for n in names:
        ranked = sorted(fed, key=lambda k: _site_val(fed[k], n), reverse=True)
        if not ranked or _site_val(fed[ranked[0]], n) == -math.inf:
            continue
        chosen = ranked[0]
        test = [float(np.mean([s.psnr for s in scores[chosen][m.seed][n]])) for m in fed[chosen]]
        gain = {
            ref: str(compare(scores, chosen, ref, [n])) if ref in arms and ref != chosen else "-"
            for ref in (local, fedavg)
        }
        bad = _not_converged(arms, chosen, local, fedavg)
        rows.append(
            (
                f"R={r:g}",
                model,
                n,
                chosen,
                f"{_site_val(fed[chosen], n):.2f}",
                f"{ranked[1]} ({_site_val(fed[ranked[1]], n):.2f})" if len(ranked) > 1 else "-",
                _cell(test, 2),
                gain[local],
                gain[fedavg],
                len(fed[chosen]),
                "yes" if not bad else "no: " + ", ".join(bad),
            )
        )
    return rows


def _not_converged(arms: dict[str, list[Method]], *labels: str) -> list[str]:
    return [label for label in labels if label in arms and not _converged(arms[label])]


def _first_time(curve: Sequence[tuple[int, float, float]], level: float) -> float:
    return next((seconds for _, seconds, value in curve if value >= level), math.nan)


def time_to_quality(arms: dict[str, list[Method]], model: str) -> list[tuple]:
    """Per federated global arm: wall time to within 0.3 dB of pooled centralized's best validation PSNR.

    Per seed, the level is that seed's centralized best minus 0.3 dB; centralized's own time to that level
    is the reference (target: federation ≤ 1.5x it). Seconds count from each run's first metrics record.
    """
    central = arms.get(f"{model} {BASELINES['centralized']}")
    if not central:
        return []
    rows = []
    for label, arm in arms.items():
        if not label.startswith(f"{model} ") or not arm[0].federated or arm[0].personalised:
            continue
        fed_t, cen_t = [], []
        for m in arm:
            ref = next(c for c in central if c.seed == m.seed)
            level = max(v for _, _, v in ref.curve) - 0.3
            fed_t.append(_first_time(m.curve, level))
            cen_t.append(_first_time(ref.curve, level))
        ratios = [f / c for f, c in zip(fed_t, cen_t)]
        ratio = float(np.mean(ratios))
        status = (
            "missed (never within 0.3 dB)"
            if math.isnan(ratio)
            else ("met" if ratio <= 1.5 else f"missed ({ratio:.2f}x)")
        )
        rows.append(
            (
                label,
                len(arm),
                ", ".join("never" if math.isnan(f) else f"{f:.0f}" for f in fed_t),
                ", ".join(f"{c:.0f}" for c in cen_t),
                "-" if math.isnan(ratio) else f"{ratio:.2f}x",
                "≤ 1.5x",
                status,
            )
        )
    return rows


def plot_curves(curves: dict[str, dict[str, list[Method]]], path: Path) -> None:
    """Validation PSNR against optimisation steps and against wall time, every arm (seed 0), per R x model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(curves)
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for label, arm in curves[panel].items():
            m = min(arm, key=lambda x: x.seed)
            if not m.curve:
                continue
            steps, seconds, values = zip(*m.curve)
            tuned = m.label.endswith(FINE_TUNED)  # one point: the fine-tuned models' validation
            style = dict(marker="o" if tuned else ".", linestyle="" if tuned else "-")
            axes[row, 0].plot(steps, values, label=label, **style)  # type: ignore[arg-type]
            axes[row, 1].plot(seconds, values, label=label, **style)  # type: ignore[arg-type]
        axes[row, 0].set_title(f"{panel}: validation PSNR vs optimisation steps (all sites)")
        axes[row, 1].set_title(f"{panel}: validation PSNR vs wall time")
        axes[row, 0].set_xlabel("cumulative optimisation steps")
        axes[row, 1].set_xlabel("seconds since the run's first record")
        for ax in axes[row]:
            ax.set_ylabel("val. PSNR (dB)")
            ax.grid(alpha=0.3)
        axes[row, 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _stop_rule_note(rule: str) -> str:
    """How the header states ``--stop-rule``."""
    if rule == "every-site":
        return "of the mean or of any site's own (every arm; local: each site's own model)"
    return "of the mean over sites (local: of each site's own model)"


def report(
    out: Output, r: float, names: Sequence[str], methods: list[Method], scores: Scores, unseen: dict[str, object]
) -> list[tuple]:
    """Print the tables of one acceleration; returns its target rows."""
    arms = _arms(methods)
    out(f"\n### R = {r:g}: every arm, all sites pooled (test split; mean ± std over seeds of the per-seed mean)\n")
    out(
        f"Optimiser: {OPTIMISER_SEMANTICS}. Converged: the best validation round is not the last one trained "
        "(local: at every site, each with its own patience).\n"
    )
    rows = []
    for label, arm in arms.items():
        per_seed = {
            k: [float(np.mean([getattr(s, k) for n in names for s in scores[label][m.seed][n]])) for m in arm]
            for k in ("psnr", "ssim", "nmse")
        }
        learned = arm[0].learned
        rows.append(
            (
                label,
                len(arm) if learned else "-",
                ", ".join(str(m.rounds) for m in arm) if learned else "-",
                "; ".join(m.best for m in arm) if learned else "-",
                ("yes" if _converged(arm) else "**no**") if learned else "-",
                ", ".join(f"{m.steps:,}" for m in arm) if learned else "-",
                ", ".join(f"{m.passes:.1f}" for m in arm) if learned else "-",
                _cell(per_seed["psnr"], 2),
                _cell(per_seed["ssim"], 3),
                _cell(per_seed["nmse"], 4),
            )
        )
    out(
        markdown_table(
            (
                "method",
                "seeds",
                "rounds trained",
                "best val. round",
                "converged",
                "steps to best",
                "epochs to best",
                "PSNR (dB)",
                "SSIM",
                "NMSE",
            ),
            rows,
        )
    )

    out(f"\n### R = {r:g}: per site (test PSNR in dB, mean ± std over seeds)\n")
    out(
        markdown_table(
            ["method", *names],
            (
                [label]
                + [_cell([float(np.mean([s.psnr for s in scores[label][m.seed][n]])) for m in arm], 2) for n in names]
                for label, arm in arms.items()
            ),
        )
    )

    targets: list[tuple] = []
    verdicts: list[tuple] = []
    lever_rows: list[tuple] = []
    for model in MODELS:
        fed = {k: v for k, v in arms.items() if v[0].federated and k.startswith(f"{model} ")}
        if not fed:
            continue
        personal = {k: v for k, v in fed.items() if v[0].personalised} or fed
        best = max(personal, key=lambda k: _val(personal[k]))
        lever_rows += levers(r, arms, scores, names, model)
        # None when every federated arm is per-site (local-layers alone): no one global model to compare.
        best_global = max(
            (k for k, v in fed.items() if not v[0].personalised), key=lambda k: _val(fed[k]), default=None
        )
        local, central = f"{model} {BASELINES['local']}", f"{model} {BASELINES['centralized']}"
        if local in arms:
            for n in names:
                d = compare(scores, best, local, [n])
                bad = _not_converged(arms, best, local)
                targets.append(
                    (
                        f"R={r:g}",
                        f"{best} − {local} at {n}",
                        "≥ +1.00 dB, CI > 0",
                        str(d),
                        d.seeds,
                        d.subjects,
                        _target(d, 1.0, True, bad),
                    )
                )
                verdicts.append(
                    (
                        f"R={r:g}",
                        model,
                        n,
                        best,
                        str(d),
                        d.seeds,
                        d.subjects,
                        "yes" if not bad else "no: " + ", ".join(bad),
                        join_verdict(d),
                    )
                )
        if central in arms and best_global is not None:
            d = compare(scores, best_global, central, names)
            targets.append(
                (
                    f"R={r:g}",
                    f"{best_global} − {central}, all sites",
                    "≥ −0.30 dB",
                    str(d),
                    d.seeds,
                    d.subjects,
                    _target(d, -0.3, False, _not_converged(arms, best_global, central)),
                )
            )
        for n in names:
            d = compare(scores, best, "CS L1-wavelet (tuned)", [n])
            targets.append(
                (
                    f"R={r:g}",
                    f"{best} − CS L1-wavelet (tuned) at {n}",
                    "> 0 dB, CI > 0",
                    str(d),
                    d.seeds,
                    d.subjects,
                    _target(d, 0.0, True, _not_converged(arms, best)),
                )
            )
        for row in time_to_quality(arms, model):
            targets.append(
                (
                    f"R={r:g}",
                    f"wall time of {row[0]} to within 0.3 dB of {central} (s per seed: {row[2]} vs {row[3]})",
                    row[5],
                    row[4],
                    row[1],
                    "-",
                    row[6],
                )
            )
        heldout = unseen.get("anatomy", {}).get(best_global)  # type: ignore[union-attr]
        if heldout is not None:
            zf_mean, model_mean, d = heldout
            targets.append(
                (
                    f"R={r:g}",
                    f"unseen anatomy: {best_global} − zero-filled on real MR "
                    f"({d.n} images: {zf_mean:.2f} → {model_mean:.2f} dB)",
                    "≥ +3.00 dB",
                    str(d),
                    d.seeds,
                    "-",
                    _target(d, 3.0, False, _not_converged(arms, best_global)),
                )
            )

    if verdicts:
        out(
            f"\n### R = {r:g}: should this site join? (best personalised federated − local, test PSNR, "
            "hierarchical bootstrap 95 % CI over seeds, subjects, slices)\n"
        )
        out(
            markdown_table(
                (
                    "R",
                    "model",
                    "site",
                    "best personalised (on validation)",
                    "gain (dB)",
                    "seeds",
                    "test subjects",
                    "both converged",
                    "verdict",
                ),
                verdicts,
            )
        )
    if lever_rows:
        out(
            f"\n### R = {r:g}: levers (per site, the federated arm with the best validation PSNR at that site; "
            "its test PSNR and paired differences, hierarchical bootstrap 95 % CI over seeds, subjects, slices)\n"
        )
        out(
            markdown_table(
                (
                    "R",
                    "model",
                    "site",
                    "lever (best on validation)",
                    "val. PSNR (dB)",
                    "runner-up on validation (val. PSNR)",
                    "test PSNR (dB)",
                    "− local (dB)",
                    "− FedAvg (dB)",
                    "seeds",
                    "converged",
                ),
                lever_rows,
            )
        )
    acquisition = unseen.get("acquisition")
    if acquisition:
        out(
            f"\n### R = {r:g}: unseen acquisition ({UNSEEN_SITE}: {unseen['scanner']}; new subjects; "
            "never trained on)\n"
        )
        out(markdown_table(("method", "seeds", "test PSNR (dB)", "− zero-filled (dB)", "− tuned CS (dB)"), acquisition))  # type: ignore[arg-type]
    return targets


# ----------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything to a smoke run of the same code path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"), help="sites, data and run dirs")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing, non-empty <out>/R<acceleration> folder"
    )
    parser.add_argument("--scenario", choices=list(SCENARIOS), default="low-data")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=["local", "centralized"])
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=list(STRATEGIES),
        default=["fedavg", "local-layers"],
        help="federated strategies (each also gives a fine-tuned row); fedadam: a server optimiser; "
        "scaffold: drift correction; local-layers: FedAvg with each site keeping its own "
        "personal layers (common.personalise.personal_layers)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help=f"training seeds per arm of {MULTI_SEED_MODEL}; the U-Net runs the first one",
    )
    parser.add_argument("--size", type=int, default=64, help="image matrix (pixels per side)")
    parser.add_argument(
        "--center-fraction",
        type=float,
        default=None,
        help="fully sampled centre of every site's mask (calibration lines = fraction x size); "
        "default 0.64 / R: fastMRI's pairs (R 4: 0.08, R 8: 0.04) doubled for 64², i.e. "
        "10 calibration lines at R 4 and 5 at R 8 (an R 8 mask of 64 columns has 8 in all)",
    )
    parser.add_argument(
        "--subjects",
        type=int,
        default=20,
        help="demo subjects per site, split train/val/test by --val-fraction / --test-fraction",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.4,
        help="0.4 of 20 subjects: 8 test subjects per site, 4 for validation, 8 for training",
    )
    parser.add_argument(
        "--train-subjects",
        type=int,
        default=None,
        help="the scarce-data scenario: this many training subjects per site, the validation and test subjects "
        "kept as --subjects and the fractions give them (default: the rest of --subjects)",
    )
    parser.add_argument("--slices", type=int, default=2, help="slices per volume")
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=300,
        help="budget: rounds at most (large enough that patience, not the budget, stops every arm: at 150 "
        "the local arm's best round was its last in one seed at R = 4 and past 200 in one at R = 8)",
    )
    parser.add_argument("--patience", type=int, default=6, help="stop after this many rounds without a better val PSNR")
    parser.add_argument(
        "--stop-rule",
        choices=("every-site", "global"),
        default="every-site",
        help="every-site: pooled and federated arms stop as the local arm does, once neither the mean nor any "
        "site's own val PSNR has improved for --patience rounds; global: on the mean alone (the rule of the runs "
        "recorded before 2026-12-07's evening, which stopped pooled models on a dip of the mean)",
    )
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--mu", type=float, nargs="+", default=[0.01], help="FedProx proximal weight(s): one FedProx arm per value"
    )
    parser.add_argument(
        "--fine-tune-steps",
        type=int,
        default=3000,
        help="after each federated run every site fine-tunes its selected model (0: no personalised rows)",
    )
    parser.add_argument("--fine-tune-eval-every", type=int, default=10, help="fine-tuning: validate every N steps")
    parser.add_argument(
        "--fine-tune-patience", type=int, default=15, help="fine-tuning: stop after N validations without gain"
    )
    parser.add_argument(
        "--fine-tune-warmup",
        type=int,
        default=50,
        help="fine-tuning: linear learning-rate warm-up in steps (without it a patience of 4 stopped on the dip "
        "a fresh Adam causes; bench.fine_tune_convergence)",
    )
    parser.add_argument(
        "--client-cpus", type=int, default=1, help="CPUs per simulated site (1: two sites at once on 2 cores)"
    )
    parser.add_argument("--cs-iterations", type=int, nargs="+", default=list(CS_ITERATIONS))
    parser.add_argument("--cs-tune-slices", type=int, default=8, help="validation slices per site for CS tuning")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch intra-op threads of the in-process baselines (each simulated site: --client-cpus)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "BENCHMARKS.md",
        help="markdown file whose bench.quality section is replaced by this run's output "
        "(between the markers); --quick writes none unless given explicitly",
    )
    parser.add_argument(
        "--section",
        default="",
        help="name of the docs section to replace (markers '<!-- bench.quality NAME: begin -->' ... end); "
        "default: the main quality section",
    )
    parser.add_argument(
        "--curves",
        type=Path,
        default=ROOT / "docs" / "quality-curves.png",
        help="learning-curve PNG (--quick: <out>/quality-curves.png unless given)",
    )
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="also log every learned arm to this MLflow tracking server or store (experiment "
        "$MLFLOW_EXPERIMENT_NAME, default fedsense-bench-quality; with a sqlite: store MLflow "
        "puts a new experiment's artifacts in ./mlruns); default: no tracking",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: R 4, U-Net, FedAvg, 1 seed, 2-3 rounds, few subjects (numbers meaningless)",
    )
    argv = list(argv) if argv is not None else None
    args = parser.parse_args(argv)
    given = set(argv or [])
    if args.quick:
        args.accelerations, args.models, args.strategies = args.accelerations[:1], ["U-Net"], ["fedavg"]
        args.seeds = args.seeds[:1]
        args.size, args.subjects, args.slices, args.test_fraction = 64, 6, 1, 0.34
        args.max_rounds, args.patience, args.local_steps = 3, 1, 2
        args.cs_iterations, args.cs_tune_slices = [2, 4], 2
        args.fine_tune_steps, args.fine_tune_eval_every, args.fine_tune_patience, args.fine_tune_warmup = 4, 2, 1, 2
        if "--docs" not in given:
            args.docs = None
        if "--curves" not in given:
            args.curves = args.out / "quality-curves.png"
    if args.train_subjects is not None:
        _scarce(parser, args)
    return args


def _scarce(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Keep the validation and test subjects ``--subjects`` gives and train on ``--train-subjects`` per site.

    The split stays a fraction in the site TOML (``common.data.splits``); counts / total round back to the counts.
    """
    if args.train_subjects < 1:
        parser.error(f"--train-subjects must be >= 1, got {args.train_subjects}")
    n_val, n_test = round(args.subjects * args.val_fraction), round(args.subjects * args.test_fraction)
    total = args.train_subjects + n_val + n_test
    args.subjects, args.val_fraction, args.test_fraction = total, n_val / total, n_test / total


def center_fraction(args: argparse.Namespace, r: float) -> float:
    """The fully sampled centre at acceleration ``r``: ``--center-fraction``, else 0.64 / R (see its help)."""
    return args.center_fraction if args.center_fraction is not None else 0.64 / r


def heldout_scanner(size: int, r: float, center_fraction: float) -> ScannerConfig:
    """How the held-out images are acquired: 8 coils, 1.5 T noise level, random mask (site-b's scanner)."""
    return ScannerConfig(
        field_strength_t=1.5,
        coils=8,
        matrix=(size, size),
        noise_std=0.02,
        mask="random",
        acceleration=r,
        center_fraction=center_fraction,
    )


def _split_fractions(paths: Sequence[Path], val: float, test: float) -> None:
    """Set every written site's subject split (the templates' 0.2 / 0.2 gives too few test subjects)."""
    for path in paths:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^val_fraction = .*$", f"val_fraction = {val!r}", text, count=1)
        text = re.sub(r"(?m)^test_fraction = .*$", f"test_fraction = {test!r}", text, count=1)
        path.write_text(text, encoding="utf-8")


def score_split(recon: Recon, dataset: SiteDataset) -> list[SliceScore]:
    """Every slice of ``dataset`` scored, in a fixed order (paired differences line slices up by it)."""
    return score_slices(recon, make_loader(dataset, 4, shuffle=False, seed=0))


def run_acceleration(
    args: argparse.Namespace, out: Output, r: float, clock: Stopwatch, curves: dict[str, dict[str, list[Method]]]
) -> list[tuple]:
    """Every method at one acceleration: train, score the test split, print the tables; returns target rows."""
    root = args.out / f"R{r:g}"
    fresh_output(root, args.overwrite)
    with clock.stage(f"R={r:g} demo data"):
        common = dict(
            size=args.size,
            subjects=args.subjects,
            slices=args.slices,
            acceleration=r,
            center_fraction=center_fraction(args, r),
        )
        sites = write_sites(root / "sites", names=SCENARIOS[args.scenario], **common)  # type: ignore[arg-type]
        unseen_sites = write_sites(root / "unseen", names=(UNSEEN_SITE,), **common)  # type: ignore[arg-type]
        _split_fractions([*sites, *unseen_sites], args.val_fraction, args.test_fraction)
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sites)}
    unseen_cfg, unseen_data = load_site(str(unseen_sites[0]))
    names = list(data)
    splits = []
    for n, d in {**data, UNSEEN_SITE: unseen_data}.items():
        learn_subjects(d.values())
        counts = [f"{len(d[s].subjects)} / {len(d[s])}" for s in ("train", "val", "test")]
        splits.append((n, *counts))
    out(f"\n### R = {r:g}: data (subjects / slices per split)\n")
    out(markdown_table(("site", "train", "val", "test"), splits))

    with clock.stage(f"R={r:g} CS tuning"):
        cs = {
            n: tune_cs(d["val"], args.cs_iterations, args.batch, args.cs_tune_slices)
            for n, d in {**data, UNSEEN_SITE: unseen_data}.items()
        }
    out(
        f"\n### R = {r:g}: CS (L1-{CS_WAVELET} SENSE, FISTA) tuned per site on validation: lambda in "
        f"{', '.join(f'{v:.2g}' for v in CS_LAMBDAS)} x iterations {args.cs_iterations}\n"
    )
    out(
        markdown_table(
            (
                "site",
                "lambda",
                "iterations",
                "val. PSNR CS (dB)",
                "val. PSNR zero-filled (dB)",
                "val. PSNR of FISTA's start A^H y (dB)",
                "CS vs zero-filled",
            ),
            (
                (
                    n,
                    f"{c.lam:.2g}",
                    c.iterations,
                    f"{c.val_psnr:.2f}",
                    f"{c.zero_filled_psnr:.2f}",
                    f"{c.start_psnr:.2f}",
                    c.note,
                )
                for n, c in cs.items()
            ),
        )
    )
    fixed = [
        Method("zero-filled", {n: zero_filled for n in names}, learned=False),
        Method("CS L1-wavelet (tuned)", {n: cs_recon(cs[n].lam, cs[n].iterations) for n in names}, learned=False),
    ]
    train_slices = {n: len(d["train"]) for n, d in data.items()}
    methods: list[Method] = []
    for label in args.models:
        seeds = args.seeds if label == MULTI_SEED_MODEL else args.seeds[:1]
        for seed in seeds:
            methods += learned_methods(args, label, sites, train_slices, root / "runs", clock, f"R={r:g}", seed)
        curves[f"R={r:g} {label}"] = {k: v for k, v in _arms(methods).items() if k.startswith(f"{label} ")}

    with clock.stage(f"R={r:g} test scoring (incl. CS)"):
        scores: Scores = defaultdict(dict)
        for m in [*fixed, *methods]:
            scores[m.label][m.seed] = {n: score_split(m.recon[n], data[n]["test"]) for n in names}

    unseen: dict[str, object] = {
        "scanner": f"{unseen_cfg.scanner.field_strength_t:g} T, {unseen_cfg.scanner.coils} coils, "
        f"noise {unseen_cfg.scanner.noise_std:g}, {unseen_cfg.scanner.mask} mask"
    }
    with clock.stage(f"R={r:g} unseen acquisition and anatomy"):
        test = unseen_data["test"]
        base = {
            "zero-filled": score_split(zero_filled, test),
            "CS L1-wavelet (tuned)": score_split(cs_recon(cs[UNSEEN_SITE].lam, cs[UNSEEN_SITE].iterations), test),
        }
        site_scores: Scores = {k: {0: {UNSEEN_SITE: v}} for k, v in base.items()}
        for m in methods:
            if m.model is not None:
                site_scores.setdefault(m.label, {})[m.seed] = {UNSEEN_SITE: score_split(model_recon(m.model), test)}
        rows = []
        for label, by_seed in site_scores.items():
            psnr = [float(np.mean([s.psnr for s in v[UNSEEN_SITE]])) for v in by_seed.values()]
            zf = str(compare(site_scores, label, "zero-filled", [UNSEEN_SITE])) if label != "zero-filled" else "-"
            cs_gap = (
                str(compare(site_scores, label, "CS L1-wavelet (tuned)", [UNSEEN_SITE])) if label not in base else "-"
            )
            rows.append((label, len(by_seed) if label not in base else "-", _cell(psnr, 2), zf, cs_gap))
        unseen["acquisition"] = rows
        scanner = heldout_scanner(args.size, r, center_fraction(args, r))
        anatomy: dict[str, tuple[float, float, PairedDifference]] = {}
        for label, arm in _arms(m for m in methods if m.federated and m.model is not None).items():
            zf_rows, rec_rows = [], []
            for m in arm:
                result = score_heldout(m.model, scanner, seed=args.seeds[0])  # type: ignore[arg-type]
                zf_rows.append([s.zero_filled_psnr for s in result])
                rec_rows.append([s.model_psnr for s in result])
            rec, zf = np.array(rec_rows), np.array(zf_rows)
            # Each image is its own "subject" here: they are real slices, most from one EPI volume.
            d = hierarchical_bootstrap(rec, zf, [f"image-{i}" for i in range(rec.shape[1])])
            anatomy[label] = (float(zf.mean()), float(rec.mean()), d)
        unseen["anatomy"] = anatomy
    return report(out, r, names, [*fixed, *methods], scores, unseen)


def write_docs(path: Path, text: str, section: str = "", tool: str = "bench.quality") -> None:
    """Replace the section between ``tool``'s markers (of ``section``) of ``path`` with ``text``."""
    begin, end = doc_markers(section, tool)
    doc = path.read_text(encoding="utf-8")
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no '{begin}' ... '{end}' markers; cannot regenerate the quality section")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> list[tuple]:
    """Run every method at every acceleration; print the tables and the targets' status (also returned)."""
    args = parse_args(argv)
    if not args.tracking_uri:
        return _main(args, argv)
    # Inherited by the simulations' processes (MLflow reads it in server.tracking.mlflow); restored afterwards so an
    # in-process caller (a test, a notebook) does not log its own later runs to the benchmark's experiment.
    before = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "fedsense-bench-quality")
    try:
        return _main(args, argv)
    finally:
        if before is None:
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = before


def _scarce_note(args: argparse.Namespace) -> str:
    """The header's mention of ``--train-subjects`` (the split fractions alone do not say it)."""
    if args.train_subjects is None:
        return ""
    return f" (scarce data: {args.train_subjects} training subject(s) per site)"


def _main(args: argparse.Namespace, argv: list[str] | None) -> list[tuple]:
    for r in args.accelerations:  # each acceleration rebuilds its folder: refuse before any work
        check_output(args.out / f"R{r:g}", args.overwrite)
    out = Output()
    started = start_bench("quality", args.threads)
    out(
        f"bench.quality: {os.uname().machine}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start; command: python -m bench.quality "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    clock = Stopwatch()
    params = {
        label: count_parameters(build_model(m, **kw)) for label, (m, kw) in MODELS.items() if label in args.models
    }
    out(
        f"\nScenario {args.scenario} ({', '.join(SCENARIOS[args.scenario])}) plus the unseen-acquisition site "
        f"{UNSEEN_SITE}; {args.size}² images; {args.subjects} subjects per site ({args.slices} slices per volume), "
        f"split val {args.val_fraction:.3g} / test {args.test_fraction:.3g}{_scarce_note(args)}; up to {args.max_rounds} rounds x "
        f"{args.local_steps} local steps x batch {args.batch}, early stop after {args.patience} rounds without a "
        f"better validation PSNR {_stop_rule_note(args.stop_rule)}; Adam lr {args.lr}, L1 loss; {OPTIMISER_SEMANTICS}; seeds {args.seeds} for "
        f"{MULTI_SEED_MODEL}, {args.seeds[:1]} for the U-Net; federated: "
        f"{', '.join(a.row for a in federated_arms(args.strategies, args.mu))}, then each site fine-tunes up to {args.fine_tune_steps} "
        f"steps (validated every {args.fine_tune_eval_every}, patience {args.fine_tune_patience}, learning rate "
        f"warmed up over {args.fine_tune_warmup} steps); parameters: "
        f"{', '.join(f'{k} {v:,}' for k, v in params.items())}; simulated sites run {args.client_cpus} CPU(s) each, "
        f"in-process baselines {args.threads} threads (wall times compare under that split)."
    )
    curves: dict[str, dict[str, list[Method]]] = {}
    targets = [row for r in args.accelerations for row in run_acceleration(args, out, r, clock, curves)]
    plot_curves(curves, args.curves)
    out(f"\nLearning curves (validation PSNR vs steps and vs wall time, every arm, first seed): `{args.curves.name}`")
    out(
        "\n### Targets (paired test-PSNR differences, mean [hierarchical bootstrap 95 % CI over seeds, "
        "subjects, slices])\n"
    )
    out(markdown_table(("R", "comparison", "target", "measured (dB)", "seeds", "test subjects", "status"), targets))
    out("\n### Wall time per stage\n")
    out(markdown_table(("stage", "seconds"), ((k, f"{v:.0f}") for k, v in clock.seconds.items())))
    out(f"\ntotal: {time.perf_counter() - started:.0f} s")
    if args.docs is not None:
        write_docs(args.docs, out.text, args.section)
        logger.info("rewrote the bench.quality section of %s", args.docs)
    return targets


if __name__ == "__main__":
    main()
