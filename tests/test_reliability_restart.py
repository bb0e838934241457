"""The server dies mid-run, for real, and nothing it wrote is lost or torn.

The deployment test SIGKILLs the SuperLink together with its SuperExec and ServerApp in the middle
of round 2, after round 1's checkpoint and round 2's training records are on disk, then restarts
the SuperLink on the same database and submits the same run again (``resume = true``). The
simulation test SIGKILLs ``fedsense simulate`` and checks that nothing it started lives on to keep
writing. The two writer tests SIGKILL a process in the middle of writing a checkpoint and in the
middle of appending to ``metrics.jsonl``, the two files a crash could tear.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.runconfig import RunConfig
from deployment import (
    Deployment,
    alive,
    kill_survivors,
    process_tree,
    tiny_run,
    wait_for,
)
from server.simulate import simulate
from server.store import GLOBAL_SITE, RUNTIME_KEYS, RunDir

ROOT = Path(__file__).resolve().parent.parent


def kill_when(process: subprocess.Popen[bytes], ready: Callable[[], object], what: str) -> None:
    """SIGKILL ``process`` the moment ``ready()`` holds (polled every millisecond)."""
    try:
        wait_for(ready, 120, what, interval=0.001)
    finally:
        process.kill()
        process.wait(timeout=30)


def writer(script: str, *args: str) -> subprocess.Popen[bytes]:
    """A separate Python process running ``script``: the process the test kills."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT)


