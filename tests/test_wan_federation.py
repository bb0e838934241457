"""A federation over emulated WAN links: every site behind its own ``vpn`` link proxy, one site partitioned.

Real processes (tests/deployment.py): a SuperLink and three SuperNodes on loopback, each SuperNode
dialling the SuperLink through a :class:`deploy.wan.proxy.ProxyThread` with the ``vpn`` preset (50 ms
± 10 ms, 20 Mbit/s). Mid-run, site-c's link is cut for 20 s. The run must finish, and the server's
ledger (received.jsonl) must show each accepted update exactly once, never one from another round.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from deploy.wan.proxy import ProxyThread, profile
from deployment import Deployment, tiny_run, wait_for
from server.receipts import RECEIVED_FILE, read_receipts
from server.store import GLOBAL_SITE, RunDir

pytestmark = pytest.mark.slow


def test_a_run_over_vpn_links_with_a_20_s_partition_finishes_with_each_update_accepted_once(
    small_sites: list[Path], tmp_path: Path
) -> None:
    store = RunDir(tmp_path / "run")
    rounds = 2
    config = tiny_run(
        store.path, rounds=rounds, **{"min-train-nodes": 2, "min-available-nodes": 2, "round-timeout": 60.0}
    )
    link = profile("vpn")
    with Deployment(tmp_path / "deployment") as deployment:
        proxies = {
            p.stem: ProxyThread(("127.0.0.1", deployment.port), link, seed=i).__enter__()
            for i, p in enumerate(small_sites)
        }
        try:
            for path in small_sites:
                deployment.start_supernode(path.stem, path, superlink=proxies[path.stem].address)
            run_id = deployment.submit(config)
            wait_for(lambda: any(r["round"] == 1 for r in store.read_metrics()), 300, "round 1 to finish")
            proxies["site-c"].partition(20.0, "refuse")
            status = deployment.wait_finished(run_id, 400)
        finally:
            for proxy in proxies.values():
                proxy.__exit__()
    assert status == "finished:completed", (deployment.logs / "superlink.log").read_text()[-3000:]
    assert proxies["site-c"].counters.refused + proxies["site-c"].counters.resets >= 1
    assert all(p.counters.bytes_up > 0 and p.counters.bytes_down > 0 for p in proxies.values())

    lines = read_receipts(store.path / RECEIVED_FILE)
    accepted = [line for line in lines if line["accepted"] and line["phase"] == "train"]
    # Exactly once: no message id twice, no site twice in a round, and every reply answers its own round's message.
    assert len({line["message_id"] for line in accepted}) == len(accepted)
    per_round = Counter((line["round"], line["site"]) for line in accepted)
    assert max(per_round.values()) == 1
    assert {rnd for rnd, _ in per_round} == set(range(1, rounds + 1))
    summaries = {r["round"]: r for r in store.read_metrics() if r["phase"] == "train" and r["site"] == GLOBAL_SITE}
    for rnd, summary in summaries.items():
        assert sorted(summary["sites"]) == sorted(site for (r, site) in per_round if r == rnd)
    assert store.latest_checkpoint()[0] == rounds
