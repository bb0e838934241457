"""Quality of a radial site, alone and in a mixed Cartesian + radial federation (issue #28).

Three sites at a small matrix: the Cartesian site-a (fastMRI-style raw k-space, equispaced R = 4) and
site-b (BraTS-style images, random R = 6), and the radial site-r (raw golden-angle radial h5, spokes
giving R = 4 or 8). For each radial acceleration the radial site is scored, on its test subjects, with:

- zero-filled: the density-compensated NUFFT adjoint (RSS of the coil images);
- CS: L1-wavelet SENSE on the NUFFT operator, lambda and iterations tuned on its validation subjects;
- local: the unrolled model trained on site-r alone, as many steps as it takes in the federation;
- federated: FedAvg of site-a + site-b + site-r (one shared model; each site's DC uses its own operator).

The Cartesian sites are scored with their local models, the Cartesian-only federation (site-a + site-b)
and the mixed federation: their gain or loss from admitting the radial site. Every learned method runs
for each training seed; intervals are 95 % hierarchical bootstraps (seeds, then test subjects, then
slices: :mod:`common.stats`). Federated training (FedAvg, each site keeping its Adam state across rounds:
``client-optimizer = keep``) is emulated without Flower, training and averaging as the apps do;
``tests/test_federation_noncartesian.py`` runs the real thing.

    python -m bench.noncartesian_quality            # defaults: 64², 8 subjects per site, R = 4 and 8, 2 seeds
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.harness import (
    Recon,
    SliceScore,
    markdown_table,
    model_recon,
    score_slices,
    start_bench,
    write_sites,
)
from common.config import load_site_config
from common.cs import l1_wavelet_sense_iterates
from common.data.dataset import SiteDataset, build_site_datasets
from common.data.loaders import make_loader
from common.fft import center_crop
from common.models import build_model
from common.personalise import fine_tune
from common.stats import hierarchical_bootstrap, hierarchical_resamples
from common.training import train, zero_filled

log = logging.getLogger("bench.noncartesian_quality")

CARTESIAN = ("site-a", "site-b")
RADIAL = "site-r"
CS_LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2)
CS_ITERATIONS = (25, 50, 100)
CS_WAVELET = "db4"

Splits = dict[str, SiteDataset]
Scores = dict[tuple[str, str], list[list[SliceScore]]]  # (site, method) -> one list of slice scores per seed


def _split_fractions(path: Path, val: float, test: float) -> None:
    """More validation and test subjects than the templates' 0.2 / 0.2: a CI over subjects needs several."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^val_fraction = .*$", f"val_fraction = {val!r}", text, count=1)
    text = re.sub(r"(?m)^test_fraction = .*$", f"test_fraction = {test!r}", text, count=1)
    path.write_text(text, encoding="utf-8")


def _sites(
    directory: Path, names: Sequence[str], args: argparse.Namespace, acceleration: float | None = None
) -> dict[str, Splits]:
    paths = write_sites(
        directory, size=args.size, subjects=args.subjects, slices=args.slices, acceleration=acceleration, names=names
    )
    for path in paths:
        _split_fractions(path, args.val_fraction, args.test_fraction)
    return {path.stem: build_site_datasets(load_site_config(path)) for path in paths}


def _test(dataset: SiteDataset, recon: Recon) -> list[SliceScore]:
    return score_slices(recon, make_loader(dataset, 4, shuffle=False, seed=0))


def tune_cs(dataset: SiteDataset) -> tuple[float, int, float]:
    """(lambda, iterations, validation PSNR) of CS with the best mean validation PSNR over the grid."""
    loader = list(make_loader(dataset, 4, shuffle=False, seed=0))
    best: tuple[float, int, float] = (CS_LAMBDAS[0], CS_ITERATIONS[0], -np.inf)
    for lam in CS_LAMBDAS:
        per_count: dict[int, list[float]] = {count: [] for count in CS_ITERATIONS}
        for batch in loader:
            kept = l1_wavelet_sense_iterates(
                batch["masked_kspace"],
                batch["mask"],
                batch["sens_maps"],
                lam=lam,
                iterations=CS_ITERATIONS,
                wavelet=CS_WAVELET,
            )
            for count, image in kept.items():
                cropped = center_crop(image.abs(), tuple(batch["target"].shape[-2:]))
                per_count[count] += [s.psnr for s in score_slices(lambda _b, c=cropped: c, [batch])]
        for count, values in per_count.items():
            if float(np.mean(values)) > best[2]:
                best = (lam, count, float(np.mean(values)))
    return best


