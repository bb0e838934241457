"""The root docker-compose.yml, end to end: images built offline, a TLS federation of three sites runs
a FedProx study to completion, and everything it created is removed again.

Needs a Docker engine (deploy/ci/setup-docker.sh starts one); skipped, with the reason, without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.docker]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SITES = {"site-a", "site-b", "site-c"}
ROUNDS = 2
IMAGE = os.environ.get("FEDSENSE_TEST_IMAGE", "fedsense:latest")
BUILD_TIMEOUT = 1500
RUN_TIMEOUT = 900


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _compose_command() -> list[str] | None:
    """The compose v2 plugin if present, else Debian's docker-compose (v1.29 or a v2 binary)."""
    if _ok("docker", "compose", "version"):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    if not shutil.which("docker") or not _ok("docker", "info"):
        pytest.skip("no Docker engine reachable (`docker info` failed); deploy/ci/setup-docker.sh starts one")
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    return cmd


@pytest.fixture(scope="module")
def image(compose_cmd: list[str]) -> str:
    """`make images`: wheelhouse, base image if missing, image build (layer cache makes reruns fast)."""
    started = time.monotonic()
    proc = subprocess.run(["make", "-C", str(ROOT), "images", f"IMAGE={IMAGE}"], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False)
    assert proc.returncode == 0, f"make images failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    logger.info("make images: %.0f s", time.monotonic() - started)
    return IMAGE


def _leftovers(project: str) -> dict[str, list[str]]:
    """Containers, volumes and networks still carrying the compose project's label."""
    label = f"label=com.docker.compose.project={project}"
    listings = {
        "containers": ["docker", "ps", "-aq", "--filter", label],
        "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
        "networks": ["docker", "network", "ls", "-q", "--filter", label],
    }
    return {kind: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            for kind, cmd in listings.items()}


@pytest.fixture()
def project(compose_cmd: list[str], image: str, tmp_path: Path) -> Iterator[tuple[list[str], Path, dict[str, str]]]:
    """A compose project with a unique name whose ./runs is tmp_path/runs; `down -v` afterwards, checked."""
    name = f"fedsense-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "runs").mkdir()  # exists before compose starts, so it belongs to the test's user
    base = [*compose_cmd, "-p", name, "-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(tmp_path)]
    env = {
        **os.environ,
        "FEDSENSE_IMAGE": image,
        "FEDSENSE_RUN_NAME": "compose-test",
        # Random loopback ports: parallel runs and other services on this host must not collide.
        "FEDSENSE_SUPERLINK_PUBLISH": "127.0.0.1:",
        "FEDSENSE_DASHBOARD_PUBLISH": "127.0.0.1:",
    }
    try:
        yield base, tmp_path / "runs", env
    finally:
        logs = subprocess.run([*base, "logs", "--no-color"], env=env, capture_output=True, text=True, check=False)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr, encoding="utf-8")
        subprocess.run([*base, "down", "-v", "--remove-orphans", "--timeout", "10"], env=env,
                       capture_output=True, timeout=300, check=False)
        leftovers = _leftovers(name)
        assert not any(leftovers.values()), f"compose project {name} left {leftovers}"


def test_compose_federation_runs_to_completion(project: tuple[list[str], Path, dict[str, str]]) -> None:
    base, runs, env = project
    started = time.monotonic()
    up = subprocess.run([*base, "up", "-d"], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    submit = subprocess.run([*base, "ps", "-q", "submit"], env=env, capture_output=True, text=True, check=True)
    waited = subprocess.run(["docker", "wait", submit.stdout.strip()], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, check=True)
    logger.info("compose up -> submit exited: %.0f s", time.monotonic() - started)
    if waited.stdout.strip() != "0":
        logs = subprocess.run([*base, "logs", "--no-color", "--tail", "60"], env=env, capture_output=True, text=True)
        pytest.fail(f"submit exited {waited.stdout.strip()}:\n{logs.stdout[-12000:]}")

    run_dir = runs / "compose-test"
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["status"] == "finished" and config["num-server-rounds"] == ROUNDS
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    for rnd in range(1, ROUNDS + 1):
        for phase in ("train", "evaluate"):
            sites = {r["site"] for r in records if r["round"] == rnd and r["phase"] == phase}
            assert SITES | {"__global__"} <= sites, (rnd, phase, sites)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*.pt")) == [
        f"round-{r:04d}.pt" for r in range(1, ROUNDS + 1)
    ]

    # Each site holds only its own key; the SuperLink side never gets the CA key.
    for service, expected in (("site-a", {"auth.key", "auth.pub", "ca.crt"}),
                              ("superlink", {"ca.crt", "server.crt", "server.key", "superexec.secret", "sites"})):
        listing = subprocess.run([*base, "exec", "-T", service, "ls", "-A", "/keys"], env=env,
                                 capture_output=True, text=True, check=True)
        assert set(listing.stdout.split()) == expected, (service, listing.stdout)

    port = subprocess.run([*base, "port", "dashboard", "8050"], env=env, capture_output=True, text=True, check=True)
    with urllib.request.urlopen(f"http://{port.stdout.strip()}/", timeout=30) as page:
        assert page.status == 200
