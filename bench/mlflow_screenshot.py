"""The README's MLflow screenshot: two small federations logged to a real MLflow server, compared in its UI.

    python -m bench.mlflow_screenshot --out docs/mlflow-compare.png

Starts ``mlflow server`` (SQLite backend, a free localhost port), writes demo sites, runs a FedAvg and a
FedProx simulation with ``tracking = mlflow`` against it, opens MLflow's run comparison in headless
Chromium (Debian's ``chromium`` + ``chromium-driver``, selenium offline) and saves the page as a PNG.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common.runconfig import RunConfig
from server.simulate import free_port, simulate

logger = logging.getLogger(__name__)

MLFLOW = str(Path(sys.executable).parent / "mlflow")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class MlflowServer:
    """``mlflow server`` on a free localhost port with a SQLite backend, in a process group of its own."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.log = open(directory / "mlflow-server.log", "wb")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(
            [
                MLFLOW,
                "server",
                "--backend-store-uri",
                f"sqlite:///{directory / 'mlflow.db'}",
                "--artifacts-destination",
                str(directory / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=directory,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {directory / 'mlflow-server.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise RuntimeError("mlflow server did not answer /health within 120 s")

    def kill(self) -> None:
        """SIGKILL the server and its workers (the whole process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()


def _runs(sites: list[Path], work: Path, uri: str, rounds: int) -> None:
    for strategy in ("fedavg", "fedprox"):
        run = RunConfig.from_flat(
            {
                "name": f"demo-{strategy}",
                "num-server-rounds": rounds,
                "strategy": strategy,
                "proximal-mu": 0.01,
                "model": "unet",
                "model-args": '{"chans": 8, "num_pool_layers": 2}',
                "local-steps": 4,
                "batch-size": 2,
                "min-train-nodes": len(sites),
                "min-evaluate-nodes": len(sites),
                "min-available-nodes": len(sites),
                "sites": ",".join(map(str, sites)),
                "run-dir": str(work / strategy),
                "num-samples": 1,
                "resume": False,
                "tracking": "mlflow",
                "tracking-uri": uri,
            }
        )
        simulate(run, timeout=1800)


def _screenshot(uri: str, out: Path, profile: Path) -> None:
    from mlflow.tracking import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fedsense").experiment_id
    ids = [r.info.run_id for r in client.search_runs([experiment])]
    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1600,1300",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        runs = "[" + ",".join(f'"{i}"' for i in ids) + "]"
        driver.get(f'{uri}/#/compare-runs?runs={runs}&experiments=["{experiment}"]')
        time.sleep(15)  # the React app loads, then fetches runs and metric histories
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mlflow_screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import write_small_sites  # the test suite's demo sites: real file formats, 64²

    with tempfile.TemporaryDirectory(prefix="fedsense-mlflow-shot-") as tmp:
        work = Path(tmp)
        sites = write_small_sites(work / "sites", names=("site-a", "site-b"))
        server = MlflowServer(work / "mlflow")
        try:
            _runs(sites, work, server.uri, args.rounds)
            _screenshot(server.uri, args.out, work / "chromium-profile")
        finally:
            server.kill()
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