def cs_recon(lam: float, iterations: int) -> Recon:
    def run(batch: dict[str, object]) -> torch.Tensor:
        kept = l1_wavelet_sense_iterates(
            batch["masked_kspace"],
            batch["mask"],
            batch["sens_maps"],  # type: ignore[arg-type]
            lam=lam,
            iterations=(iterations,),
            wavelet=CS_WAVELET,
        )
        return center_crop(kept[iterations].abs(), tuple(batch["target"].shape[-2:]))  # type: ignore[union-attr]

    return run


def _local(args: argparse.Namespace, splits: Splits, seed: int) -> torch.nn.Module:
    """One site alone: the same steps (rounds x local steps + fine-tuning) and learning rate as federated."""
    torch.manual_seed(seed)
    model = build_model("unrolled", **args.model_args)
    train(
        model,
        make_loader(splits["train"], args.batch, shuffle=True, seed=seed),
        steps=args.rounds * args.steps + args.fine_tune_steps,
        lr=args.lr,
    )
    return model


def _fine_tuned(args: argparse.Namespace, state: dict[str, torch.Tensor], splits: Splits, seed: int) -> torch.nn.Module:
    """The site's fine-tuned copy of the global model, as ``fine-tune-steps`` makes it in the ClientApp.

    Up to ``--fine-tune-steps`` Adam steps on the site's training split, validated every 10; the best
    validation step is kept (the unmodified global model included).
    """
    model = build_model("unrolled", **args.model_args)
    model.load_state_dict(state)
    torch.manual_seed(seed + args.rounds + 1)
    fine_tune(
        model,
        make_loader(splits["train"], args.batch, shuffle=True, seed=seed + args.rounds + 1),
        make_loader(splits["val"], args.batch, shuffle=False, seed=seed),
        steps=args.fine_tune_steps,
        eval_every=10,
        lr=args.lr,
    )
    return model


def _federated(args: argparse.Namespace, datasets: dict[str, Splits], seed: int) -> dict[str, torch.Tensor]:
    """FedAvg with ``client-optimizer = keep`` (README: the best federated setting of bench.quality).

    Each round every site loads the global weights, trains ``steps`` with its own Adam, kept across
    rounds as the ClientApp keeps it, and the server averages weighted by training examples, as
    ``bench.harness.emulate_fedavg`` does: the local baseline's Adam runs uninterrupted too, so both arms
    get the same optimiser.
    """
    torch.manual_seed(seed)
    state = build_model("unrolled", **args.model_args).state_dict()
    sites = {name: build_model("unrolled", **args.model_args) for name in datasets}
    optimisers = {name: torch.optim.Adam(model.parameters(), lr=args.lr) for name, model in sites.items()}
    for rnd in range(1, args.rounds + 1):
        sent, weights = [], []
        for name, splits in datasets.items():
            torch.manual_seed(seed + rnd)
            model = sites[name]
            model.load_state_dict(state)
            loader = make_loader(splits["train"], args.batch, shuffle=True, seed=seed + rnd)
            result = train(model, loader, steps=args.steps, lr=args.lr, optimiser=optimisers[name])
            sent.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(result.num_examples)
        total = float(sum(weights))
        state = {k: sum(w / total * s[k].float() for s, w in zip(sent, weights)).to(sent[0][k].dtype) for k in state}
    return state


def _score_federation(
    args: argparse.Namespace, datasets: dict[str, Splits], seed: int, label: str, scores: Scores
) -> None:
    """Test scores of one federation's global model (and, with fine-tuning, of each site's copy)."""
    state = _federated(args, datasets, seed)
    model = build_model("unrolled", **args.model_args)
    model.load_state_dict(state)
    for name, splits in datasets.items():
        scores.setdefault((name, label), []).append(_test(splits["test"], model_recon(model)))
        if args.fine_tune_steps:
            scores.setdefault((name, f"{label} + fine-tune"), []).append(
                _test(splits["test"], model_recon(_fine_tuned(args, state, splits, seed)))
            )


