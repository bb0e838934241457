"""A local Flower deployment for reliability tests: one SuperLink and one SuperNode per site, as real processes.

Unlike ``server.simulate`` (Flower's simulation runtime, one process), every piece here is the
process a hospital deployment runs: ``flower-superlink`` (Fleet, Control and Runtime APIs on one
HTTP port; it starts the ServerApp), and per site a ``flower-supernode`` with
``--node-config site-config=...`` (it starts a ClientApp process per message). Each runs in its
own process group so a test can SIGKILL one machine's worth of processes, as a crash would, and
the context manager kills every group it started on exit, whatever happened in between.
TLS is left out on purpose (tests/test_transport.py covers it); the SuperLink is bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.simulate import _toml_value, find_project_dir, free_port

CONNECTION = "fedsense-local"
_BIN = Path(sys.executable).parent


class DeploymentError(RuntimeError):
    """The harness itself failed (a process did not start, a run did not end in time)."""


def _kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the whole process group of ``process`` (it started one: ``start_new_session``) and reap it."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def group_commands(pgid: int) -> list[str]:
    """Command lines of the live processes in process group ``pgid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Field 5 (pgrp) follows the parenthesised command name, which may itself hold spaces.
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return found


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; ``DeploymentError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Deployment:
    """An insecure local SuperLink plus named SuperNodes; everything started is SIGKILLed on exit."""

    def __init__(self, workdir: Path, project: Path | None = None) -> None:
        self.workdir = workdir
        self.home = workdir / "flwr-home"
        self.logs = workdir / "logs"
        self.project = project or find_project_dir()
        self.port = free_port()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[str, subprocess.Popen[bytes]] = {}
        self._site_configs: dict[str, Path] = {}
        self._started: list[subprocess.Popen[bytes]] = []

    # lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "Deployment":
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        try:
            self.start_superlink()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """SIGKILL every process group this deployment started (ServerApp and ClientApps included)."""
        for process in reversed(self._started):
            _kill_group(process)
        self._started.clear()

    def env(self) -> dict[str, str]:
        """Environment of every Flower process: private FLWR_HOME, no ``uv sync``, no update check."""
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
        env["PATH"] = f"{_BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.logs / log_name, "ab") as log:
            process = subprocess.Popen(command, cwd=self.workdir, env=self.env(), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self._started.append(process)
        return process

    # SuperLink ---------------------------------------------------------------------------------

    def start_superlink(self) -> None:
        """Start (or restart, on the same port and database) the SuperLink; returns once it listens."""
        command = [
            str(_BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        self.superlink = self._spawn(command, "superlink.log")

        def listening() -> bool:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with {self.superlink.returncode}; see {self.logs}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(listening, 60, "flower-superlink to listen")

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink's process group: the SuperLink and the ServerApp it runs die at once."""
        if self.superlink is not None:
            _kill_group(self.superlink)

    # SuperNodes --------------------------------------------------------------------------------

    def start_supernode(self, name: str, site_config: Path | None = None) -> None:
        """Start the SuperNode of site ``name`` (``site_config`` needed the first time)."""
        if site_config is not None:
            self._site_configs[name] = Path(site_config).resolve()
        command = [
            str(_BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", f"site-config='{self._site_configs[name]}'",
            "--port", str(free_port()),  # each SuperNode's local ClientApp Runtime API
        ]
        self.supernodes[name] = self._spawn(command, f"supernode-{name}.log")

    def kill_supernode(self, name: str) -> None:
        """SIGKILL site ``name``'s SuperNode with its SuperExec and any running ClientApp."""
        _kill_group(self.supernodes[name])
        wait_for(lambda: not _group_alive(self.supernodes[name].pid), 15, f"{name}'s processes to die")

    def clientapp_running(self, name: str) -> bool:
        """Whether site ``name`` is executing a ClientApp right now (i.e. is mid-task)."""
        return any("flwr-clientapp" in cmd for cmd in group_commands(self.supernodes[name].pid))

    # runs --------------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """A ``flwr`` CLI command against this SuperLink, with ``--format json``; its parsed output."""
        out = subprocess.run([str(_BIN / "flwr"), *args, "--format", "json"], cwd=self.project, env=self.env(),
                             capture_output=True, text=True, timeout=timeout, check=False)
        try:
            return dict(json.loads(out.stdout))
        except json.JSONDecodeError as exc:
            raise DeploymentError(f"flwr {' '.join(args)}: {out.stdout[-800:]} {out.stderr[-800:]}") from exc

    def submit(self, run_config: Mapping[str, Any]) -> int:
        """``flwr run`` the FedSense app with ``run_config`` overrides; returns the run id."""
        overrides = self.workdir / f"run-config-{time.monotonic_ns()}.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()), encoding="utf-8")
        result = self.flwr("run", str(self.project), CONNECTION, "--run-config", str(overrides))
        if not result.get("success"):
            raise DeploymentError(f"flwr run failed: {result}")
        return int(result["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it, e.g. ``running`` or ``finished:failed``."""
        runs = self.flwr("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        return str(runs[0]["status"]) if runs else "missing"

    def wait_finished(self, run_id: int, timeout: float) -> str:
        """Block until run ``run_id`` is finished; returns its status (``finished:completed`` etc.)."""
        return str(wait_for(lambda: (s := self.status(run_id)).startswith("finished") and s, timeout,
                            f"run {run_id} to finish (logs: {self.logs})", interval=2.0))
