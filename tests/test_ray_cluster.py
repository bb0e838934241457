"""A simulation on an existing Ray cluster: a head and a second node started as separate processes here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.simulate import SimResources, free_port, simulate
from server.store import GLOBAL_SITE
from tests.test_federation import small_run

RAY = str(Path(sys.executable).parent / "ray")
# Keep this single-machine cluster on loopback: the nodes are started with --node-ip-address
# 127.0.0.1, and the drivers (this test, the simulation) get this variable, without which Ray swaps
# 127.0.0.1 for the machine's interface address. (A real multi-machine cluster needs neither.)
DRIVER_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def test_resources_become_flower_federation_config_and_ray_address() -> None:
    res = SimResources(ray_address="10.0.0.5:6379", client_cpus=1, client_gpus=0.5)
    assert res.federation_config(3) == ("num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.5")
    assert res.env() == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert SimResources().federation_config(4) == "num-supernodes=4"
    assert SimResources().env() == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # local Ray on loopback
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="client-cpus"):
            SimResources(client_cpus=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client-gpus"):
        SimResources(client_gpus=float("nan"))


def _ray_node(args: list[str], temp: Path | None, log: Path) -> subprocess.Popen[bytes]:
    """One Ray node in its own session (``--block``: it lives as long as this process)."""
    env = {k: v for k, v in os.environ.items() if k != DRIVER_LOOPBACK}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    command = [RAY, "start", "--block", "--num-cpus", "1", *args]
    if temp is not None:
        command += ["--temp-dir", str(temp)]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def ray_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A two-node Ray cluster (1 CPU each) on this machine; both nodes stopped afterwards."""
    monkeypatch.setenv(DRIVER_LOOPBACK, "0")  # inherited by the simulation's Ray driver
    import ray
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    head = _ray_node(
        ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false"],
        temp,
        tmp_path / "head.log",
    )
    worker = None
    try:
        deadline = time.monotonic() + 120
        worker = _ray_node(["--address", address, "--node-ip-address", "127.0.0.1"], None, tmp_path / "worker.log")
        ray.init(address=address, logging_level="ERROR")
        try:
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                alive = head.poll() is None and worker.poll() is None
                assert alive and time.monotonic() < deadline, (tmp_path / "worker.log").read_text(errors="replace")[
                    -2000:
                ]
                time.sleep(1)
        finally:
            ray.shutdown()
        yield address
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.mark.slow
def test_a_simulation_runs_its_sites_on_both_nodes_of_an_existing_ray_cluster(
    small_sites: list[Path], tmp_path: Path, ray_cluster: str
) -> None:
    import ray
    from ray._private import state

    run = small_run(small_sites, tmp_path / "run", rounds=1, **{"local-steps": 2})
    store = simulate(run, timeout=900, resources=SimResources(ray_address=ray_cluster, client_cpus=1))
    records = store.read_metrics()
    assert {r["site"] for r in records if r["round"] == 1 and r["phase"] == "train"} == {
        "site-a",
        "site-b",
        "site-c",
        GLOBAL_SITE,
    }
    ray.init(address=ray_cluster, logging_level="ERROR")
    try:
        nodes = {n["NodeID"] for n in ray.nodes()}
        actors = [a for a in state.actors().values() if "ClientAppActor" in a["ActorClassName"]]
    finally:
        ray.shutdown()
    # Flower's actor pool sized itself from the cluster (2 CPUs / 1 per site) and used both nodes.
    placed = {a["Address"]["NodeID"] for a in actors}
    assert len(actors) == 2 and placed == nodes and len(nodes) == 2
