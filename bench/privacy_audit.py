"""A membership-inference audit: can an attacker tell a site's training patients from others by the model?

The attack is the loss-threshold attack (Yeom et al. 2018) at the patient level: a patient's score is
minus the model's mean L1 reconstruction loss over the patient's slices; training patients (members)
should score higher than held-out patients of the same site (non-members). Its AUC (Mann–Whitney) is
computed per seed and pooled as the mean over seeds; the 95 % CI is a two-level bootstrap (seeds
resampled, then members and non-members resampled within each seed), so it covers the spread over
patients and over training runs. 0.5 = the attacker learns nothing.

The site's subjects are split half members, half non-members, afresh for every seed (the split seed
is the run's seed), so each seed audits another member set. Settings (arms), all trained on the same
member patients for the same number of slice visits, no augmentation (so an unprotected model can
memorise):

- ``none``: the ClientApp's ``common.training.train``;
- ``sample``: sample-level DP-SGD (``common.dp.train_private``), ε per *slice*;
- ``patient``: patient-level DP-SGD (``common.patient_dp.train_patient_private``), one row per ε per patient;
- ``fedavg``: the member patients spread over ``--client-sites`` sites, FedAvg of local training, no DP
  (the baseline for the next row);
- ``client``: the same federation with client-level DP: each site's update clipped to ``--client-clip``,
  Gaussian noise σ·C / sites added to the mean (Flower's fixed-clipping formula), ε per *site*.

The PSNR each setting costs is measured on the non-members.

Run::

    python -m bench.privacy_audit
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from bench.harness import (
    markdown_table,
    model_recon,
    score_slices,
    start_bench,
    write_sites,
)
from common.config import load_site_config
from common.data.dataset import SiteDataset, build_site_datasets
from common.data.loaders import make_loader
from common.dp import PrivacyLedger, prepared_for_opacus, train_private
from common.models import build_model
from common.patient_dp import subject_groups, train_patient_private
from common.training import predict, train

logger = logging.getLogger("bench.privacy_audit")

DELTA = 1e-5
ARMS = ("none", "sample", "patient", "fedavg", "client")


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(member score > non-member score), ties counted half (Mann–Whitney U / (m·n))."""
    diff = members[:, None] - others[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def pooled_auc(runs: Sequence[tuple[np.ndarray, np.ndarray]], rounds: int, seed: int) -> tuple[float, float, float]:
    """Mean per-run AUC over ``runs`` (one (members, non-members) pair per seed) and its 95 % bootstrap CI.

    Each bootstrap draw resamples the runs, then members and non-members within each drawn run, so the
    interval reflects both the patients and the variation between training runs.
    """
    rng = np.random.default_rng(seed)
    point = float(np.mean([auc(m, o) for m, o in runs]))
    draws = []
    for _ in range(rounds):
        picked = rng.integers(len(runs), size=len(runs))
        draws.append(
            np.mean(
                [auc(rng.choice(runs[i][0], len(runs[i][0])), rng.choice(runs[i][1], len(runs[i][1]))) for i in picked]
            )
        )
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


@torch.no_grad()
def patient_scores(model: torch.nn.Module, dataset: Dataset) -> np.ndarray:
    """Minus each patient's mean L1 reconstruction loss (the attacker's membership score)."""
    model.eval()
    losses: dict[str, list[float]] = defaultdict(list)
    for batch in DataLoader(dataset, batch_size=8, shuffle=False):
        pred = predict(model, batch)
        per_slice = (pred - batch["target"]).abs().flatten(1).mean(1) / batch["max_value"].to(pred.dtype)
        for subject, value in zip(batch["subject"], per_slice.tolist()):
            losses[str(subject)].append(value)
    return -np.array([np.mean(v) for v in losses.values()])


def sigma_for(epsilon: float, rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1 %) whose ε after ``steps`` at sampling ``rate`` is ≤ ``epsilon``."""
    low, high = 0.3, 200.0
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if PrivacyLedger([(mid, rate, steps)]).epsilon(DELTA) <= epsilon else (mid, high)
    return high


def audit_split(path: Path, seed: int) -> tuple[SiteDataset, Dataset]:
    """The site's subjects split half members (train), half non-members (val + test), by ``seed``."""
    config = load_site_config(path)
    split = config.split.model_copy(update={"seed": seed, "val_fraction": 0.25, "test_fraction": 0.25})
    datasets = build_site_datasets(config.model_copy(update={"split": split}))
    return datasets["train"], ConcatDataset([datasets["val"], datasets["test"]])


def train_federated(
    model: torch.nn.Module,
    members: SiteDataset,
    *,
    sites: int,
    rounds: int,
    local_steps: int,
    batch: int,
    noise_multiplier: float,
    clip: float,
    seed: int,
) -> list[float]:
    """FedAvg over ``sites`` shards of the member patients; with ``noise_multiplier`` > 0, client-level DP.

    Each round every site trains ``local_steps`` from the global weights (fresh Adam, as the ClientApp
    does), its update is clipped to L2 norm ``clip`` (when > 0), and N(0, (σ·clip / sites)²) is added to the
    uniform mean: Flower's ``DifferentialPrivacyServerSideFixedClipping``. Returns the unclipped update norms.
    """
    groups = subject_groups(members)
    shards = [Subset(members, [i for g in groups[k::sites] for i in g]) for k in range(sites)]
    generator = torch.Generator().manual_seed(seed)
    norms = []
    for rnd in range(rounds):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items()}
        for k, shard in enumerate(shards):
            local = copy.deepcopy(model)
            loader = make_loader(shard, batch, shuffle=True, seed=seed * 1000 + rnd * sites + k, augment=False)
            train(local, loader, steps=local_steps, lr=1e-3, loss="l1")
            update = {name: local.state_dict()[name].float() - start[name].float() for name in start}
            norm = float(torch.sqrt(sum(torch.sum(u.double() ** 2) for u in update.values())))
            norms.append(norm)
            factor = min(1.0, clip / (norm + 1e-12)) if clip > 0 else 1.0
            for name in total:
                total[name] += factor * update[name]
        std = noise_multiplier * clip / sites
        new_state = {}
        for name, value in start.items():
            mean = total[name] / sites
            if std > 0:
                mean = mean + torch.normal(0.0, std, mean.shape, generator=generator)
            new_state[name] = (value.float() + mean).to(value.dtype)
        model.load_state_dict(new_state)
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="site-c", help="the site template (its coils, contrasts, mask)")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--subjects", type=int, default=80, help="subjects in all: half members, half non-members")
    parser.add_argument("--slices", type=int, default=1, help="slices per volume (a subject has one per contrast)")
    parser.add_argument("--steps", type=int, default=600, help="training steps (the federation: local steps in all)")
    parser.add_argument("--batch", type=int, default=4, help="slices per step (patient-level DP: the expected number)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["none", "sample", "patient", "client"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0], help="patient-level ε targets")
    parser.add_argument("--sample-epsilon", type=float, default=8.0, help="sample-level ε (per slice) target")
    parser.add_argument("--client-epsilon", type=float, default=8.0, help="client-level ε (per site) target")
    parser.add_argument("--client-sites", type=int, default=4)
    parser.add_argument("--client-rounds", type=int, default=15)
    parser.add_argument("--client-clip", type=float, default=0.5, help="L2 bound of a site's update")
    parser.add_argument("--clip", type=float, default=1.0, help="DP-SGD's per-slice / per-patient gradient bound")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--chans", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    started = start_bench("privacy_audit", args.threads)
    model_args = {"chans": args.chans, "num_pool_layers": 2}
    settings: list[tuple[str, str, float | None]] = []
    for arm in args.arms:
        if arm == "patient":
            settings += [(f"patient-level DP, ε ≤ {e:g} per patient", arm, e) for e in args.epsilons]
        elif arm == "sample":
            settings.append((f"sample-level DP, ε ≤ {args.sample_epsilon:g} per slice", arm, args.sample_epsilon))
        elif arm == "client":
            settings.append(
                (
                    f"client-level DP ({args.client_sites} sites), ε ≤ {args.client_epsilon:g} per site",
                    arm,
                    args.client_epsilon,
                )
            )
        else:
            settings.append(({"none": "none", "fedavg": f"FedAvg ({args.client_sites} sites), no DP"}[arm], arm, None))
    local_steps = max(1, args.steps // (args.client_rounds * args.client_sites))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sites(Path(tmp), size=args.size, subjects=args.subjects, slices=args.slices, names=(args.site,))[0]
        splits = {seed: audit_split(path, seed) for seed in args.seeds}
        members0, others0 = splits[args.seeds[0]]
        patients = len(subject_groups(members0))
        print(
            f"{args.site} at {args.size}², {args.slices} slice(s)/volume: {patients} member and "
            f"{len(subject_groups(others0.datasets[0])) + len(subject_groups(others0.datasets[1]))} non-member "
            f"patients per seed ({len(members0)} / {len(others0)} slices); U-Net {model_args}; "
            f"{args.steps} steps of Adam lr 1e-3 at {args.batch} slices per step (≈ "
            f"{args.steps * args.batch / len(members0):.0f} epochs), no augmentation; DP clip C = {args.clip}; "
            f"federation: {args.client_sites} sites × {args.client_rounds} rounds × {local_steps} local steps, "
            f"update clip {args.client_clip}; δ = {DELTA}; seeds {args.seeds}"
        )
        for label, arm, epsilon in settings:
            runs, psnrs, sigma, spent, arm_started = [], [], 0.0, float("inf"), time.perf_counter()
            for seed in args.seeds:
                members_set, others_set = splits[seed]
                torch.manual_seed(seed)
                model = prepared_for_opacus(build_model("unet", **model_args))
                if arm == "none":
                    train(
                        model,
                        make_loader(members_set, args.batch, shuffle=True, seed=seed, augment=False),
                        steps=args.steps,
                        lr=1e-3,
                        loss="l1",
                    )
                elif arm == "sample":
                    rate = args.batch / len(members_set)
                    sigma = sigma_for(epsilon, rate, args.steps)
                    train_private(
                        model,
                        make_loader(members_set, args.batch, shuffle=True, seed=seed, augment=False),
                        noise_multiplier=sigma,
                        max_grad_norm=args.clip,
                        steps=args.steps,
                    )
                    spent = PrivacyLedger([(sigma, rate, args.steps)]).epsilon(DELTA)
                elif arm == "patient":
                    groups = subject_groups(members_set)
                    per_step = args.batch * len(groups) / len(members_set)  # expected slices per step = --batch
                    rate = min(1.0, per_step / len(groups))
                    sigma = sigma_for(epsilon, rate, args.steps)
                    train_patient_private(
                        model,
                        members_set,
                        noise_multiplier=sigma,
                        max_grad_norm=args.clip,
                        subjects_per_step=per_step,
                        steps=args.steps,
                        chunk=8,
                        seed=seed,
                    )
                    spent = PrivacyLedger([(sigma, rate, args.steps)]).epsilon(DELTA)
                else:
                    sigma = sigma_for(epsilon, 1.0, args.client_rounds) if arm == "client" else 0.0
                    norms = train_federated(
                        model,
                        members_set,
                        sites=args.client_sites,
                        rounds=args.client_rounds,
                        local_steps=local_steps,
                        batch=args.batch,
                        noise_multiplier=sigma,
                        clip=args.client_clip if arm == "client" else 0.0,
                        seed=seed,
                    )
                    spent = PrivacyLedger([(sigma, 1.0, args.client_rounds)]).epsilon(DELTA) if sigma else spent
                    logger.info(
                        "%s seed %d: site update norms median %.3f (max %.3f)",
                        label,
                        seed,
                        float(np.median(norms)),
                        max(norms),
                    )
                members, others = patient_scores(model, members_set), patient_scores(model, others_set)
                held_out = score_slices(model_recon(model), DataLoader(others_set, batch_size=8))
                psnrs.append(float(np.mean([s.psnr for s in held_out])))
                runs.append((members, others))
                logger.info("%s seed %d: AUC %.3f, PSNR %.2f", label, seed, auc(members, others), psnrs[-1])
            point, low, high = pooled_auc(runs, args.bootstrap, seed=0)
            per_seed = ", ".join(f"{auc(m, o):.2f}" for m, o in runs)
            print(f"{label}: AUC per seed {per_seed}, {time.perf_counter() - arm_started:.0f} s", flush=True)
            rows.append(
                [
                    label,
                    f"{sigma:.2f}" if sigma else "–",
                    f"{spent:.2f}",
                    f"{point:.3f} [{low:.3f}, {high:.3f}]",
                    per_seed,
                    f"{np.mean(psnrs):.2f} ± {np.std(psnrs):.2f}",
                ]
            )
    print(
        markdown_table(
            [
                "setting",
                "σ",
                "ε",
                f"MIA AUC pooled over {len(args.seeds)} seeds [95 % CI]",
                "AUC per seed",
                "non-member PSNR (dB, mean ± sd over seeds)",
            ],
            rows,
        )
    )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
