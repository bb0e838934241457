"""Patient-level DP-SGD: per-subject gradients, their clipping bound, Poisson sampling and ε per patient."""

from __future__ import annotations

import copy

import dp_accounting
import pytest
import torch
from opacus import GradSampleModule

from bench.harness import write_sites
from common.data.loaders import load_site
from common.dp import PrivacyLedger, prepared_for_opacus
from common.models import build_model
from common.patient_dp import clip_subjects, subject_gradients, subject_groups, train_patient_private
from common.training import ReconLoss, predict

MODEL_ARGS = {"chans": 4, "num_pool_layers": 2}


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One site at 48², 8 subjects of 2 slices each (the train split holds most of them)."""
    path = write_sites(tmp_path_factory.mktemp("pdp"), size=48, subjects=8, slices=2, names=("site-a",))[0]
    _, datasets = load_site(str(path))
    return datasets["train"]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return prepared_for_opacus(build_model("unet", **MODEL_ARGS))


def test_groups_are_whole_subjects(train_set) -> None:  # type: ignore[no-untyped-def]
    groups = subject_groups(train_set)
    assert len(groups) >= 3 and sorted(i for g in groups for i in g) == list(range(len(train_set)))
    for g in groups:
        assert len({train_set[i]["subject"] for i in g}) == 1
    assert len({train_set[g[0]]["subject"] for g in groups}) == len(groups)


def test_a_subjects_gradient_is_the_sum_of_its_slices_gradients(train_set) -> None:  # type: ignore[no-untyped-def]
    """Against an independent computation: one plain backward pass per slice, no Opacus."""
    groups = subject_groups(train_set)
    net = model()
    reference = copy.deepcopy(net)
    criterion = ReconLoss("l1")
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    got, _ = subject_gradients(gsm, train_set, groups[:2], criterion, chunk=3)
    gsm._close()
    for g, members in enumerate(groups[:2]):
        reference.zero_grad()
        for i in members:
            batch = torch.utils.data.default_collate([train_set[i]])
            criterion(predict(reference, batch), batch["target"], batch["max_value"]).backward()
        for mine, p in zip(got[g], (p for p in reference.parameters() if p.requires_grad)):
            torch.testing.assert_close(mine, p.grad, rtol=1e-4, atol=1e-6)


def test_one_subject_changes_a_step_by_at_most_c(train_set) -> None:  # type: ignore[no-untyped-def]
    """The DP sensitivity: the noiseless step sum with and without any one patient differs by ≤ C."""
    groups = subject_groups(train_set)
    gsm = GradSampleModule(model(), batch_first=True, loss_reduction="sum")
    grads, _ = subject_gradients(gsm, train_set, groups, ReconLoss("l1"), chunk=4)
    gsm._close()
    unclipped = [n for n in clip_subjects(grads, 1e9)[1]]
    c = 0.5 * min(unclipped)  # every subject is clipped: the bound is tight, not vacuous
    full, norms = clip_subjects(grads, c)
    assert min(norms) > c
    for s in range(len(groups)):
        without, _ = clip_subjects(grads[:s] + grads[s + 1 :], c)
        diff = torch.sqrt(sum(torch.sum((a.double() - b.double()) ** 2) for a, b in zip(full, without)))
        assert float(diff) <= c * (1 + 1e-5)
        assert float(diff) >= c * (1 - 1e-4)  # clipped to exactly C


def test_patient_epsilon_matches_opacus_and_an_independent_accountant(train_set) -> None:  # type: ignore[no-untyped-def]
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    steps, sigma, delta = 3, 1.1, 1e-5
    result, rate = train_patient_private(
        net, train_set, noise_multiplier=sigma, max_grad_norm=1.0, subjects_per_step=2, steps=steps, chunk=4
    )
    assert rate == pytest.approx(2 / len(subject_groups(train_set)))
    assert result.steps == steps and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    ours = PrivacyLedger().with_round(sigma, rate, steps).epsilon(delta)
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    for _ in range(steps):
        opacus.step(noise_multiplier=sigma, sample_rate=rate)
    assert ours == pytest.approx(opacus.get_epsilon(delta), rel=1e-9)
    google = dp_accounting.rdp.RdpAccountant()
    google.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert ours == pytest.approx(google.get_epsilon(delta), rel=0.05)


def test_the_site_reports_epsilon_per_patient(train_set) -> None:  # type: ignore[no-untyped-def]
    """The ClientApp's DP path with ``dp-unit = subject``: q = batch-size / patients, ε per patient."""
    from client.privacy import train_with_budget
    from common.data.loaders import make_loader
    from common.runconfig import RunConfig

    run = RunConfig.from_flat(
        {
            "model": "unet",
            "model-args": '{"chans": 4, "num_pool_layers": 2}',
            "local-steps": 2,
            "batch-size": 2,
            "dp-noise-multiplier": 1.0,
            "dp-delta": 1e-5,
        }
    )
    assert run.dp_unit == "subject"  # the default privacy unit is the patient
    loader = make_loader(train_set, run.batch_size, shuffle=True, seed=0)
    result, ledger, metrics = train_with_budget(run, model(), loader, 0.0, PrivacyLedger())
    patients = len(subject_groups(train_set))
    assert result is not None and result.steps == 2 and metrics["dp-subject-level"] == 1.0
    assert ledger.history == [(1.0, 2 / patients, 2)]
    assert metrics["dp-epsilon"] == pytest.approx(PrivacyLedger([(1.0, 2 / patients, 2)]).epsilon(1e-5))
    # per patient is weaker than per slice at the same σ and steps: fewer units, a larger sampling rate
    assert metrics["dp-epsilon"] > PrivacyLedger([(1.0, 2 / len(train_set), 2)]).epsilon(1e-5)