def test_a_checkpoint_write_killed_halfway_leaves_only_whole_checkpoints(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    # 64 MiB per checkpoint, so that each write lasts long enough to be caught in the middle.
    process = writer(
        """
        import sys, torch
        from server.store import RunDir
        store, state = RunDir(sys.argv[1]), {"w": torch.ones(16, 1024, 1024)}
        for rnd in range(1, 1000):
            store.save_checkpoint(rnd, {"w": state["w"] * rnd}, {"rounds": 1000})
    """,
        str(store.path),
    )

    def temps() -> list[Path]:
        return [p for p in store.checkpoint_dir.glob(".round-*.pt.tmp") if p.name != ".round-0001.pt.tmp"]

    kill_when(process, temps, "the writer to be in the middle of its second or later checkpoint")
    torn = temps()
    assert len(torn) == 1, "the kill did not land during a write"
    torn_round = int(torn[0].name[len(".round-") :].split(".")[0])
    whole = sorted(store.checkpoint_dir.glob("round-*.pt"))
    assert [p.name for p in whole] == [f"round-{r:04d}.pt" for r in range(1, torn_round)]
    for path in whole:  # every checkpoint under its final name is complete
        payload = torch.load(path, weights_only=True)
        assert torch.equal(payload["state_dict"]["w"], torch.full((16, 1024, 1024), float(payload["round"])))
    assert store.latest_checkpoint()[0] == torn_round - 1  # the torn temp file is never taken for data

    # The restarted server writes that round again; the leftover is replaced, not appended to.
    store.save_checkpoint(torn_round, {"w": torch.zeros(2)}, {})
    assert store.latest_checkpoint()[0] == torn_round and not torn[0].exists()


def test_a_metrics_append_killed_halfway_loses_no_complete_record(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    # Batches of 2000 records (about 250 kB each), one append per round, as the ServerApp does.
    process = writer(
        """
        import sys
        from server.store import RunDir
        store = RunDir(sys.argv[1])
        for rnd in range(1, 100000):
            store.append_metrics([
                {"run": "crash", "round": rnd, "phase": "train", "site": f"site-{i:04d}", "time": 1.0,
                 "num_examples": 1, "metrics": {"loss": 0.25, "psnr": 30.0, "ssim": 0.9}}
                for i in range(2000)
            ])
    """,
        str(store.path),
    )
    kill_when(
        process,
        lambda: store.metrics_path.exists() and store.metrics_path.stat().st_size > 2_000_000,
        "the writer to have appended a few rounds",
    )

    records = store.read_metrics()  # tolerates a torn last line, and nothing else
    per_round = Counter(r["round"] for r in records)
    last = max(per_round)
    assert all(per_round[rnd] == 2000 for rnd in range(1, last)), "a record of a finished append is missing"
    assert per_round[last] <= 2000

    # The restarted server appends: a torn tail is cut first, so every line of the file parses.
    store.append_metrics(
        [
            {
                "run": "crash",
                "round": last,
                "phase": "train",
                "site": GLOBAL_SITE,
                "time": 2.0,
                "num_examples": 2000,
                "metrics": {"loss": 0.25},
            }
        ]
    )
    raw = store.metrics_path.read_bytes()
    assert raw.endswith(b"\n")
    assert [json.loads(line)["round"] for line in raw.splitlines()] == [r["round"] for r in store.read_metrics()]
    assert store.read_metrics()[-1]["site"] == GLOBAL_SITE


@pytest.mark.slow
def test_a_server_killed_mid_round_resumes_from_its_last_checkpoint(small_sites: list[Path], tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    config = tiny_run(
        store.path,
        rounds=2,
        resume=True,
        **{
            "fraction-evaluate": 1.0,
            "min-train-nodes": 2,
            "min-evaluate-nodes": 2,
            "min-available-nodes": 2,
            "round-timeout": 150.0,
        },
    )
    sites = {"site-a", "site-b", GLOBAL_SITE}

    def round_2_trained() -> bool:
        return any((r["round"], r["phase"], r["site"]) == (2, "train", GLOBAL_SITE) for r in store.read_metrics())

    with Deployment(tmp_path / "deployment") as deployment:
        for path in small_sites[:2]:
            deployment.start_supernode(path.stem, path)
        first = deployment.submit(config)
        # Round 2 is in flight: its training is recorded, its evaluation and checkpoint are not.
        wait_for(round_2_trained, 400, "round 2's training records", interval=0.2)
        deployment.kill_superlink()
        crashed_at = time.time()
        assert not store.checkpoint_path(2).exists(), "the kill came after round 2 was complete"
        assert store.latest_checkpoint()[0] == 1
        assert store.read_config()["status"] == "running"  # nobody was left to record the crash

        deployment.start_superlink()  # same port and state database; the SuperNodes reconnect
        second = deployment.submit(config)
        status = deployment.wait_finished(second, 400)
    assert second != first and status == "finished:completed"
    assert store.read_config()["status"] == "finished"

    # Raw file: rounds before the resume point once (round 0 and round 1 were not redone), the
    # round in flight twice (its training records were written before the crash: documented,
    # readers dedupe keep-last), the rest once.
    raw = Counter((r["round"], r["phase"], r["site"]) for r in store.read_metrics())
    times = {(0, "evaluate"): 1, (1, "train"): 1, (1, "evaluate"): 1, (2, "train"): 2, (2, "evaluate"): 1}
    assert raw == {(rnd, phase, site): n for (rnd, phase), n in times.items() for site in sites}
    deduped = store.read_metrics(dedupe=True)
    assert Counter((r["round"], r["phase"], r["site"]) for r in deduped) == {key: 1 for key in raw}
    assert all(r["time"] > crashed_at for r in deduped if r["round"] == 2)  # the redone round's values win

    # No torn file anywhere: every metrics line parses, every checkpoint loads.
    lines = store.metrics_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert sorted(p.name for p in store.checkpoint_dir.iterdir()) == ["round-0001.pt", "round-0002.pt"]
    for rnd in (1, 2):
        assert torch.load(store.checkpoint_path(rnd), weights_only=True)["round"] == rnd


@pytest.mark.slow
def test_a_killed_fedsense_simulate_leaves_nothing_running_and_resumes(small_sites: list[Path], tmp_path: Path) -> None:
    """SIGKILL of ``fedsense simulate`` must take its SuperLink (a session of its own) and the simulation along.

    Otherwise the orphaned simulation keeps appending to the run directory, and the restarted
    run becomes a second writer of the same metrics and checkpoints.
    """
    store = RunDir(tmp_path / "run")
    command = [
        str(Path(sys.executable).parent / "fedsense"),
        "simulate",
        "--sites",
        *map(str, small_sites[:2]),
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--run-dir",
        str(store.path),
        "--name",
        "reliability",
        "--set",
        'model-args={"chans": 4, "num_pool_layers": 2}',
        "--set",
        "batch-size=1",
        "--set",
        "max-eval-slices=1",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: store.checkpoint_path(1).exists(), 300, "round 1's checkpoint")
    finally:
        tree = process_tree(process.pid)
        os.killpg(process.pid, signal.SIGKILL)  # the CLI's process group; its SuperLink is not in it
        process.wait(timeout=30)
        try:
            wait_for(lambda: not [pid for pid in tree if alive(pid)], 30, "the SuperLink and the simulation to exit")
        finally:
            kill_survivors(tree)  # never leave an orphan behind, even when the test fails
    link = next(cmd for cmd in tree.values() if "flower-superlink" in cmd)
    # The killed CLI could not remove its private FLWR_HOME (a few MB); the test does.
    shutil.rmtree(Path(re.search(r"--database (\S+)/state\.db", link).group(1)))
    written = store.metrics_path.read_bytes()
    time.sleep(3)
    assert store.metrics_path.read_bytes() == written, "something is still writing to the run directory"

    config = {k: v for k, v in store.read_config().items() if k not in RUNTIME_KEYS}
    resumed = simulate(RunConfig.from_flat({**config, "resume": True}), timeout=600)
    phases = [(0, "evaluate"), (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    expected = {(rnd, phase, site) for rnd, phase in phases for site in ("site-a", "site-b", GLOBAL_SITE)}
    assert sorted((r["round"], r["phase"], r["site"]) for r in resumed.read_metrics(dedupe=True)) == sorted(expected)
    assert resumed.read_config()["status"] == "finished" and resumed.latest_checkpoint()[0] == 2
