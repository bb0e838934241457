"""Server-side tracking and monitoring: MLflow, TensorBoard and Prometheus fed from the run directory's writes.

The integration tests run a real 2-round Flower simulation against a real ``mlflow server`` (SQLite
backend, a free localhost port) and read everything back through MLflow's and TensorBoard's own
readers while scraping the ServerApp's ``/metrics``; the other kills the tracking server mid-run, and
the federation must still finish.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.mlflow_screenshot import MlflowServer
from common.errors import ConfigError
from common.runconfig import RunConfig
from server.simulate import free_port, simulate
from server.store import GLOBAL_SITE, RunDir, SiteSamples, global_record, site_record
from server.tracking import base
from server.tracking.base import Background, Observer
from server.tracking.images import sample_panel
from server.tracking.records import record_values
from server.tracking.tracked import TrackedRunDir, tracked_store

MODEL_ARGS = '{"chans": 8, "num_pool_layers": 2}'
ROUNDS = 2


# --- fast unit tests ------------------------------------------------------------------------------


def test_tracking_names_are_validated_with_the_key_named() -> None:
    assert RunConfig.from_flat({"tracking": " tensorboard, mlflow,mlflow"}).trackers == ("tensorboard", "mlflow")
    assert RunConfig.from_flat({}).trackers == ()
    with pytest.raises(ConfigError, match=r"tracking: .*wandb"):
        RunConfig.from_flat({"tracking": "mlflow,wandb"})
    with pytest.raises(ConfigError, match="metrics-port"):
        RunConfig.from_flat({"metrics-port": 70000})


def test_record_values_name_every_scalar_by_site_phase_and_metric() -> None:
    a = site_record("r", 3, "train", "site-a", 10, {"loss": 0.5}, reply_seconds=2.0)
    b = site_record("r", 3, "train", "site b!", 30, {"loss": 0.1})
    g = global_record("r", 3, "train", [a, b], rejected=[{"site": "node-7", "reason": "late"}], seconds=9.0)
    assert record_values(a) == {
        "site-a/train/loss": 0.5,
        "site-a/train/num-examples": 10.0,
        "site-a/train/reply-seconds": 2.0,
    }
    assert record_values(b) == {"site b_/train/loss": 0.1, "site b_/train/num-examples": 30.0}
    assert record_values(g) == {
        "global/train/loss": pytest.approx((10 * 0.5 + 30 * 0.1) / 40),
        "global/train/num-examples": 40.0,
        "global/train/seconds": 9.0,
        "global/train/sites-replied": 2.0,
        "global/train/sites-rejected": 1.0,
    }


def test_sample_panel_puts_zero_filled_recon_and_target_side_by_side_at_the_target_range() -> None:
    rng = np.random.default_rng(0)
    zf, recon, target = (rng.uniform(0, 2, (2, 4, 5)).astype(np.float32) for _ in range(3))
    panel = sample_panel(SiteSamples(zf, recon, target, np.zeros(2), np.zeros(2)))
    assert panel.shape == (8, 15) and panel.dtype == np.uint8
    for i in range(2):
        row = np.hstack([zf[i], recon[i], target[i]]) / target[i].max()
        np.testing.assert_array_equal(panel[4 * i : 4 * i + 4], np.round(np.clip(row, 0, 1) * 255).astype(np.uint8))


class Recorder(Observer):
    """Remembers every hook call; fails the first ``fail`` calls of ``metrics``."""

    name = "recorder"

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail

    def start(self, config: Mapping[str, Any], resume: bool) -> None:
        self.calls.append(("start", resume))

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.calls.append(("metrics", [(r["round"], r["site"]) for r in records]))
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("tracking server down")

    def checkpoint(self, rnd: int) -> None:
        self.calls.append(("checkpoint", rnd))

    def best(self, best: Mapping[str, Any]) -> None:
        self.calls.append(("best", best["round"]))

    def finish(self, status: str, detail: Mapping[str, Any]) -> None:
        self.calls.append(("finish", status))

    def close(self) -> None:
        self.calls.append(("close", None))


def _one_round(store: RunDir) -> None:
    store.init({"name": "r"}, resume=False)
    records = [site_record("r", 1, "evaluate", "site-a", 4, {"psnr": 20.0})]
    store.append_metrics(records + [global_record("r", 1, "evaluate", records)])
    store.save_checkpoint(1, {}, {})
    store.write_best(1, "psnr", 20.0)
    store.set_status("finished")


def test_tracked_run_dir_tells_observers_every_write_and_a_broken_one_harms_nothing(tmp_path: Path) -> None:
    class Broken(Observer):
        name = "broken"

        def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
            raise RuntimeError("bug in a tracker")

    recorder = Recorder()
    store = TrackedRunDir(tmp_path / "run", [Broken(), recorder])
    _one_round(store)
    assert recorder.calls == [
        ("start", False),
        ("metrics", [(1, "site-a"), (1, GLOBAL_SITE)]),
        ("checkpoint", 1),
        ("best", 1),
        ("finish", "finished"),
        ("close", None),
    ]
    assert [r["site"] for r in store.read_metrics()] == ["site-a", GLOBAL_SITE]  # the file write is unaffected
    assert store.observers == []  # closed with the run


def test_background_retries_a_failing_call_then_gives_up_and_keeps_going(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "BACKOFF", (0.0,))
    flaky = Recorder(fail=2)  # succeeds on the third attempt
    worker = Background(flaky)
    worker.metrics([{"round": 1, "site": "a"}])
    worker.close(timeout=10)
    assert [c[0] for c in flaky.calls] == ["metrics"] * 3 + ["close"] and worker.failed == 0

    dead = Recorder(fail=10**6)
    worker = Background(dead)
    for rnd in (1, 2, 3):
        worker.metrics([{"round": rnd, "site": "a"}])
    worker.close(timeout=10)
    # Three attempts for the first call; once the tracker is down, one for each later call.
    assert [c[1][0][0] for c in dead.calls if c[0] == "metrics"] == [1, 1, 1, 2, 3]
    assert worker.failed == 3 and dead.calls[-1] == ("close", None)


def test_without_tracking_the_store_is_a_plain_run_dir(tmp_path: Path) -> None:
    store = tracked_store(RunConfig.from_flat({"run-dir": str(tmp_path / "run")}))
    assert type(store) is RunDir


def test_a_resumed_run_continues_its_mlflow_run_in_the_local_sqlite_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from server.tracking.mlflow import MlflowTracker, default_uri

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    config = {"name": "resumable", "sites": ""}
    first = MlflowTracker(tmp_path, "", "resumable")
    first.start(config, resume=False)
    first.finish("failed", {"error": "killed"})
    again = MlflowTracker(tmp_path, "", "resumable")
    again.start(config, resume=True)
    fresh = MlflowTracker(tmp_path, "", "resumable")
    fresh.start(config, resume=False)
    assert again.run_id == first.run_id != fresh.run_id
    client = MlflowClient(default_uri(tmp_path))
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert client.get_run(first.run_id).data.params["name"] == "resumable"
    assert (tmp_path / "mlflow.db").is_file()


def test_server_metrics_follow_the_run_directory(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.tracking.prometheus import ServerMetrics

    metrics = ServerMetrics()
    store = TrackedRunDir(tmp_path / "run", [metrics])
    store.init({"name": "r"}, resume=False)
    a = site_record("r", 1, "evaluate", "site-a", 4, {"psnr": 20.0, "dp-epsilon": 3.5})
    b = site_record("r", 1, "evaluate", "site-b", 12, {"psnr": 24.0, "dp-epsilon": 2.0})
    store.append_metrics(
        [a, b, global_record("r", 1, "evaluate", [a, b], seconds=7.0, rejected=[{"site": "node-3", "reason": "late"}])]
    )
    store.save_checkpoint(1, {}, {})

    def value(name: str, **labels: str) -> float:
        text = generate_latest(metrics.registry).decode()
        return next(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("fedsense_rounds_finished_total") == 1.0
    assert value("fedsense_global_psnr_db") == pytest.approx((4 * 20.0 + 12 * 24.0) / 16)
    assert value("fedsense_dp_epsilon") == 3.5
    assert value("fedsense_sites_replied", phase="evaluate") == 2.0
    assert value("fedsense_sites_failed", phase="evaluate") == 1.0
    assert value("fedsense_phase_duration_seconds_sum", phase="evaluate") == 7.0
    assert value("fedsense_round_duration_seconds_count") == 1.0
    store.set_status("failed", error="x")
    assert value("fedsense_phase", fedsense_phase="failed") == 1.0


def test_dashboard_metrics_describe_the_run_directory_before_during_and_after_a_run(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from server.viewer.dashboard import start

    def scraped(url: str) -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(url + "metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        return {
            (s.name, s.labels.get("status", "")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    store = RunDir(tmp_path / "run")
    server = start(store.path)
    try:
        before = scraped(server.url)  # the dashboard may start before the run does
        assert before[("fedsense_run_rounds_completed", "")] == 0.0
        assert before[("fedsense_run_status", "running")] == 0.0
        _one_round(store)
        records = [site_record("r", 2, "evaluate", "site-a", 4, {"psnr": 21.5, "ssim": 0.7})]
        store.append_metrics(records + [global_record("r", 2, "evaluate", records)])
        after = scraped(server.url)
    finally:
        server.stop()
    assert after[("fedsense_run_rounds_completed", "")] == 2.0
    assert after[("fedsense_run_global_psnr_db", "")] == 21.5 and after[("fedsense_run_global_ssim", "")] == 0.7
    assert after[("fedsense_run_status", "finished")] == 1.0 and after[("fedsense_run_status", "running")] == 0.0
    assert after[("fedsense_run_best_round", "")] == 1.0
    assert after[("fedsense_run_last_record_timestamp_seconds", "")] == pytest.approx(
        max(r["time"] for r in store.read_metrics())
    )


def test_dashboard_metrics_port_serves_the_gauges_without_the_token_and_nothing_else(tmp_path: Path) -> None:
    import subprocess
    import sys
    import urllib.error

    from deployment import wait_for

    store, token_file = RunDir(tmp_path / "run"), tmp_path / "state" / "dashboard.token"
    _one_round(store)
    port, metrics_port = free_port(), free_port()
    dashboard = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "dashboard",
            str(store.path),
            "--port",
            str(port),
            "--token-file",
            str(token_file),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: scrape(f"http://127.0.0.1:{metrics_port}/metrics", "fedsense_run_rounds_completed"),
            60,
            "the dashboard's metrics port",
        )
        # The tokenless listener answers the gauges whatever the path: no page, no samples, no JSON.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/api/samples/latest.png", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            assert b"fedsense_run_rounds_completed" in response.read()
        with pytest.raises(urllib.error.HTTPError) as refused:  # the dashboard itself still wants its token
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert refused.value.code == 401
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert scrape(f"http://127.0.0.1:{metrics_port}/metrics", "fedsense_run_rounds_completed") is None  # closed too


# --- integration: a real mlflow server and a real Flower simulation ---------------------------------


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "mlflow")
    yield server
    server.kill()


def run_config(sites: list[Path], run_dir: Path, uri: str, name: str, **extra: Any) -> RunConfig:
    return RunConfig.from_flat(
        {
            "name": name,
            "num-server-rounds": ROUNDS,
            "strategy": "fedavg",
            "model": "unet",
            "model-args": MODEL_ARGS,
            "local-steps": 2,
            "batch-size": 2,
            "min-train-nodes": len(sites),
            "min-evaluate-nodes": len(sites),
            "min-available-nodes": len(sites),
            "sites": ",".join(map(str, sites)),
            "run-dir": str(run_dir),
            "num-samples": 1,
            "resume": False,
            "tracking": "mlflow,tensorboard",
            "tracking-uri": uri,
            **extra,
        }
    )


class Federating(threading.Thread):
    """``simulate(run)`` in a thread, so a test can watch the run (or kill its tracker) meanwhile."""

    def __init__(self, run: RunConfig) -> None:
        super().__init__(daemon=True)
        self.run_config, self.store, self.error = run, None, None

    def run(self) -> None:
        try:
            self.store = simulate(self.run_config, timeout=600)
        except BaseException as exc:  # reported by the test's thread
            self.error = exc

    def finished(self) -> RunDir:
        self.join(timeout=580)
        assert not self.is_alive(), "the federation did not finish"
        assert self.error is None, self.error
        return self.store


def scrape(url: str, sample: str) -> float | None:
    """The value of ``sample`` on a Prometheus text endpoint; ``None`` while nothing answers."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return next(
        (s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == sample), None
    )


