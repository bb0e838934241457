"""A site's own Prometheus ``/metrics``: ClientApp processes record, the ``fedsense client`` process serves their sum.

The unit tests record from real separate processes (as Flower's per-message ClientApps are) and
scrape the real HTTP endpoint; the integration test scrapes two sites (one forking warm ClientApps,
one running Flower's own) and the ServerApp during a real deployment run and sees their counters advance.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.monitoring import (
    DIR_PREFIX,
    MULTIPROC_ENV,
    SiteMetricsServer,
    counting_read_errors,
    serve_site_metrics,
    site_monitor,
)
from common.errors import DataError
from server.store import RunDir

ROOT = Path(__file__).resolve().parents[1]


def scraped(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the site's ``/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def record_in_a_process(env: dict[str, str], code: str) -> None:
    """Run ``code`` (with ``monitor = site_monitor()``) in a fresh Python process, as a ClientApp task runs."""
    script = f"from client.monitoring import site_monitor\nmonitor = site_monitor()\n{code}\n"
    subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True, timeout=60
    )


def test_tasks_in_separate_processes_add_up_on_the_one_endpoint() -> None:
    server = SiteMetricsServer(0)
    try:
        # Round 1 and round 2 of a site: each task a process of its own; 3 then 2 timed steps; one task also
        # meets 2 bad files (skip-bad-files) beyond the one known before it started.
        record_in_a_process(
            server.env, "step = monitor.step_timer()\nfor _ in range(3):\n    step()\nmonitor.trained(1)"
        )
        record_in_a_process(
            server.env,
            "from types import SimpleNamespace as Dataset\n"
            "monitor.watch({'train': Dataset(skipped=['known.h5'])})\n"
            "step = monitor.step_timer()\nfor _ in range(2):\n    step()\n"
            "monitor.trained(2)\n"
            "monitor.finished({'train': Dataset(skipped=['known.h5', 'b.h5', 'c.h5'])})",
        )
        record_in_a_process(server.env, "monitor.trained(3, steps=4)")  # DP-SGD: steps counted, not timed
        values = scraped(server.port)
    finally:
        server.close()
    assert values[("fedsense_site_train_steps_total", ())] == 3 + 2 + 4
    assert values[("fedsense_site_train_step_seconds_count", ())] == 3 + 2
    assert values[("fedsense_site_train_step_seconds_bucket", (("le", "+Inf"),))] == 3 + 2
    assert values[("fedsense_site_last_round_trained", ())] == 3  # the most recent, not the sum
    assert values[("fedsense_site_data_read_errors_total", (("outcome", "skipped"),))] == 2
    assert not os.path.exists(server.directory)  # the ClientApps' files go with the site process


def test_without_a_serving_site_process_nothing_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # simulation, or a bare flower-supernode
    monitor = site_monitor()
    assert monitor.step_timer() is None  # common.training.train then times nothing
    monitor.trained(1)
    monitor.failed_read()


def test_a_read_error_that_ends_a_task_is_counted_and_still_raised() -> None:
    server = SiteMetricsServer(0)
    try:
        record_in_a_process(
            server.env,
            "from client.monitoring import counting_read_errors\n"
            "from common.errors import DataError\n"
            "def fails():\n    raise DataError('x.h5')\n"
            "try:\n    counting_read_errors(fails)()\nexcept DataError:\n    pass\n"
            "else:\n    raise SystemExit(1)\n"
            "counting_read_errors(lambda: None)()",
        )  # a task that ends well counts nothing
        values = scraped(server.port)
    finally:
        server.close()
    assert values[("fedsense_site_data_read_errors_total", (("outcome", "fatal"),))] == 1
    with pytest.raises(DataError, match=r"y.h5"):  # and in this (non-recording) process: raised as it was
        counting_read_errors(lambda: (_ for _ in ()).throw(DataError("y.h5")))()


def test_a_taken_port_leaves_the_site_running_without_metrics() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
        assert serve_site_metrics(taken.getsockname()[1], "127.0.0.1") is None
        leaked = {
            n
            for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before
            if n.startswith("fedsense-site-metrics-")
        }
    assert not leaked


def test_a_start_sweeps_the_files_of_site_processes_killed_before_they_could_remove_them(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = Path(tempfile.gettempdir()) / f"{DIR_PREFIX}{ended.pid}-x"
    alive = Path(tempfile.gettempdir()) / f"{DIR_PREFIX}{os.getpid()}-x"  # this process: still alive
    for directory in (stale, alive):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    try:
        SiteMetricsServer(0).close()
        assert not stale.exists() and alive.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sites_serve_their_steps_during_a_real_deployment_run(small_sites: list[Path], tmp_path: Path) -> None:
    from deployment import Deployment, tiny_run
    from server.simulate import free_port

    rounds = 2
    store = RunDir(tmp_path / "run")
    server_port = free_port()  # the ServerApp's own /metrics (server.tracking.prometheus), in the same run
    config = tiny_run(
        store.path,
        rounds,
        **{"min-available-nodes": 2, "min-train-nodes": 2, "local-steps": 2, "metrics-port": server_port},
    )
    ports = {"site-a": free_port(), "site-b": free_port()}
    counters = {
        "site-a": "fedsense_site_train_steps_total",
        "site-b": "fedsense_site_train_steps_total",
        "server": "fedsense_rounds_finished_total",
    }
    seen: dict[str, list[float]] = {name: [] for name in counters}  # each counter, in time order
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            for name, port in {**ports, "server": server_port}.items():
                try:
                    value = scraped(port).get((counters[name], ()))
                except OSError:
                    continue  # not listening (yet, or any more)
                if value is not None and (not seen[name] or value != seen[name][-1]):
                    seen[name].append(value)

    with Deployment(tmp_path / "deployment") as deployment:
        # site-a forks warm ClientApps, site-b runs Flower's own flwr-clientapp processes: both record.
        # Their metrics directories in the test's own temporary directory: the harness SIGKILLs the sites.
        temp = {name: tmp_path / f"tmp-{name}" for name in ports}
        for directory in temp.values():
            directory.mkdir()
        deployment.start_supernode(
            "site-a",
            small_sites[0],
            warm=True,
            env={"TMPDIR": str(temp["site-a"])},
            args=["--metrics-port", str(ports["site-a"])],
        )
        deployment.start_supernode(
            "site-b",
            small_sites[1],
            warm=True,
            env={"TMPDIR": str(temp["site-b"])},
            args=["--cold-clientapps", "--metrics-port", str(ports["site-b"])],
        )
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            status = deployment.wait_finished(deployment.submit(config), 500)
            final = {name: scraped(port) for name, port in ports.items()}
        finally:
            stop.set()
            watcher.join(timeout=10)
    assert status == "finished:completed"
    assert all(any(directory.glob(f"{DIR_PREFIX}*/counter_*.db")) for directory in temp.values())  # recorded there
    for name, values in final.items():
        assert values[("fedsense_site_train_steps_total", ())] == rounds * 2, name
        assert values[("fedsense_site_train_step_seconds_count", ())] == rounds * 2, name
        assert values[("fedsense_site_last_round_trained", ())] == rounds, name
        # Scraped while the run went on: the counter was seen at intermediate values, only ever growing.
        assert seen[name] == sorted(seen[name]) and len(set(seen[name]) - {0.0, rounds * 2.0}) >= 1, (name, seen)
    # The ServerApp's round counter, scraped in deployment mode too: from 0, advancing (the last round may
    # end as the ServerApp exits, between two scrapes).
    assert seen["server"] == sorted(seen["server"]) and {0.0, 1.0} <= set(seen["server"]), seen
