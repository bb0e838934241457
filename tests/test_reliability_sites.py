"""A site dies in the middle of a round, for real: SIGKILL one SuperNode of a local deployment.

Three SuperNodes serve the three small demo sites; the run is submitted with ``flwr run``. When
site-c is executing its round-1 task, its SuperNode, SuperExec and ClientApp are SIGKILLed
together, as if the machine lost power. The SuperLink notices the missing heartbeats (Flower
marks a node offline after 2 x its 30 s heartbeat interval) and answers for it with an error
reply, or the round times out; either way the round record names the dead node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from deployment import Deployment, alive, tiny_run, wait_for
from server.store import GLOBAL_SITE, RunDir

pytestmark = pytest.mark.slow


def train_summary(store: RunDir, rnd: int) -> dict[str, Any]:
    return next(r for r in store.read_metrics() if (r["round"], r["phase"], r["site"]) == (rnd, "train", GLOBAL_SITE))


def kill_site_mid_task(deployment: Deployment, store: RunDir, name: str) -> int:
    """SIGKILL ``name``'s SuperNode while it executes its first (round-1 training) task; returns its node id."""
    wait_for(lambda: deployment.clientapp_running(name), 180, f"{name} to start its round-1 task", interval=0.1)
    node = deployment.node_id(name)
    deployment.kill_supernode(name)
    assert not any(r["round"] == 1 for r in store.read_metrics()), "round 1 ended before the kill"
    return node


def test_a_killed_site_is_left_out_of_its_round_and_rejoins_after_a_restart(
    small_sites: list[Path], tmp_path: Path
) -> None:
    store = RunDir(tmp_path / "run")
    config = tiny_run(store.path, rounds=2, **{"min-train-nodes": 2, "min-available-nodes": 2, "round-timeout": 150.0})
    with Deployment(tmp_path / "deployment") as deployment:
        for path in small_sites:
            deployment.start_supernode(path.stem, path)
        run_id = deployment.submit(config)
        dead = kill_site_mid_task(deployment, store, "site-c")
        deployment.start_supernode("site-c")
        status = deployment.wait_finished(run_id, 400)
    assert status == "finished:completed"
    assert deployment.killed and not [pid for pid in deployment.killed if alive(pid)], "processes left behind"

    first, second = train_summary(store, 1), train_summary(store, 2)
    assert first["sites"] == ["site-a", "site-b"]
    assert [r["site"] for r in first["rejected"]] == [f"node-{dead}"]
    assert re.search(r"Node Unavailable|no reply within round-timeout", first["rejected"][0]["reason"])
    assert second["sites"] == ["site-a", "site-b", "site-c"] and second["rejected"] == []
    assert {r["site"] for r in store.read_metrics() if r["round"] == 1} == {"site-a", "site-b", GLOBAL_SITE}
    assert store.read_config()["status"] == "finished" and store.latest_checkpoint()[0] == 2


def test_a_killed_site_fails_the_run_clearly_when_every_site_is_required(
    small_sites: list[Path], tmp_path: Path
) -> None:
    store = RunDir(tmp_path / "run")
    config = tiny_run(store.path, rounds=2, **{"min-train-nodes": 3, "min-available-nodes": 3, "round-timeout": 30.0})
    with Deployment(tmp_path / "deployment") as deployment:
        for path in small_sites:
            deployment.start_supernode(path.stem, path)
        run_id = deployment.submit(config)
        dead = kill_site_mid_task(deployment, store, "site-c")
        status = deployment.wait_finished(run_id, 240)
    assert status == "finished:failed"
    config_json = store.read_config()
    assert config_json["status"] == "failed"
    error = config_json["status_detail"]["error"]
    assert re.match(r"round 1: [0-2] valid updates, 3 needed \(", error), error
    assert f"node-{dead}: " in error
    assert store.read_metrics() == [] and store.latest_checkpoint() is None  # nothing half-done was recorded