def assert_complete(store: RunDir) -> None:
    """The federation itself finished every round, whatever happened to the tracker."""
    assert store.read_config()["status"] == "finished"
    evaluated = {r["round"] for r in store.read_metrics() if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"}
    assert evaluated == set(range(ROUNDS + 1))
    assert store.latest_checkpoint()[0] == ROUNDS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulation_logs_params_per_site_history_and_model_to_mlflow_and_tensorboard(
    small_sites: list[Path], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sites, port = small_sites[:2], free_port()
    federation = Federating(run_config(sites, tmp_path / "fed", mlflow_server.uri, "tracked", **{"metrics-port": port}))
    federation.start()
    seen: list[float] = []  # fedsense_rounds_finished_total as the ServerApp's /metrics says, in time order
    sent = 0.0  # array bytes the ServerApp's grid sent to the sites
    while federation.is_alive():
        value = scrape(f"http://127.0.0.1:{port}/metrics", "fedsense_rounds_finished_total")
        if value is not None and (not seen or value != seen[-1]):
            seen.append(value)
        sent = scrape(f"http://127.0.0.1:{port}/metrics", "fedsense_message_bytes_total") or sent
        time.sleep(0.3)
    store = federation.finished()
    assert_complete(store)
    assert seen == sorted(seen) and {0.0, 1.0} <= set(seen), seen  # the round counter advanced during the run
    assert sent > 0

    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("fedsense").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    config = store.read_config()
    assert run.data.params["num-server-rounds"] == str(ROUNDS) == str(config["num-server-rounds"])
    assert run.data.params["strategy"] == "fedavg" and run.data.params["model-args"] == MODEL_ARGS
    assert run.data.tags["fedsense.sites"] == "site-a,site-b"
    assert run.data.tags["site.site-b.dataset"] == "brats" and run.data.tags["site.site-a.coils"] == "16"
    records = store.read_metrics(dedupe=True)
    for site in ("site-a", "site-b", GLOBAL_SITE):
        for phase, rounds in (("train", range(1, ROUNDS + 1)), ("evaluate", range(ROUNDS + 1))):
            metric = "loss" if phase == "train" else "psnr"
            key = f"{'global' if site == GLOBAL_SITE else site}/{phase}/{metric}"
            history = client.get_metric_history(run.info.run_id, key)
            expected = {r["round"]: r["metrics"][metric] for r in records if r["site"] == site and r["phase"] == phase}
            assert sorted(m.step for m in history) == list(rounds), key  # one value per round
            assert {m.step: m.value for m in history} == pytest.approx(expected), key
    assert client.get_metric_history(run.info.run_id, "global/train/seconds")[0].value > 0
    best = store.best()
    assert run.data.tags["fedsense.best_round"] == str(best["round"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/model.safetensors",
        "model/model-card.json",
    }
    [version] = client.search_model_versions("name='fedsense-tracked'")
    assert version.run_id == run.info.run_id and version.tags["round"] == str(best["round"])
    pngs = client.list_artifacts(run.info.run_id, f"samples/round-{ROUNDS:04d}")
    assert {Path(a.path).name for a in pngs} == {"site-a.png", "site-b.png"}

    events = EventAccumulator(str(store.path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key, rounds in (
        ("site-a/train/loss", range(1, ROUNDS + 1)),
        ("site-b/evaluate/psnr", range(ROUNDS + 1)),
        ("global/evaluate/psnr", range(ROUNDS + 1)),
    ):
        assert [e.step for e in events.Scalars(key)] == list(rounds), key
    assert events.Scalars("global/evaluate/psnr")[-1].value == pytest.approx(
        [r for r in records if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"][-1]["metrics"]["psnr"]
    )
    assert ROUNDS in [e.step for e in events.Images("samples/site-a")]
    assert "run-config/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_federation_finishes_when_the_tracking_server_dies_mid_run(
    small_sites: list[Path], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    federation = Federating(run_config(small_sites[:2], tmp_path / "fed", mlflow_server.uri, "orphaned"))
    federation.start()
    client = MlflowClient(mlflow_server.uri)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and federation.is_alive():
        experiment = client.get_experiment_by_name("fedsense")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and "global/evaluate/psnr" in runs[0].data.metrics:  # round 0 is logged: the run is under way
            break
        time.sleep(0.5)
    else:
        pytest.fail("the run's round-0 evaluation never reached the tracking server")
    mlflow_server.kill()
    store = federation.finished()
    assert_complete(store)
    events = EventAccumulator(str(store.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # the other tracker went on regardless
    assert [e.step for e in events.Scalars("global/evaluate/psnr")] == list(range(ROUNDS + 1))
