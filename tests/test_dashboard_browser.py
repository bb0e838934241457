"""``fedsense dashboard``: HTTP routes, and a real headless Chromium following a live run.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` packages; selenium is
kept offline (``SE_OFFLINE``) so selenium-manager never downloads a driver.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.store import RunDir
from server.viewer.dashboard import DashboardServer, start
from tests.sample_files import write_samples

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SITES = ("site-a", "site-b", "site-c", "__global__")


def round_records(round: int) -> list[dict[str, Any]]:
    """Train and evaluate records of one round with values derived from (round, site)."""
    return [
        {
            "run": "browser-demo",
            "round": round,
            "phase": phase,
            "site": site,
            "time": 1.7e9 + round,
            "num_examples": 6 + i,
            "metrics": (
                {"loss": 0.9 / (round + i)}
                if phase == "train"
                else {
                    "loss": 0.4 / (round + i),
                    "psnr": 24.0 + 1.37 * round + 0.61 * i,
                    "ssim": 0.61 + 0.031 * round + 0.007 * i,
                    "nmse": 0.08 / (round + i),
                }
            ),
        }
        for phase in ("train", "evaluate")
        for i, site in enumerate(SITES)
    ]


def phantom(shift: float) -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    body = ((yy - 32) / 26.0) ** 2 + ((xx - 32 - shift) / 20.0) ** 2 < 1
    organ = ((yy - 26) / 8.0) ** 2 + ((xx - 28 - shift) / 6.0) ** 2 < 1
    return (0.6 * body + 0.4 * organ).astype(np.float32)[None].repeat(2, axis=0)


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.init(
        {"name": "browser-demo", "strategy": "fedprox", "num_rounds": 6, "model": "unet", "proximal-mu": 0.01},
        resume=False,
    )
    for round in (1, 2, 3):
        run.append_metrics(round_records(round))
    noise = np.random.default_rng(1).normal(0, 0.04, (2, 64, 64))
    for shift, site in enumerate(SITES[:-1]):
        target = phantom(shift * 2.0)
        write_samples(run, 3, site, target * 0.7 + noise, target + noise / 4, target, psnr=[30.5, 29.8], ssim=0.91)
    return run


@pytest.fixture
def dashboard(run: RunDir) -> Iterator[DashboardServer]:
    server = start(run.path, port=0)
    yield server
    server.stop()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_json_endpoints_serve_the_run(dashboard: DashboardServer, run: RunDir) -> None:
    status, kind, body = get(dashboard.url + "api/metrics")
    assert status == 200 and kind == "application/json"
    rows = json.loads(body)["rows"]
    assert len(rows) == 3 * 2 * len(SITES)
    config = json.loads(get(dashboard.url + "api/config")[2])
    assert config["status"] == "running" and config["num_rounds"] == 6 and config["config"]["model"] == "unet"
    assert json.loads(get(dashboard.url + "api/samples")[2]) == {"round": 3, "sites": list(SITES[:-1])}
    status, kind, png = get(dashboard.url + "api/samples/latest.png?site=site-b")
    assert status == 200 and kind == "image/png" and png[:4] == b"\x89PNG"
    assert get(dashboard.url + "api/samples/latest.png?site=nowhere")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "config.json",
        "metrics.jsonl",
        "../config.json",
        "static/../../config.json",
        "%2e%2e/%2e%2e/etc/passwd",
        "api/../../etc/passwd",
        "api/samples/round-0003.npz",
        "static/dashboard.html",
    ],
)
def test_unknown_paths_are_404_without_traversal(dashboard: DashboardServer, path: str) -> None:
    status, _, body = get(dashboard.url + path)
    assert status == 404
    assert b"browser-demo" not in body


def test_corrupt_metrics_are_reported_not_hidden(dashboard: DashboardServer, run: RunDir) -> None:
    with open(run.metrics_path, "a") as stream:
        stream.write("{oops\n")
    run.append_metrics(round_records(4))
    status, _, body = get(dashboard.url + "api/metrics")
    assert status == 500
    assert "metrics.jsonl:25: invalid metrics line" in json.loads(body)["error"]
    assert get(dashboard.url + "api/config")[0] == 200


def test_waits_for_a_run_that_does_not_exist_yet(tmp_path: Path) -> None:
    server = start(tmp_path / "later", port=0)
    try:
        assert json.loads(get(server.url + "api/config")[2])["status"] == "waiting"
        assert json.loads(get(server.url + "api/metrics")[2])["rows"] == []
        assert get(server.url + "api/samples/latest.png")[0] == 404
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium through the system chromedriver; skips when they are not installed."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium-manager fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1440,1900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.browser
def test_page_plots_points_fills_table_and_follows_new_rounds(
    browser: Any, dashboard: DashboardServer, run: RunDir
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def points(round: int | None = None) -> list[Any]:
        selector = 'svg[data-phase="evaluate"][data-metric="psnr"] .point'
        return browser.find_elements(By.CSS_SELECTOR, selector + (f'[data-round="{round}"]' if round else ""))

    browser.get(dashboard.url)
    wait = WebDriverWait(browser, 15)
    wait.until(lambda _: browser.find_element(By.TAG_NAME, "body").get_attribute("data-latest-round") == "3")
    assert len(points()) == 3 * len(SITES)
    assert len(browser.find_elements(By.CSS_SELECTOR, 'svg[data-phase="train"][data-metric="loss"] .point')) == 12
    assert browser.find_element(By.ID, "run-status").text.lower() == "running"
    assert "round 3 of 6" in browser.find_element(By.ID, "run-progress").text

    def cell(site: str, metric: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, f'#table-latest td[data-site="{site}"][data-metric="{metric}"]')

    expected = {(r["site"], r["phase"]): r for r in run.read_metrics() if r["round"] == 3}
    for site in SITES:
        evaluated, trained = expected[(site, "evaluate")]["metrics"], expected[(site, "train")]["metrics"]
        for metric in ("psnr", "ssim", "nmse", "loss"):
            assert float(cell(site, metric).get_attribute("data-value")) == evaluated[metric]
        assert cell(site, "psnr").text == f"{evaluated['psnr']:.2f}"
        assert float(cell(site, "train_loss").get_attribute("data-value")) == trained["loss"]
    wait.until(
        lambda _: all(
            img.get_attribute("naturalWidth") not in (None, "0")
            for img in browser.find_elements(By.CSS_SELECTOR, "#samples img")
        )
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#samples img")) == 3
    browser.save_screenshot("/tmp/dashboard.png")

    browser.execute_script("window.fedsenseMarker = 'same page';")  # gone if the page reloads
    run.append_metrics(round_records(4))
    wait.until(lambda _: len(points(4)) == len(SITES))
    assert len(points()) == 4 * len(SITES)
    assert cell("__global__", "psnr").text == f"{round_records(4)[-1]['metrics']['psnr']:.2f}"
    assert browser.execute_script("return window.fedsenseMarker") == "same page"
    run.set_status("finished")
    wait.until(lambda _: browser.find_element(By.ID, "run-status").text.lower() == "finished")
