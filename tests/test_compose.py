"""The compose files, end to end: images built offline (`make images`); the root docker-compose.yml runs a
TLS federation of three sites through a FedProx study, every site reaching the SuperLink only through the
front door (nginx), which admits the Control API only to operator certificates; the SuperLink is not
published and the dashboard wants its token; the `monitoring` profile's Prometheus saw the ServerApp's and the
sites' round counters advance and the dashboard's tokenless run gauges; an institution's
deploy/site/docker-compose.yml then joins (non-root, data read-only) with a key an operator registered through the front door; a separate run restarts
each site once while it trains and loses nothing; another runs with every site behind its own `vpn` link proxy
(deploy/wan/docker-compose.wan.yml) through a 20 s partition of one site; everything created is removed again.

Needs a Docker engine (deploy/ci/setup-docker.sh starts one); skipped, with the reason, without it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from server.pki import generate_pki
from server.receipts import RECEIVED_FILE, read_receipts
from server.store import GLOBAL_SITE, RunDir, validate_record

pytestmark = [pytest.mark.slow, pytest.mark.docker]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SITES = {"site-a", "site-b", "site-c"}
ROUNDS = 2
BIN = Path(sys.executable).parent
IMAGE = os.environ.get("FEDSENSE_TEST_IMAGE", "fedsense:latest")
IMAGE_UID = 10001  # the image's `fedsense` user
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
    # monitoring-image: Debian's Prometheus for the `monitoring` profile (built once, then skipped).
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "images", "monitoring-image", f"IMAGE={IMAGE}"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
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
    return {
        kind: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        for kind, cmd in listings.items()
    }


@dataclass
class Project:
    """One compose project: its command prefix, environment and host directory."""

    name: str
    base: list[str]
    env: dict[str, str]
    directory: Path

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The compose command; with ``check`` a failure fails the test with compose's output."""
        proc = subprocess.run(
            [*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc


@contextmanager
def _project(compose_cmd: list[str], files: list[Path], directory: Path, env: dict[str, str]) -> Iterator[Project]:
    """A compose project with a unique name; `down -v` afterwards, and nothing labelled with it may remain."""
    name = f"fedsense-test-{uuid.uuid4().hex[:8]}"
    base = [
        *compose_cmd,
        "-p",
        name,
        *(a for f in files for a in ("-f", str(f))),
        "--project-directory",
        str(directory),
    ]
    project = Project(name, base, {**os.environ, **env}, directory)
    try:
        yield project
    finally:
        logs = project.run("logs", "--no-color", check=False)
        (directory / f"{name}.log").write_text(logs.stdout + logs.stderr, encoding="utf-8")
        project.run("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        leftovers = _leftovers(name)
        assert not any(leftovers.values()), f"compose project {name} left {leftovers}"


# Runs first in this module (before the `federation` fixture starts its project), so it has the machine to itself.
RESTART_ROUNDS = 10
# (service, round after whose completion it is restarted); round 0 is the evaluation of the initial model.
# A site is restarted only once the one before it has taken part in a phase again (rounds take seconds,
# a site's restart longer), so one site at a time is away; enough rounds remain for the last to rejoin.
RESTARTS = (("site-a", 0), ("site-b", 1), ("site-c", 2))


def _container_state(container: str) -> dict:
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .State}}", container],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return json.loads(out)


def test_compose_federation_survives_every_site_restarting_once(
    compose_cmd: list[str], image: str, tmp_path: Path
) -> None:
    """Each site service is restarted once, one at a time, while the run goes on; nothing is lost.

    ``min-*-nodes=2`` lets a round finish without the site that is restarting (its SuperNode
    deactivates on SIGTERM, so the SuperLink answers its pending task with an error reply at once;
    ``round-timeout`` bounds the wait otherwise). The restarted SuperNode activates again with the
    same registered key and must then train in a round that started after its restart.
    """
    (tmp_path / "runs").mkdir()
    env = {
        "FEDSENSE_IMAGE": image,
        "FEDSENSE_RUN_NAME": "restart-test",
        "FEDSENSE_FRONTDOOR_PUBLISH": "127.0.0.1:",
        "FEDSENSE_DASHBOARD_PUBLISH": "127.0.0.1:",
        "FEDSENSE_RUN_CONFIG": (
            f'num-server-rounds={RESTART_ROUNDS} strategy="fedprox" proximal-mu=0.01 '
            "min-available-nodes=2 min-train-nodes=2 min-evaluate-nodes=2 round-timeout=120 node-wait-timeout=120 "
            # A small U-Net: this test is about who takes part, not about compute.
            """model-args='{"chans": 8, "num_pool_layers": 2}' """
            "local-epochs=0 local-steps=1 batch-size=2 max-eval-slices=2"
        ),
    }
    store = RunDir(tmp_path / "runs" / "restart-test")
    with _project(compose_cmd, [ROOT / "docker-compose.yml"], tmp_path, env) as project:
        started = time.monotonic()
        project.run("up", "-d", timeout=RUN_TIMEOUT)
        submit = project.run("ps", "-q", "submit").stdout.strip()

        def logs(tail: str = "80") -> str:
            # The submit container's own lines first: why a run ended is there, not in the SuperLink's chatter.
            submit_log = project.run("logs", "--no-color", "--tail", "30", "submit", check=False).stdout[-5000:]
            return submit_log + "\n" + project.run("logs", "--no-color", "--tail", tail, check=False).stdout[-8000:]

        def rejoined(site: str, since: float) -> bool:
            """Whether ``site`` took part in a phase that began after ``since``."""
            return any(
                r["site"] == GLOBAL_SITE and site in r.get("sites", []) and r["time"] - r["seconds"] > since
                for r in store.read_metrics()
            )

        restarted_at: dict[str, float] = {}
        for site, after_round in RESTARTS:
            deadline = time.monotonic() + RUN_TIMEOUT
            # A round is complete once its global evaluate record is in metrics.jsonl.
            while after_round not in store.completed_rounds() or not all(
                rejoined(name, when) for name, when in restarted_at.items()
            ):
                if not _container_state(submit)["Running"]:
                    pytest.fail(f"submit ended before round {after_round} completed:\n{logs()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"round {after_round} not complete after {RUN_TIMEOUT} s:\n{logs()}")
                time.sleep(0.5)
            t0 = time.monotonic()
            project.run("restart", "--timeout", "10", site, timeout=120)
            restarted_at[site] = time.time()  # the container is running again; its old processes are gone
            logger.info(
                "round %d complete at %.0f s; %s restarted in %.1f s",
                after_round,
                t0 - started,
                site,
                time.monotonic() - t0,
            )

        code = subprocess.run(
            ["docker", "wait", submit], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True
        ).stdout.strip()
        logger.info("submit finished after %.0f s", time.monotonic() - started)
        if code != "0":
            pytest.fail(f"submit exited {code}:\n{logs()}")
        for site, _ in RESTARTS:
            # Still up, and its SuperNode was admitted twice (before and after the restart).
            assert _container_state(project.run("ps", "-q", site).stdout.strip())["Running"], site
            admitted = project.run("logs", "--no-color", site).stdout.count("SuperNode ID:")
            assert admitted == 2, (site, admitted)

    assert store.read_config()["status"] == "finished"

    # Nothing half-written: every line is a complete, valid record, and no temp file is left over.
    raw = store.metrics_path.read_bytes()
    assert raw.endswith(b"\n")
    records = [validate_record(json.loads(line)) for line in raw.decode().splitlines()]
    assert not [p for p in store.path.rglob("*") if p.name.endswith(".tmp")]

    # Every round exactly once (the ServerApp was never restarted, so not even a redone round), each
    # with a global train and evaluate record; round 0 is the evaluation of the initial model.
    keys = [(r["round"], r["phase"], r["site"]) for r in records]
    assert len(keys) == len(set(keys)) == len(store.read_metrics(dedupe=True))
    rounds = range(1, RESTART_ROUNDS + 1)
    summaries = {(r["round"], r["phase"]): r for r in records if r["site"] == GLOBAL_SITE}
    assert sorted(summaries) == [(0, "evaluate")] + [(rnd, phase) for rnd in rounds for phase in ("evaluate", "train")]
    for (rnd, phase), summary in sorted(summaries.items()):
        logger.info(
            "round %d %s: %.0f s, sites %s, rejected %s",
            rnd,
            phase,
            summary["seconds"],
            summary["sites"],
            summary["rejected"],
        )
        assert len(summary["sites"]) >= 2 and set(summary["sites"]) <= SITES, summary

    # Every site trained again in a round whose training began after its restart.
    for site, when in restarted_at.items():
        later = [
            r["round"]
            for (_, phase), r in sorted(summaries.items())
            if phase == "train" and site in r["sites"] and r["time"] - r["seconds"] > when
        ]
        assert later, f"{site} never trained after its restart"

    # A loadable checkpoint per round, nothing else.
    assert sorted(p.name for p in store.checkpoint_dir.iterdir()) == [store.checkpoint_path(r).name for r in rounds]
    for rnd in rounds:
        payload = torch.load(store.checkpoint_path(rnd), map_location="cpu", weights_only=True)
        assert payload["round"] == rnd and payload["state_dict"]
        assert all(torch.isfinite(t).all() for t in payload["state_dict"].values())


# Also before the `federation` fixture's project, so this run too has the machine to itself.
WAN_ROUNDS = 3
PARTITION_S = 20


def test_compose_federation_over_vpn_links_finishes_through_a_20_s_partition(
    compose_cmd: list[str], image: str, tmp_path: Path
) -> None:
    """deploy/wan/docker-compose.wan.yml: each site dials the front door through its own link proxy container
    (the ``vpn`` preset: 50 ± 10 ms, 20 Mbit/s); after round 1, site-c's link is frozen for 20 s (``docker
    compose pause``: nothing moves, nothing is refused, as when packets vanish). The run finishes, the server's
    ledger holds each accepted update exactly once, and each proxy carried its own site's traffic both ways.
    """
    (tmp_path / "runs").mkdir()
    shutil.copytree(ROOT / "deploy" / "wan", tmp_path / "deploy" / "wan")  # mounted into the proxy containers
    env = {
        "FEDSENSE_IMAGE": image,
        "FEDSENSE_RUN_NAME": "wan-test",
        "FEDSENSE_FRONTDOOR_PUBLISH": "127.0.0.1:",
        "FEDSENSE_DASHBOARD_PUBLISH": "127.0.0.1:",
        "FEDSENSE_WAN_PRESET": "vpn",
        "FEDSENSE_RUN_CONFIG": (
            f'num-server-rounds={WAN_ROUNDS} strategy="fedavg" '
            "min-available-nodes=2 min-train-nodes=2 min-evaluate-nodes=2 round-timeout=60 node-wait-timeout=120 "
            """model-args='{"chans": 8, "num_pool_layers": 2}' """
            "local-epochs=0 local-steps=1 batch-size=2 max-eval-slices=2"
        ),
    }
    store = RunDir(tmp_path / "runs" / "wan-test")
    files = [ROOT / "docker-compose.yml", ROOT / "deploy" / "wan" / "docker-compose.wan.yml"]
    links = [f"wan-{site}" for site in sorted(SITES)]
    with _project(compose_cmd, files, tmp_path, env) as project:
        started = time.monotonic()
        project.run("up", "-d", timeout=RUN_TIMEOUT)
        submit = project.run("ps", "-q", "submit").stdout.strip()
        while 1 not in store.completed_rounds():
            assert _container_state(submit)["Running"], project.run("logs", "--no-color", "--tail", "60").stdout
            assert time.monotonic() - started < RUN_TIMEOUT, "round 1 did not complete"
            time.sleep(0.5)
        logger.info("round 1 complete at %.0f s; freezing wan-site-c for %d s", time.monotonic() - started, PARTITION_S)
        project.run("pause", "wan-site-c")
        time.sleep(PARTITION_S)
        project.run("unpause", "wan-site-c")
        code = subprocess.run(
            ["docker", "wait", submit], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True
        ).stdout.strip()
        logger.info("submit finished after %.0f s", time.monotonic() - started)
        assert code == "0", project.run("logs", "--no-color", "--tail", "80").stdout[-12000:]
        project.run("stop", "--timeout", "10", *links)  # each proxy logs what it carried as it stops
        for link in links:
            log = project.run("logs", "--no-color", link).stdout
            assert "-> frontdoor:9443 (rtt_ms=50.0 jitter_ms=10.0 bandwidth_mbit=20.0" in log, (link, log[-2000:])
            # The cap is the kernel's, set in the proxy's own namespace, and the proxy then left root.
            assert "kernel shaping: 20 Mbit/s up (to port 9443) and down (from port 9443)" in log, (link, log[-2000:])
            assert "running as fedsense" in log, (link, log[-2000:])
            carried = re.search(r"link proxy stopped: (\d+) connection\(s\).*; (\d+) B up .*, (\d+) B down", log)
            assert carried, (link, log[-2000:])
            connections, up, down = map(int, carried.groups())
            logger.info("%s carried %d connection(s), %d B up, %d B down", link, connections, up, down)
            assert connections >= 1 and up > 0 and down > 0, link

    assert store.read_config()["status"] == "finished"
    accepted = [r for r in read_receipts(store.path / RECEIVED_FILE) if r["accepted"] and r["phase"] == "train"]
    # Exactly once: no message id twice, no site twice in a round; every site, site-c included, took part.
    assert len({r["message_id"] for r in accepted}) == len(accepted)
    per_round = Counter((r["round"], r["site"]) for r in accepted)
    assert max(per_round.values()) == 1 and {rnd for rnd, _ in per_round} == set(range(1, WAN_ROUNDS + 1))
    assert {site for _, site in per_round} == SITES
    # The freeze fell inside a round, which waited for site-c's reply (no round-deadline) and then went on.
    train = {r["round"]: r for r in store.read_metrics() if r["phase"] == "train" and r["site"] == GLOBAL_SITE}
    assert max(r["seconds"] for rnd, r in train.items() if rnd >= 2) >= PARTITION_S - 2, train


_COMPOSE_SECAGG = os.environ.get("FEDSENSE_COMPOSE_SECAGG", "1") != "0"


@pytest.fixture(scope="module")
def federation(compose_cmd: list[str], image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The root docker-compose.yml, up; its ./runs is a temporary directory."""
    directory = tmp_path_factory.mktemp("compose")
    (directory / "runs").mkdir()  # exists before compose starts, so it belongs to the test's user
    # The monitoring profile mounts ./deploy/prometheus (scrape config, alert rules) of the project directory.
    shutil.copytree(ROOT / "deploy" / "prometheus", directory / "deploy" / "prometheus")
    env = {
        "FEDSENSE_IMAGE": image,
        "FEDSENSE_RUN_NAME": "compose-test",
        # Random loopback ports: parallel runs and other services on this host must not collide.
        "FEDSENSE_FRONTDOOR_PUBLISH": "127.0.0.1:",
        "FEDSENSE_DASHBOARD_PUBLISH": "127.0.0.1:",
        "FEDSENSE_PROMETHEUS_PUBLISH": "127.0.0.1:",
        "COMPOSE_PROFILES": "monitoring",  # every compose command (up, logs, down) includes Prometheus
        # Through SecAgg+ (the ServerApp sees only masked updates and their sum): the plain compose path is the
        # restart and WAN tests' (above); FEDSENSE_COMPOSE_SECAGG=0 runs this study plain too.
        **({"FEDSENSE_RUN_EXTRA": "secagg=true"} if _COMPOSE_SECAGG else {}),
    }
    with _project(compose_cmd, [ROOT / "docker-compose.yml"], directory, env) as project:
        started = time.monotonic()
        up = project.run("up", "-d", check=False, timeout=RUN_TIMEOUT)
        assert up.returncode == 0, up.stdout + up.stderr
        logger.info("compose up -d: %.0f s", time.monotonic() - started)
        yield project


def test_compose_federation_runs_to_completion(federation: Project) -> None:
    started = time.monotonic()
    submit = federation.run("ps", "-q", "submit").stdout.strip()
    code = subprocess.run(
        ["docker", "wait", submit], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True
    ).stdout.strip()
    logger.info("submit finished after %.0f s more", time.monotonic() - started)
    if code != "0":
        pytest.fail(f"submit exited {code}:\n{federation.run('logs', '--no-color', '--tail', '60').stdout[-12000:]}")

    run_dir = federation.directory / "runs" / "compose-test"
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["status"] == "finished" and config["num-server-rounds"] == ROUNDS
    assert config["secagg"] == _COMPOSE_SECAGG
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    if _COMPOSE_SECAGG:  # every round went through SecAgg+'s four stages with all three sites in the sum
        train = [r for r in records if r["phase"] == "train" and r["site"] == "__global__"]
        assert [r["secagg"]["sites_summed"] for r in train] == [3] * ROUNDS, train
        assert all(len(r["secagg"]["stage_seconds"]) == 4 for r in train), train
    for rnd in range(1, ROUNDS + 1):
        for phase in ("train", "evaluate"):
            sites = {r["site"] for r in records if r["round"] == rnd and r["phase"] == phase}
            assert SITES | {"__global__"} <= sites, (rnd, phase, sites)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*.pt")) == [
        f"round-{r:04d}.pt" for r in range(1, ROUNDS + 1)
    ]
    # The host user keeps owning what the ServerApp wrote (root-owned ./runs go to the image user).
    assert run_dir.stat().st_uid == (os.getuid() or IMAGE_UID)

    # Each site holds only its own key; the SuperLink side never gets the CA key.
    for service, expected in (
        ("site-a", {"auth.key", "auth.pub", "ca.crt"}),
        ("superlink", {"ca.crt", "server.crt", "server.key", "superexec.secret", "sites"}),
    ):
        listing = federation.run("exec", "-T", service, "ls", "-A", "/keys").stdout
        assert set(listing.split()) == expected, (service, listing)

    # Sites: not root, data read-only, keys read-only, no port.
    for site in sorted(SITES):
        container = federation.run("ps", "-q", site).stdout.strip()
        assert federation.run("exec", "-T", site, "id", "-u").stdout.strip() == str(IMAGE_UID), site
        mounts = {m["Destination"]: m["RW"] for m in _inspect(container)["Mounts"]}
        assert mounts == {"/data": False, "/keys": False}, (site, mounts)
        assert not _published(container), site

    # Only the front door (and the dashboard, on loopback) is published; the SuperLink is not.
    assert not _published(federation.run("ps", "-q", "superlink").stdout.strip())
    door = federation.run("port", "frontdoor", "9443").stdout.strip()
    ca = federation.directory / "ca.crt"
    ca.write_text(federation.run("exec", "-T", "superlink", "cat", "/keys/ca.crt").stdout)
    assert _https(door, ca, "/health")[0] == 404  # nothing but the two API prefixes
    assert _https(door, ca, "/v1/runtime/pull-app-inputs", b"")[0] == 404  # ServerAppIo: internal only
    assert _https(door, ca, "/v1/control/list-nodes", b"")[0] == 403  # Control: operators only

    dashboard = federation.run("port", "dashboard", "8050").stdout.strip()
    assert dashboard.startswith("127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{dashboard}/api/config", timeout=30)
    assert refused.value.code == 401
    token = _dashboard_token(federation)
    with urllib.request.urlopen(f"http://{dashboard}/?token={token}", timeout=30) as page:
        assert page.status == 200

    # The monitoring profile's Prometheus scraped the ServerApp's /metrics while the run went on: its
    # round counter started at 0 and advanced (the last round may end between two scrapes).
    prometheus = federation.run("port", "prometheus", "9090").stdout.strip()
    seen = {
        q: _prometheus_value(prometheus, f"{q}_over_time(fedsense_rounds_finished_total[1h])") for q in ("min", "max")
    }
    assert seen["min"] == 0 and 1 <= seen["max"] <= ROUNDS, seen
    # ... and every site's own /metrics (no port published): each site target up, and each site's last
    # round trained seen at 1 and then at the last round (scraped every second; rounds are seconds apart).
    assert _prometheus_value(prometheus, 'count(up{job="fedsense-sites"} == 1)') == len(SITES)
    site_rounds = {
        q: _prometheus_value(prometheus, f"{q}({q}_over_time(fedsense_site_last_round_trained[1h]))")
        for q in ("min", "max")
    }
    assert site_rounds == {"min": 1, "max": ROUNDS}, site_rounds
    assert _prometheus_value(prometheus, "min(max_over_time(fedsense_site_train_steps_total[1h]))") >= ROUNDS
    # ... and the dashboard's tokenless run gauges, which outlive the ServerApp: the finished run's rounds.
    assert _wait_for_value(prometheus, 'fedsense_run_rounds_completed{job="fedsense-dashboard"}') == ROUNDS


def _prometheus_value(address: str, query: str) -> float:
    """The one value of an instant ``query`` through Prometheus' HTTP API."""
    url = f"http://{address}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        result = json.load(response)["data"]["result"]
    assert len(result) == 1, (query, result)
    return float(result[0]["value"][1])


def _wait_for_value(address: str, query: str, timeout: float = 30) -> float:
    """:func:`_prometheus_value` once the query has a result (a target scraped every few seconds)."""
    deadline = time.monotonic() + timeout
    url = f"http://{address}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    while True:
        with urllib.request.urlopen(url, timeout=30) as response:
            if json.load(response)["data"]["result"] or time.monotonic() > deadline:
                return _prometheus_value(address, query)
        time.sleep(1)


def _inspect(container: str) -> dict:
    out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)[0]


def _published(container: str) -> list[str]:
    """The host ports a container publishes."""
    ports = _inspect(container)["NetworkSettings"]["Ports"] or {}
    return [f"{b['HostIp']}:{b['HostPort']}" for bindings in ports.values() for b in (bindings or [])]


def _https(address: str, ca: Path, path: str, body: bytes | None = None) -> tuple[int, str]:
    """Status and body of one request to the front door (its certificate verified against the CA)."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(
        f"https://{address}{path}", data=body, headers={"content-type": "application/protobuf"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _dashboard_token(project: Project) -> str:
    """The token the dashboard printed (once) at its first start."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(
            r"dashboard token \(shown once; kept in [^)]*\): (\S+)",
            project.run("logs", "--no-color", "dashboard").stdout,
        )
        if found:
            return found.group(1)
        time.sleep(1)
    pytest.fail("the dashboard printed no token")


def test_institution_site_joins_with_its_own_key(federation: Project, compose_cmd: list[str], tmp_path: Path) -> None:
    """deploy/site/docker-compose.yml as a hospital runs it, after an operator registered its key.

    Through the published front door: without an operator certificate the Control API refuses
    `flwr supernode register` and `flwr run`; with one (`fedsense operator`) both work. The site runs
    as a non-root user with its data mounted read-only and reaches the federation through the front door.
    """
    keys = tmp_path / "keys"
    keys.mkdir()
    ca = keys / "ca.crt"
    ca.write_text(federation.run("exec", "-T", "superlink", "cat", "/keys/ca.crt").stdout)
    site_keys = generate_pki(tmp_path / "own-pki", ["unused"], ["site-d"]).sites["site-d"]
    shutil.copy2(site_keys.private_key, keys / "auth.key")
    door = federation.run("port", "frontdoor", "9443").stdout.strip()

    # Anyone with the CA certificate (every site has it) but no operator certificate is refused.
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "centre"\n\n[superlink.centre]\naddress = "{door}"\nroot-certificates = "{ca}"\n',
        encoding="utf-8",
    )
    flwr_env = {**os.environ, "FLWR_HOME": str(home)}

    def flwr(*args: str) -> dict:
        out = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"],
            env=flwr_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return json.loads(out.stdout)

    refused = flwr("supernode", "register", str(site_keys.public_key), "centre", "--name", "site-d")
    assert not refused.get("success"), refused
    refused_run = flwr("run", str(ROOT), "centre")
    assert not refused_run.get("success") and not refused_run.get("run-id"), refused_run

    # An operator: certificate issued by the federation CA (the pki service), used through the bridge.
    bundle = tmp_path / "operator.pem"
    # `compose run` of a short-lived container now and then loses the tail of its output (fresh-clone CI once
    # got the certificate without its key); the certificate is kept while valid, so asking again is safe.
    for _ in range(3):
        issued = federation.run("run", "--rm", "-T", "pki", "operator", "alice").stdout
        pems = re.findall(r"(-----BEGIN ([A-Z ]+)-----.*?-----END \2-----\n)", issued, re.S)  # (block, kind)
        if {kind for _, kind in pems} >= {"CERTIFICATE", "PRIVATE KEY"}:
            break
    else:
        pytest.fail(f"`pki operator alice` printed no certificate and key:\n{issued[-2000:]}")
    bundle.write_text("".join(pem for pem, _ in pems))
    bundle.chmod(0o600)

    def operator(*args: str) -> dict:
        out = subprocess.run(
            [
                str(BIN / "fedsense"),
                "operator",
                "--front-door",
                door,
                "--root-cert",
                str(ca),
                "--cert",
                str(bundle),
                "--",
                *args,
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return json.loads(out.stdout)

    registered = operator("supernode", "register", str(site_keys.public_key), "--name", "site-d")
    assert registered.get("success"), registered
    started = operator(
        "run", str(ROOT), "--run-config", 'num-server-rounds=1 run-dir="/runs/operator-test" name="operator-test"'
    )
    assert started.get("success") and started.get("run-id"), started
    assert operator("stop", str(started["run-id"])).get("success")

    config = tmp_path / "site-d.toml"
    config.write_text(
        re.sub(
            r"(?m)^name = .*$",
            'name = "site-d"',
            (ROOT / "deploy" / "sites" / "site-b.toml").read_text(encoding="utf-8"),
        ),
        encoding="utf-8",
    )
    # The hospital's data: written on the host beforehand, then mounted read-only.
    demo = subprocess.run(
        [
            str(BIN / "fedsense"),
            "data",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--size",
            "64",
            "--subjects",
            "3",
            "--site-config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    data = tmp_path / "demo" / "site-d"
    user = f"{os.getuid()}:{os.getgid()}"
    if os.getuid() == 0:  # a site never runs as root: hand the files to the image user, as a hospital would
        user = f"{IMAGE_UID}:{IMAGE_UID}"
        for path in (keys, data, *keys.iterdir(), *data.rglob("*")):
            os.chown(path, IMAGE_UID, IMAGE_UID)
        for path in (tmp_path, tmp_path / "demo", config):
            path.chmod(path.stat().st_mode | 0o005)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_uid) for p in data.rglob("*")}
    network = tmp_path / "network.yml"  # a hospital reaches the front door by DNS; here: the demo's edge network
    network.write_text(f"networks:\n  default:\n    external: true\n    name: {federation.name}_edge\n")
    env = {
        "FEDSENSE_IMAGE": IMAGE,
        "FEDSENSE_SITE": "site-d",
        "FEDSENSE_SUPERLINK": "frontdoor:9443",
        "FEDSENSE_KEYS": str(keys),
        "FEDSENSE_SITE_CONFIG": str(config),
        "FEDSENSE_DATA": str(data),
        "FEDSENSE_USER": user,
    }
    files = [ROOT / "deploy" / "site" / "docker-compose.yml", network]
    with _project(compose_cmd, files, tmp_path, env) as site:
        site.run("up", "-d", timeout=RUN_TIMEOUT)
        node_id = str(registered["node-id"])
        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline and status != "online":
            nodes = {n["node-id"]: n["status"] for n in operator("supernode", "list").get("nodes", [])}
            status = nodes.get(node_id, "")
            time.sleep(2)
        assert status == "online", site.run("logs", "--no-color", check=False).stdout[-6000:]
        assert site.run("exec", "-T", "site", "id", "-u").stdout.strip() == user.split(":")[0] != "0"
        container = site.run("ps", "-q", "site").stdout.strip()
        assert {m["Destination"]: m["RW"] for m in _inspect(container)["Mounts"]}["/data"] is False
    assert {p: (p.stat().st_mtime_ns, p.stat().st_uid) for p in data.rglob("*")} == before
