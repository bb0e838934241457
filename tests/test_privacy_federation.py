"""A real Flower run with DP-SGD at the sites and client-level DP at the server, ε recorded every round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dp_accounting import dp_event, rdp

from common.dp import PrivacyLedger
from server.simulate import simulate
from server.store import GLOBAL_SITE
from tests.test_federation import small_run

pytestmark = pytest.mark.slow


def test_dp_run_records_site_and_client_level_epsilon_per_round(small_sites: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "dp"
    audit = tmp_path / "egress.jsonl"
    sites = small_sites[:2]
    run = small_run(
        sites,
        run_dir,
        rounds=2,
        **{
            "name": "dp-it",
            "local-steps": 2,
            "max-eval-slices": 4,
            "dp-noise-multiplier": 1.0,
            "dp-max-grad-norm": 1.0,
            "dp-delta": 1e-5,
            "dp-unit": "sample",
            "dp-client-level": "server-fixed",
            "dp-client-noise": 0.5,
            "dp-client-clip": 5.0,
        },
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSENSE_AUDIT_LOG", str(audit))
    try:
        store = simulate(run, timeout=900)
    finally:
        mp.undo()
    records = store.read_metrics()
    train = [r for r in records if r["phase"] == "train"]
    for site in ("site-a", "site-b"):
        eps = {r["round"]: r for r in train if r["site"] == site}
        assert set(eps) == {1, 2}
        n = eps[1]["num_examples"]
        for rnd in (1, 2):  # site-level ε = Opacus RDP of rnd rounds x 2 steps at q = batch / n
            expected = PrivacyLedger([(1.0, 2 / n, 2)] * rnd).epsilon(1e-5)
            assert eps[rnd]["metrics"]["dp-epsilon"] == pytest.approx(expected, rel=1e-6)
        assert eps[1]["metrics"]["dp-epsilon"] < eps[2]["metrics"]["dp-epsilon"]
        # the ledger stays at the site, next to its config, and holds exactly the rounds reported
        ledger = PrivacyLedger.load(small_sites[0].parent / ".dp-ledger" / f"dp-it--{site}.json")
        assert ledger.history == [(1.0, 2 / n, 2)] * 2
    glob = {r["round"]: r["metrics"] for r in train if r["site"] == GLOBAL_SITE}
    for rnd in (1, 2):  # client-level ε = Google dp-accounting RDP of rnd Gaussian releases (no amplification)
        acc = rdp.RdpAccountant()
        acc.compose(dp_event.GaussianDpEvent(0.5), rnd)
        assert glob[rnd]["dp-client-epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert glob[1]["dp-client-epsilon"] < glob[2]["dp-client-epsilon"]
    # what left the sites: weights and scalars only; the ledger never did
    for entry in (json.loads(line) for line in audit.read_text().splitlines()):
        assert set(entry["configs"]) <= {"site"}
        assert all(isinstance(v, (int, float)) for rec in entry["metrics"].values() for v in rec.values())
    assert store.read_config()["status"] == "finished"
