"""Was the personalised arm's fine-tuning converged? Fine-tune a finished ``bench.quality`` run to convergence.

``bench.quality`` fine-tunes each federated model at each site with a short patience (4 validations of 10
steps). A fresh Adam's first full-size steps knock a converged model off its optimum, so validation first
drops and takes longer than that patience to win the drop back: the fine-tuning stopped on the dip and kept
step 0 (the table's "then steps site-c 0"). That is an arm stopped before convergence, which the issue's
rule counts against the comparison. This re-runs the fine-tuning of every federated arm's selected model
at every site and seed with a learning-rate warm-up and a patience long enough to see past the dip, and
reports, per site:

- the fine-tuning itself: steps run, best step (converged when its patience, not the budget, stopped it),
  validation gain;
- ``new fine-tune − bench.quality's fine-tune`` (test PSNR): what the short patience cost;
- the best personalised model *by validation* among every arm with and without the new fine-tuning,
  ``− local`` (each site's own model at its own best round), with the hierarchical bootstrap 95 % CI
  (seeds, then test subjects, then slices) and the join / no benefit / harmful verdict;
- the same against the control, each site's local model given the same fine-tuning: a gain the procedure
  gives a site's own model is not the federation's (the local arm's 6-round patience can stop it early too).

Everything is selected on validation; the test split is only scored. Run::

    python -m bench.fine_tune_convergence runs/bench-quality/R4 --docs docs/BENCHMARKS.md --section scarce-R4
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.harness import model_recon, set_threads
from bench.matched_budget import best_within, site_psnr
from bench.quality import (
    MODELS,
    MULTI_SEED_MODEL,
    Output,
    doc_markers,
    learn_subjects,
    load_model,
    score_split,
    subject_of,
    write_docs,
)
from common.data.dataset import SiteDataset
from common.data.loaders import load_site
from common.errors import ConfigError
from common.personalise import FINETUNED_FILE, FineTuneResult, fine_tune_site, stopped_by_patience
from common.runconfig import RunConfig
from common.stats import hierarchical_bootstrap, join_verdict
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger("bench.fine_tune_convergence")

FINE_TUNED = "+ fine-tune to convergence"


@dataclass
class Arm:
    """One candidate model per site and seed: its validation PSNR and per-slice test PSNR."""

    val: dict[str, list[float]] = field(default_factory=dict)  # site -> per seed
    test: dict[str, list[list[float]]] = field(default_factory=dict)  # site -> per seed -> per slice

    def add(self, site: str, val: float, test: list[float]) -> None:
        self.val.setdefault(site, []).append(val)
        self.test.setdefault(site, []).append(test)


def _run_config(run: Path) -> RunConfig:
    path = run / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing (is {run.parent.parent} a bench.quality acceleration folder?)")
    flat = json.loads(path.read_text(encoding="utf-8"))
    return RunConfig.from_flat({k: v for k, v in flat.items() if k in RunConfig().to_flat()})


def _finetune_records(store: RunDir) -> dict[str, dict[str, float]]:
    return {r["site"]: r["metrics"] for r in store.read_metrics(dedupe=True) if r["phase"] == "finetune"}


def _psnrs(net: torch.nn.Module, split: SiteDataset) -> list[float]:
    return [s.psnr for s in score_split(model_recon(net), split)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="one acceleration's folder of a bench.quality --out (e.g. OUT/R4)")
    parser.add_argument("--arms", nargs="+", default=["local-layers", "fedavg"], help="federated arms' run keys")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", choices=sorted(MODELS), default=MULTI_SEED_MODEL, help="the runs' model")
    parser.add_argument("--steps", type=int, default=3000, help="fine-tuning budget per site (steps)")
    parser.add_argument("--eval-every", type=int, default=10, help="validate every N steps")
    parser.add_argument("--patience", type=int, default=15, help="stop after N validations without gain")
    parser.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up (steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=Path, help="rewrite this file's bench.fine_tune_convergence SECTION")
    parser.add_argument("--section", default="", help="the docs section's name (markers carry it)")
    args = parser.parse_args(argv)
    for name in ("steps", "eval_every", "patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.docs:
        # Checked before the run, not after it: the section is written once the hour of fine-tuning is done.
        begin, end = doc_markers(args.section, tool="bench.fine_tune_convergence")
        text = args.docs.read_text(encoding="utf-8") if args.docs.is_file() else ""
        if begin not in text or end not in text:
            parser.error(f"--docs {args.docs}: no '{begin}' ... '{end}' markers")
    return args


def main(argv: list[str] | None = None) -> list[tuple]:
    """Fine-tune, score, compare; print the tables (returned as the verdict rows) and optionally the docs."""
    args = parse_args(argv)
    set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Output()
    model, model_args = MODELS[args.model]
    site_files = sorted((args.root / "sites").glob("*.toml"))
    if not site_files:
        raise ConfigError(f"{args.root / 'sites'}: no site TOMLs (is {args.root} a bench.quality acceleration folder?)")
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in site_files)}
    for datasets in data.values():
        learn_subjects(datasets.values())
    subjects: dict[str, list[str]] = {}
    local, local_tuned = Arm(), Arm()
    arms: dict[str, Arm] = {}
    before: dict[str, Arm] = {}
    tuning: list[tuple] = []
    started = time.perf_counter()
    for seed in args.seeds:
        run = args.root / "runs" / f"{model}-local-s{seed}"
        values, config = site_psnr(run), _run_config(run)
        for n, ds in data.items():
            rnd = best_within(values[n], max(values[GLOBAL_SITE]))
            state = torch.load(run / "checkpoints" / f"round-{rnd:04d}.pt", weights_only=True)["state_dict"]
            mine = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{n}/")}
            net = load_model(model, model_args, mine)
            scores = score_split(model_recon(net), ds["test"])
            subjects[n] = [f"{n}/{subject_of(s.volume)}" for s in scores]
            local.add(n, values[n][rnd], [s.psnr for s in scores])
            # The control: the same fine-tuning applied to the site's own model. A gain here is the procedure's,
            # not the federation's, and the personalised models must beat this too.
            result, seconds = _tune(net, ds, config, args)
            local_tuned.add(n, float(result.metrics["psnr"]), _psnrs(net, ds["test"]))
            tuning.append(("local", seed, n, "-", *_tuning_cells(result, seconds, args)))
            logger.info("local seed %d %s: %s", seed, n, tuning[-1])
        for key in args.arms:
            run = args.root / "runs" / f"{model}-{key}-s{seed}"
            store, config = RunDir(run), _run_config(run)
            selected = store.best()
            if selected is None:
                raise ConfigError(f"{run}: no best.json (the run did not finish)")
            rnd = selected["round"]
            shared = torch.load(run / "checkpoints" / f"round-{rnd:04d}.pt", weights_only=True)["state_dict"]
            records = _finetune_records(store)
            start_arm, tuned_arm = arms.setdefault(key, Arm()), arms.setdefault(f"{key} {FINE_TUNED}", Arm())
            for n, ds in data.items():
                site_file = run / "site-state" / n / f"round-{rnd:04d}.pt"
                own = dict(torch.load(site_file, weights_only=True)["local"]) if config.local_layer_patterns else {}
                net = load_model(model, model_args, {**shared, **own})
                start_test = _psnrs(net, ds["test"])
                old = run / "site-state" / n / FINETUNED_FILE
                if old.is_file() and n in records:
                    saved = torch.load(old, map_location="cpu", weights_only=True)["state_dict"]
                    before.setdefault(key, Arm()).add(
                        n, float(records[n]["psnr"]), _psnrs(load_model(model, model_args, saved), ds["test"])
                    )
                result, seconds = _tune(net, ds, config, args)
                start_arm.add(n, float(result.start_metrics["psnr"]), start_test)
                tuned_arm.add(n, float(result.metrics["psnr"]), _psnrs(net, ds["test"]))
                old_step = records.get(n, {}).get("best-step")
                cells = _tuning_cells(result, seconds, args)
                tuning.append((key, seed, n, "-" if old_step is None else int(old_step), *cells))
                logger.info("%s seed %d %s: %s", key, seed, n, tuning[-1])
    return report(args, out, data, subjects, (local, local_tuned), arms, before, tuning, time.perf_counter() - started)


def _tune(
    net: torch.nn.Module, ds: dict[str, SiteDataset], config: RunConfig, args: argparse.Namespace
) -> tuple[FineTuneResult, float]:
    """Fine-tune ``net`` in place as the run's ClientApp does, with ``args``' steps, patience and warm-up."""
    keys = {
        "fine_tune_steps": args.steps,
        "fine_tune_eval_every": args.eval_every,
        "fine_tune_patience": args.patience,
        "fine_tune_warmup": args.warmup,
    }
    clock = time.perf_counter()
    result = fine_tune_site(net, ds, config.model_copy(update=keys))
    return result, time.perf_counter() - clock


def _tuning_cells(result: FineTuneResult, seconds: float, args: argparse.Namespace) -> tuple:
    return (
        result.steps,
        result.best_step,
        _converged(result.steps, result.best_step, args),
        f"{result.metrics['psnr'] - result.start_metrics['psnr']:+.2f}",
        f"{seconds:.0f}",
    )


def report(
    args: argparse.Namespace,
    out: Output,
    data: dict,
    subjects: dict[str, list[str]],
    baselines: tuple[Arm, Arm],
    arms: dict[str, Arm],
    before: dict[str, Arm],
    tuning: list[tuple],
    seconds: float,
) -> list[tuple]:
    """The three tables: fine-tuning per site and seed, what the short patience cost, the verdicts."""
    out(
        f"bench.fine_tune_convergence: {args.root}; arms {', '.join(args.arms)}; seeds {args.seeds}; fine-tuning up "
        f"to {args.steps} steps, validated every {args.eval_every}, patience {args.patience}, learning rate warmed "
        f"up over {args.warmup} steps (the runs' own learning rate, batch and loss); {seconds:.0f} s."
    )
    out()
    out(
        "| arm | seed | site | bench.quality's best step | steps run | best step | converged | val. gain (dB) | seconds |"
    )
    out("|---|---|---|---|---|---|---|---|---|")
    for row in tuning:
        out("| " + " | ".join(str(c) for c in row) + " |")
    out()
    out("| arm | site | test PSNR, bench.quality's fine-tune (dB) | test PSNR, to convergence (dB) | difference (dB) |")
    out("|---|---|---|---|---|")
    for key, old in before.items():
        new = arms[f"{key} {FINE_TUNED}"]
        for n in data:
            diff = hierarchical_bootstrap(np.array(new.test[n]), np.array(old.test[n]), subjects[n])
            out(f"| {key} | {n} | {_mean(old.test[n]):.2f} | {_mean(new.test[n]):.2f} | {diff} |")
    out()
    out(
        "| site | best personalised (on validation) | val. PSNR (dB) | test PSNR (dB) | local test PSNR (dB) "
        "| − local (dB) | verdict | local + the same fine-tuning, test PSNR (dB) | − (local + fine-tuning) (dB) "
        "| verdict against it |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|")
    local, local_tuned = baselines
    rows = []
    for n in data:
        chosen = max(arms, key=lambda k: (float(np.mean(arms[k].val[n])), FINE_TUNED in k))
        arm = arms[chosen]
        gain = hierarchical_bootstrap(np.array(arm.test[n]), np.array(local.test[n]), subjects[n])
        control = hierarchical_bootstrap(np.array(arm.test[n]), np.array(local_tuned.test[n]), subjects[n])
        row = (n, chosen, float(np.mean(arm.val[n])), _mean(arm.test[n]), _mean(local.test[n]), gain)
        rows.append((*row, join_verdict(gain), _mean(local_tuned.test[n]), control, join_verdict(control)))
        out(
            f"| {n} | {chosen} | {row[2]:.2f} | {row[3]:.2f} | {row[4]:.2f} | {gain} | {join_verdict(gain)} "
            f"| {_mean(local_tuned.test[n]):.2f} | {control} | {join_verdict(control)} |"
        )
    if args.docs:
        write_docs(args.docs, out.text, args.section, tool="bench.fine_tune_convergence")
    return rows


def _converged(steps: int, best_step: int, args: argparse.Namespace) -> str:
    return "yes" if stopped_by_patience(steps, best_step, args.patience, args.eval_every) else "no: budget"


def _mean(per_seed: list[list[float]]) -> float:
    return float(np.mean([np.mean(s) for s in per_seed]))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:  # a wrong folder or an unfinished run: one line, not a traceback
        raise SystemExit(f"bench.fine_tune_convergence: {exc}") from None
