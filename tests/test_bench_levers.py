"""bench.quality's lever arms and its per-site lever selection (validation picks, test reports), without training."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import quality
from bench.harness import SliceScore


def test_every_fedprox_mu_is_an_arm_and_local_layers_is_fedavg_with_personal_layers() -> None:
    args = quality.parse_args(["--strategies", "fedavg", "fedprox", "scaffold", "local-layers", "--mu", "0.01", "0.1"])
    arms = quality.federated_arms(args.strategies, args.mu)
    assert [a.row for a in arms] == ["FedAvg", "FedProx mu=0.01", "FedProx mu=0.1", "SCAFFOLD", "FedAvg + local layers"]
    assert [a.key for a in arms] == ["fedavg", "fedprox-mu0.01", "fedprox-mu0.1", "scaffold", "local-layers"]
    model, model_args = quality.MODELS["Unrolled-DC"]
    runs = {
        a.key: quality.run_config(args, model, model_args, [Path("a"), Path("b")], Path("/tmp/x") / a.key, 0, a)
        for a in arms
    }
    assert runs["fedprox-mu0.1"].proximal_term_mu == pytest.approx(0.1) and runs["scaffold"].strategy == "scaffold"
    assert runs["local-layers"].strategy == "fedavg"
    assert runs["local-layers"].local_layer_patterns == ("cascades.*.cnn.net.8.*", "cascades.*.dc.*")
    assert runs["fedavg"].local_layer_patterns == () and runs["fedavg"].proximal_term_mu == 0.0


def _scores(label: str, offsets: dict[str, float]) -> dict[int, dict[str, list[SliceScore]]]:
    """Two subjects x two slices per site; test PSNR 30 + the site's offset (+ a little per slice)."""
    return {
        0: {
            site: [
                SliceScore(site, f"{site}-v{v}.h5", i, 30.0 + off + 0.1 * i, 0.9, 0.01)
                for v in range(2)
                for i in range(2)
            ]
            for site, off in offsets.items()
        }
    }


def test_levers_select_on_validation_per_site_and_report_test_gains_with_cis(monkeypatch: pytest.MonkeyPatch) -> None:
    sites = ["site-a", "site-b"]
    monkeypatch.setattr(quality, "SUBJECTS", {f"{s}-v{v}.h5": f"{s}-{v}" for s in sites for v in range(2)})
    val = {
        "Unrolled-DC FedAvg": {"site-a": 31.0, "site-b": 30.0},
        "Unrolled-DC SCAFFOLD": {"site-a": 30.5, "site-b": 32.0},
        # Best on test at both sites, but never best on validation: it must not be selected.
        "Unrolled-DC FedAvg + local layers": {"site-a": 30.9, "site-b": 31.5},
    }
    test = {
        "Unrolled-DC FedAvg": {"site-a": 1.0, "site-b": 0.0},
        "Unrolled-DC SCAFFOLD": {"site-a": 0.0, "site-b": 0.5},
        "Unrolled-DC FedAvg + local layers": {"site-a": 3.0, "site-b": 3.0},
        "Unrolled-DC local": {"site-a": 0.0, "site-b": 0.0},
    }
    methods = [quality.Method(k, {}, federated=True, val_site=v) for k, v in val.items()]
    methods.append(quality.Method("Unrolled-DC local", {}, val_site={"site-a": 40.0, "site-b": 40.0}))
    methods[1].converged = False
    scores = {k: _scores(k, v) for k, v in test.items()}
    rows = quality.levers(4, quality._arms(methods), scores, sites, "Unrolled-DC")
    assert [(r[2], r[3]) for r in rows] == [("site-a", "Unrolled-DC FedAvg"), ("site-b", "Unrolled-DC SCAFFOLD")]
    a, b = rows
    assert a[4] == "31.00" and a[5] == "Unrolled-DC FedAvg + local layers (30.90)"
    assert a[7].startswith("+1.00 [") and a[8] == "-"  # − local; the lever is FedAvg itself
    assert b[7].startswith("+0.50 [") and b[8].startswith("+0.50 [")
    assert a[10] == "yes"
    assert b[10] == "no: Unrolled-DC SCAFFOLD"  # the chosen lever did not converge
