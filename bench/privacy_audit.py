"""A membership-inference audit: can an attacker tell a site's training patients from others by the model?

The attack is the loss-threshold attack (Yeom et al. 2018) at the patient level: a patient's score is
minus the model's mean L1 reconstruction loss over the patient's slices; training patients (members)
should score higher than held-out patients of the same site (non-members, its val + test subjects). Its
AUC (Mann–Whitney) comes with a 95 % bootstrap CI over patients (members and non-members resampled
separately), per seed. 0.5 = the attacker learns nothing.

Settings, all trained on one small site so that the unprotected model can memorise (few patients, many
epochs, no augmentation): no protection (the ClientApp's ``common.training.train``), and patient-level
DP-SGD (``common.patient_dp.train_patient_private``) with σ set for each target ε per patient. The
PSNR each setting costs is measured on the non-members. This is the model a one-site federation would
produce; a multi-site FedAvg model is not audited here.

Run::

    python -m bench.privacy_audit
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from bench.harness import markdown_table, model_recon, score_slices, start_bench, write_sites
from common.data.loaders import load_site, make_loader
from common.dp import PrivacyLedger, without_inplace_activations
from common.models import build_model
from common.patient_dp import subject_groups, train_patient_private
from common.training import predict, train

logger = logging.getLogger("bench.privacy_audit")

DELTA = 1e-5


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(member score > non-member score), ties counted half (Mann–Whitney U / (m·n))."""
    diff = members[:, None] - others[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def bootstrap_ci(members: np.ndarray, others: np.ndarray, rounds: int, seed: int) -> tuple[float, float]:
    """95 % percentile bootstrap CI of the AUC, patients resampled within each group."""
    rng = np.random.default_rng(seed)
    draws = [auc(rng.choice(members, len(members)), rng.choice(others, len(others))) for _ in range(rounds)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


@torch.no_grad()
def patient_scores(model: torch.nn.Module, dataset: Dataset) -> np.ndarray:
    """Minus each patient's mean L1 reconstruction loss (the attacker's membership score)."""
    model.eval()
    losses: dict[str, list[float]] = defaultdict(list)
    for batch in DataLoader(dataset, batch_size=4, shuffle=False):
        pred = predict(model, batch)
        per_slice = (pred - batch["target"]).abs().flatten(1).mean(1) / batch["max_value"].to(pred.dtype)
        for subject, value in zip(batch["subject"], per_slice.tolist()):
            losses[str(subject)].append(value)
    return -np.array([np.mean(v) for v in losses.values()])


def sigma_for(epsilon: float, rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1 %) whose ε per patient after ``steps`` is ≤ ``epsilon``."""
    low, high = 0.3, 50.0
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if PrivacyLedger([(mid, rate, steps)]).epsilon(DELTA) <= epsilon else (mid, high)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--subjects", type=int, default=30)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2, help="slices per step (no DP); expected patients per step (DP)")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--chans", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unprotected", action=argparse.BooleanOptionalAction, default=True,
                        help="audit the model trained without DP too (--no-unprotected: the DP settings only)")
    args = parser.parse_args()
    start_bench("privacy_audit", args.threads)
    model_args = {"chans": args.chans, "num_pool_layers": 2}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sites(Path(tmp), size=args.size, subjects=args.subjects, slices=args.slices, names=("site-a",))[0]
        _, datasets = load_site(str(path))
        members_set = datasets["train"]
        others_set = ConcatDataset([datasets["val"], datasets["test"]])
        patients = len(subject_groups(members_set))
        rate = min(1.0, args.batch / patients)
        print(f"site-a at {args.size}², {args.slices} slices/volume: {patients} member patients "
              f"({len(members_set)} slices), {len(others_set)} non-member slices; U-Net {model_args}; "
              f"{args.steps} steps of Adam lr 1e-3, batch {args.batch}, no augmentation; δ = {DELTA}")
        settings = [("none", None)] * args.unprotected + [(f"patient-level DP, ε ≤ {e:g}", e) for e in args.epsilons]
        for label, epsilon in settings:
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = without_inplace_activations(build_model("unet", **model_args))
                if epsilon is None:
                    loader = make_loader(members_set, args.batch, shuffle=True, seed=seed, augment=False)
                    train(model, loader, steps=args.steps, lr=1e-3, loss="l1")
                    sigma, spent = 0.0, float("inf")
                else:
                    sigma = sigma_for(epsilon, rate, args.steps)
                    train_patient_private(model, members_set, noise_multiplier=sigma, max_grad_norm=1.0,
                                          subjects_per_step=args.batch, steps=args.steps, chunk=4, seed=seed)
                    spent = PrivacyLedger([(sigma, rate, args.steps)]).epsilon(DELTA)
                members, others = patient_scores(model, members_set), patient_scores(model, others_set)
                low, high = bootstrap_ci(members, others, args.bootstrap, seed)
                held_out = score_slices(model_recon(model), DataLoader(others_set, batch_size=4))
                psnr = float(np.mean([s.psnr for s in held_out]))
                logger.info("%s seed %d: AUC %.3f [%.3f, %.3f], PSNR %.2f", label, seed, auc(members, others),
                            low, high, psnr)
                rows.append([label, seed, f"{sigma:.2f}" if sigma else "–", f"{spent:.2f}",
                             f"{auc(members, others):.3f} [{low:.3f}, {high:.3f}]", f"{psnr:.2f}"])
    print(markdown_table(["setting", "seed", "σ", "ε per patient", "MIA AUC [95 % CI]", "non-member PSNR (dB)"], rows))


if __name__ == "__main__":
    main()