def _matrix(runs: list[list[SliceScore]], metric: str) -> tuple[np.ndarray, list[str], list[tuple[str, int]]]:
    """(seeds, slices) values of one (site, method), the slices' subjects and their keys (for pairing)."""
    keys = [(s.volume, s.slice_idx) for s in runs[0]]
    for run in runs[1:]:
        assert [(s.volume, s.slice_idx) for s in run] == keys, "seeds were scored on different slices"
    return np.array([[getattr(s, metric) for s in run] for run in runs]), [SUBJECTS[s.volume] for s in runs[0]], keys


SUBJECTS: dict[str, str] = {}  # volume file name -> subject, from the readers


def _learn_subjects(datasets: dict[str, Splits]) -> None:
    for splits in datasets.values():
        SUBJECTS.update({ex.path.name: f"{ex.path.parent.name}/{ex.subject}" for ex in splits["test"].reader.examples})


def mean_ci(runs: list[list[SliceScore]], metric: str, digits: int) -> str:
    """Mean over seeds and slices with its 95 % hierarchical-bootstrap interval (seeds, subjects, slices)."""
    values, subjects, _ = _matrix(runs, metric)
    means = hierarchical_resamples(values, subjects, resamples=5000, seed=0)
    low, high = np.quantile(means, [0.025, 0.975])
    return f"{values.mean():.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def gain(scores: Scores, site: str, a: str, b: str) -> str:
    """PSNR of ``a`` minus ``b`` on the site's test slices, paired, with its hierarchical CI."""
    left, subjects, keys = _matrix(scores[(site, a)], "psnr")
    right, _, other = _matrix(scores[(site, b)], "psnr")
    assert keys == other, f"{a} and {b} were scored on different slices"
    return str(hierarchical_bootstrap(left, right, subjects, seed=0))


