"""``fedsense simulate``: the real ServerApp and ClientApp in Flower's simulation runtime.

Flower 1.41 runs simulations inside a SuperLink started with ``--simulation``; ``flwr run``
submits the app to it. This module owns that SuperLink: it starts it on a free local port with
a private ``FLWR_HOME`` (so it never touches the user's own Flower configuration or a SuperLink
they run), submits the run, follows it until it ends, and stops everything it started.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config_layers import updated
from common.errors import ConfigError, FedSenseError
from common.preflight import check_sites
from common.proctree import ProcessTree
from common.runconfig import RunConfig
from server.progress import reporting_rounds
from server.store import RunDir

logger = logging.getLogger(__name__)

CONNECTION = "fedsense-sim"
_PR_SET_PDEATHSIG = 1
# Loaded here, not in the forked child, which must do as little as possible before it execs.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def find_project_dir() -> Path:
    """The Flower app directory (the one holding FedSense's pyproject.toml).

    A checkout's root; in an installed wheel, the copy shipped as package data (``server/flwr_app``,
    written by setup.py), whose app components import the installed packages.
    """
    candidates = [Path(os.environ["FEDSENSE_APP_DIR"])] if "FEDSENSE_APP_DIR" in os.environ else []
    candidates += [Path(__file__).resolve().parent.parent, Path(__file__).resolve().parent / "flwr_app", Path.cwd()]
    for path in candidates:
        toml = path / "pyproject.toml"
        if toml.is_file() and "[tool.flwr.app]" in toml.read_text(encoding="utf-8"):
            return path
    raise ConfigError("FEDSENSE_APP_DIR: no Flower app directory with FedSense's pyproject.toml found")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """One TOML value for a run-config override file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _die_with_parent() -> None:
    """In the child, before exec: have Linux SIGKILL it when the thread that started it ends.

    That thread is the caller of :func:`simulate`, which waits for the run; so in effect, when
    ``fedsense simulate`` dies. Without this a killed ``fedsense simulate`` (SIGKILL runs no
    cleanup) leaves its SuperLink, in a session of its own, running the simulation and writing to
    the run directory, and a restart on that directory would have two writers. (The SuperLink's
    own children exit when it does: Flower starts them with ``--parent-pid``.)
    """
    assert _LIBC is not None  # only installed where libc is loaded
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def flower_env(home: Path) -> dict[str, str]:
    """Environment of every Flower process FedSense starts: a private FLWR_HOME (never the user's
    own Flower configuration), no runtime ``uv sync`` of the app's dependencies, no update check,
    and this interpreter's Flower executables first on PATH."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (works without an activated venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class SimulationSuperLink:
    """A private simulation-mode SuperLink, stopped (with its whole process group) on exit."""

    def __init__(self, home: Path, cwd: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home, self.cwd, self.extra_env = home, cwd, dict(extra_env or {})
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SimulationSuperLink:
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        command = [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.home / "state.db"),
            "--log-file",
            str(self.home / "superlink.log"),
            "--disable-runtime-dependency-installation",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=self.cwd,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FedSenseError(
                    f"flower-superlink exited with {self.process.returncode}; see {self.home / 'superlink.log'}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.3)
        raise FedSenseError("flower-superlink did not start listening within 60 s")

    def env(self) -> dict[str, str]:
        return {**flower_env(self.home), **self.extra_env}

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlive the SuperLink (ServerApp / simulation processes) share its group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class SimResources:
    """Where the simulated sites run: Flower's local Ray, or an existing Ray cluster, and what each site gets.

    ``client_cpus`` / ``client_gpus`` are Ray resources per simulated site (Flower's default is
    2 CPUs, so on 2 cores sites run one after another); ``ray_address`` (``HOST:PORT`` of a Ray
    head, or ``auto``) makes the simulation join that cluster instead of starting Ray locally.
    """

    ray_address: str | None = None
    client_cpus: int | None = None
    client_gpus: float | None = None

    def __post_init__(self) -> None:
        # Flower's simulation config holds whole CPUs per site and fractional GPUs.
        if self.client_cpus is not None and (not isinstance(self.client_cpus, int) or self.client_cpus < 1):
            raise ConfigError(f"simulate: client-cpus: must be a whole number >= 1, got {self.client_cpus!r}")
        if self.client_gpus is not None and not (math.isfinite(self.client_gpus) and self.client_gpus >= 0):
            raise ConfigError(f"simulate: client-gpus: must be a finite number >= 0, got {self.client_gpus!r}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("simulate: ray-address: empty (use HOST:PORT of the Ray head, or 'auto')")

    def federation_config(self, num_sites: int) -> str:
        """The ``flwr run --federation-config`` value: site count and per-site resources."""
        items = [f"num-supernodes={num_sites}"]
        if self.client_cpus is not None:
            items.append(f"client-resources-num-cpus={self.client_cpus}")
        if self.client_gpus is not None:
            items.append(f"client-resources-num-gpus={float(self.client_gpus)!r}")
        return " ".join(items)

    def env(self) -> dict[str, str]:
        """Flower's Ray backend calls ``ray.init()`` without an address, which joins ``RAY_ADDRESS``.

        Without one, Ray starts locally; Ray's switch for single-machine mode keeps that local
        cluster on loopback (otherwise it binds to and talks over the machine's interface address).
        """
        if self.ray_address:
            return {"RAY_ADDRESS": self.ray_address}
        return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def simulate(
    run: RunConfig,
    *,
    project_dir: Path | None = None,
    timeout: float = 3600,
    report: Callable[[str], None] = logger.info,
    resources: SimResources | None = None,
) -> RunDir:
    """Run ``run`` with one simulated SuperNode per site; returns the finished run directory.

    Raises ``FedSenseError`` when the run fails or does not finish within ``timeout`` seconds. On
    Ctrl-C or SIGTERM every process the run started is stopped, the run is recorded as ``interrupted``
    with its last complete round, and ``KeyboardInterrupt`` propagates; running it again resumes.
    """
    resources = resources or SimResources()
    sites = run.site_list
    if not sites:
        raise ConfigError("simulate: sites: at least one site config is needed")
    # Everything that can be checked without Flower is checked first: seconds, not a Ray traceback.
    check_sites(sites)
    project = project_dir or find_project_dir()
    run_dir = Path(run.run_dir).resolve()
    absolute = updated(
        run,
        "simulate (absolute paths)",
        run_dir=str(run_dir),
        sites=",".join(str(Path(s).resolve()) for s in sites),
        sample_dir=str(Path(run.sample_dir).resolve()) if run.sample_dir else str(run_dir / "samples"),
        # Every simulated site lives on this machine: their private state goes under the run directory.
        site_state_dir=str(Path(run.site_state_dir).resolve()) if run.site_state_dir else str(run_dir / "site-state"),
    )
    store = RunDir(run_dir)
    # What the ServerApp would refuse after Flower started, refused now: an unwritable run
    # directory, or a resume of a run directory that holds another run.
    store.check_writable()
    store.check_identity(absolute.to_flat(), resume=absolute.resume)
    with ProcessTree() as tree:  # Ctrl-C / SIGTERM: the SuperLink, the simulation and Ray all stop
        try:
            _simulate(run, absolute, store, project, timeout, report, resources)
        except KeyboardInterrupt:
            tree.stop()  # no process of the run may write to the run directory after it is marked
            last = store.mark_interrupted("run the same command again: it resumes after this round (resume=true)")
            if last is not None:
                report(
                    f"interrupted; every process of the run stopped; {run_dir} resumes after round {last} "
                    "when the same command is run again"
                )
            raise
    return store


def _simulate(
    run: RunConfig,
    absolute: RunConfig,
    store: RunDir,
    project: Path,
    timeout: float,
    report: Callable[[str], None],
    resources: SimResources,
) -> None:
    """Start the private SuperLink, submit the run and follow it to its end."""
    sites, run_dir = run.site_list, store.path
    home = Path(tempfile.mkdtemp(prefix="fedsense-flwr-"))
    overrides = home / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in absolute.to_flat().items()), encoding="utf-8")
    try:
        with SimulationSuperLink(home, project, extra_env=resources.env()) as link:
            command = [
                _bin("flwr"),
                "run",
                str(project),
                CONNECTION,
                "--run-config",
                str(overrides),
                "--federation-config",
                resources.federation_config(len(sites)),
                "--stream",
            ]
            where = f" on the Ray cluster at {resources.ray_address}" if resources.ray_address else ""
            report(
                f"simulating {len(sites)} sites x {run.num_server_rounds} rounds ({run.strategy}){where}; "
                f"log: {run_dir / 'flower.log'}"
            )
            with open(run_dir / "flower.log", "ab") as log, reporting_rounds(store, run.num_server_rounds, report):
                try:
                    proc = subprocess.run(
                        command,
                        cwd=project,
                        env=link.env(),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        timeout=timeout,
                        check=False,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise FedSenseError(f"simulation did not finish within {timeout:.0f} s") from exc
            status = _run_status(link)
            if proc.returncode != 0 or not status.startswith("finished:completed"):
                raise FedSenseError(
                    f"simulation failed (flwr exit {proc.returncode}, run status {status!r}); see {run_dir / 'flower.log'}"
                )
    finally:
        if (home / "superlink.log").exists():
            shutil.copy2(home / "superlink.log", run_dir / "superlink.log")
        shutil.rmtree(home, ignore_errors=True)


def _run_status(link: SimulationSuperLink) -> str:
    """The status of the (only) run on the private SuperLink, e.g. ``finished:completed``."""
    out = subprocess.run(
        [_bin("flwr"), "ls", CONNECTION, "--format", "json"],
        env=link.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise FedSenseError(f"cannot read run status from `flwr ls`: {out.stdout[-500:]} {out.stderr[-500:]}") from exc
    return str(runs[-1]["status"]) if runs else "missing"
