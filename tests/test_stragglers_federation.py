"""A real simulation with one slowed site and a round deadline: rounds end without it, it is recorded a straggler.

site-c rehearses a machine :data:`SLOWDOWN` times slower (``[rehearsal] slowdown``). With ``round-deadline``
the other two sites' updates are aggregated at the deadline; site-c is named a straggler of each round it
missed (round 2 does not even ask it: it still trains round 1), and nothing of it is ever aggregated.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.runconfig import RunConfig
from server.receipts import RECEIVED_FILE, read_receipts
from server.simulate import SimResources, simulate
from server.store import GLOBAL_SITE

pytestmark = pytest.mark.slow

SLOWDOWN = 50.0
DEADLINE = 4.0  # s: the fast sites reply well within it; site-c's round takes SLOWDOWN x its steps' time


def test_a_round_deadline_leaves_the_slow_site_behind_and_records_it(small_sites: list[Path], tmp_path: Path) -> None:
    slow = tmp_path / "site-c.toml"
    slow.write_text(
        small_sites[2].read_text(encoding="utf-8") + f"\n[rehearsal]\nslowdown = {SLOWDOWN}\n", encoding="utf-8"
    )
    run = RunConfig.from_flat(
        {
            "name": "stragglers",
            "num-server-rounds": 2,
            "strategy": "fedavg",
            "model-args": '{"chans": 4, "num_pool_layers": 2}',
            "local-steps": 2,
            "batch-size": 1,
            "fraction-evaluate": 0.0,
            "min-train-nodes": 2,
            "min-available-nodes": 3,
            "round-deadline": DEADLINE,
            "round-timeout": 120.0,
            "sites": ",".join(map(str, [*small_sites[:2], slow])),
            "run-dir": str(tmp_path / "run"),
            "resume": False,
        }
    )
    started = time.monotonic()
    store = simulate(run, timeout=300, resources=SimResources(client_cpus=1))
    elapsed = time.monotonic() - started
    records = store.read_metrics()
    summaries = {r["round"]: r for r in records if r["phase"] == "train" and r["site"] == GLOBAL_SITE}
    site_c = [r for r in records if r["phase"] == "train" and r["site"] == "site-c"]
    print(f"simulate {elapsed:.1f} s; rounds {[round(s['seconds'], 2) for s in summaries.values()]}")
    assert sorted(summaries) == [1, 2]
    for rnd, summary in summaries.items():
        assert summary["sites"] == ["site-a", "site-b"], rnd
        assert summary["metrics"]["stragglers"] == 1.0 and len(summary["stragglers"]) == 1
    # Round 1 holds the simulation's start-up (the fast sites themselves reply after the deadline). In round 2
    # site-c is still training round 1: it is not sent round 2, which takes the fast sites' time only.
    assert summaries[2]["seconds"] < DEADLINE + 2.0
    assert any(
        r["reason"] == "straggler: still training round 1; not sent this phase" for r in summaries[2]["rejected"]
    )
    assert not site_c  # never aggregated
    receipts = read_receipts(store.path / RECEIVED_FILE)
    slow_nodes = {line["node"] for line in receipts if line["phase"] == "train" and line["reason"] == "no reply"}
    assert len(slow_nodes) == 1  # the same straggler in both rounds, and nothing of it ever accepted
    assert not any(line["accepted"] for line in receipts if line["node"] in slow_nodes)
    assert store.latest_checkpoint()[0] == 2