def run_acceleration(
    args: argparse.Namespace, acceleration: float, cartesian: dict[str, Splits], scores: Scores, workdir: Path
) -> str:
    """Score the radial site at one acceleration; returns the CS choice for the table's caption."""
    radial = _sites(workdir / f"radial-r{acceleration:g}", (RADIAL,), args, acceleration)
    _learn_subjects(radial)
    splits = radial[RADIAL]
    tag = f"R{acceleration:g}"
    scores[(RADIAL, f"{tag} zero-filled")] = [_test(splits["test"], zero_filled)]
    lam, iterations, val_psnr = tune_cs(splits["val"])
    log.info("site-r R=%g: CS lambda %g, %d iterations (validation %.2f dB)", acceleration, lam, iterations, val_psnr)
    scores[(RADIAL, f"{tag} CS")] = [_test(splits["test"], cs_recon(lam, iterations))]
    mixed = {**cartesian, **radial}
    for seed in args.seeds:
        log.info("site-r R=%g seed %d: local, then the mixed federation", acceleration, seed)
        scores.setdefault((RADIAL, f"{tag} local"), []).append(
            _test(splits["test"], model_recon(_local(args, splits, seed)))
        )
        _score_federation(args, mixed, seed, f"{tag} federated (mixed)", scores)
    return f"R = {acceleration:g}: lambda {lam:g}, {iterations} iterations"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noncartesian_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image matrix of every site")
    parser.add_argument("--subjects", type=int, default=8, help="subjects per site")
    parser.add_argument("--slices", type=int, default=4, help="slices per volume")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--test-fraction", type=float, default=0.375)
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4.0, 8.0], help="radial R (spokes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=15, help="local steps per round")
    parser.add_argument(
        "--fine-tune-steps",
        type=int,
        default=0,
        help="each site then fine-tunes the global model (best of every 10 steps on validation); "
        "local models get these steps too",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--nc-dc", choices=("cg", "gradient"), default="cg", help="the radial site's DC")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.model_args = {
        "num_cascades": 3,
        "chans": 16,
        "num_layers": 4,
        "lam": 1.0,
        "nc_dc": args.nc_dc,
        "cg_iterations": 3,
    }
    started = start_bench("noncartesian_quality", args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-noncartesian-"))
    cartesian = _sites(workdir / "cartesian", CARTESIAN, args)
    _learn_subjects(cartesian)
    scores: Scores = {}
    for seed in args.seeds:
        log.info("seed %d: Cartesian sites' local models and their federation without site-r", seed)
        for name, splits in cartesian.items():
            scores.setdefault((name, "local"), []).append(
                _test(splits["test"], model_recon(_local(args, splits, seed)))
            )
        _score_federation(args, cartesian, seed, "federated (Cartesian only)", scores)
    cs_choices = [run_acceleration(args, r, cartesian, scores, workdir) for r in args.accelerations]

    caption = (
        f"{args.size}², {args.subjects} subjects per site ({args.val_fraction:g} validation, "
        f"{args.test_fraction:g} test), {args.slices} slices per volume; unrolled {args.model_args}, "
        f"FedAvg {args.rounds} rounds x {args.steps} steps x batch {args.batch}, each site keeping its Adam state, "
        f"lr {args.lr:g} (local: the same "
        f"{args.rounds * args.steps + args.fine_tune_steps} steps alone), fine-tune {args.fine_tune_steps} "
        f"steps; seeds {args.seeds}; mean [95 % CI: seeds, test subjects, "
        "slices]"
    )

    def tuned(label: str) -> tuple[str, ...]:
        return (f"{label} + fine-tune",) if args.fine_tune_steps else ()

    rows = []
    for r in args.accelerations:
        for method in ("zero-filled", "CS", "local", "federated (mixed)", *tuned("federated (mixed)")):
            runs = scores[(RADIAL, f"R{r:g} {method}")]
            values, subjects, _ = _matrix(runs, "psnr")
            rows.append(
                [
                    f"{r:g}",
                    method,
                    mean_ci(runs, "psnr", 2),
                    mean_ci(runs, "ssim", 3),
                    f"{len(set(subjects))} / {values.shape[1]} / {values.shape[0]}",
                ]
            )
    print(f"\n#### Radial site-r (raw golden-angle radial h5) on its test subjects: {caption}\n")
    print(f"CS tuned on site-r's validation subjects: {'; '.join(cs_choices)}.\n")
    print(markdown_table(["R (site-r)", "method", "PSNR (dB)", "SSIM", "subjects / slices / seeds"], rows))

    rows = []
    for r in args.accelerations:
        tag = f"R{r:g}"
        rows.append(
            [
                f"{r:g}",
                RADIAL,
                "federated (mixed) − local",
                gain(scores, RADIAL, f"{tag} federated (mixed)", f"{tag} local"),
            ]
        )
        rows.append(
            [f"{r:g}", RADIAL, "federated (mixed) − CS", gain(scores, RADIAL, f"{tag} federated (mixed)", f"{tag} CS")]
        )
        for arm in tuned("federated (mixed)"):
            rows.append([f"{r:g}", RADIAL, f"{arm} − local", gain(scores, RADIAL, f"{tag} {arm}", f"{tag} local")])
        for name in CARTESIAN:
            rows.append(
                [
                    f"{r:g}",
                    name,
                    "federated (mixed) − federated (Cartesian only)",
                    gain(scores, name, f"{tag} federated (mixed)", "federated (Cartesian only)"),
                ]
            )
            rows.append(
                [f"{r:g}", name, "federated (mixed) − local", gain(scores, name, f"{tag} federated (mixed)", "local")]
            )
            for arm in tuned("federated (mixed)"):
                rows.append(
                    [
                        f"{r:g}",
                        name,
                        f"{arm} − {arm.replace('mixed', 'Cartesian only')}",
                        gain(scores, name, f"{tag} {arm}", arm.replace("mixed", "Cartesian only")),
                    ]
                )
                rows.append([f"{r:g}", name, f"{arm} − local", gain(scores, name, f"{tag} {arm}", "local")])
    print(
        "\n#### What federating gives the radial site, and what admitting it costs the Cartesian sites: PSNR "
        "difference (dB), paired on the same test slices, mean [95 % CI: seeds, test subjects, slices]\n"
    )
    print(markdown_table(["R (site-r)", "site", "comparison", "PSNR gain (dB)"], rows))

    rows = [
        [name, method, mean_ci(scores[(name, method)], "psnr", 2), mean_ci(scores[(name, method)], "ssim", 3)]
        for name in CARTESIAN
        for method in (
            "local",
            "federated (Cartesian only)",
            *tuned("federated (Cartesian only)"),
            *(
                f"R{r:g} {arm}"
                for r in args.accelerations
                for arm in ("federated (mixed)", *tuned("federated (mixed)"))
            ),
        )
    ]
    print("\n#### Cartesian sites on their test subjects (mixed: with site-r at the R named)\n")
    print(markdown_table(["site", "method", "PSNR (dB)", "SSIM"], rows))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
