"""A local Flower deployment for reliability tests: one SuperLink and one SuperNode per site, as real processes.

Unlike ``server.simulate`` (Flower's simulation runtime), every piece here is the process a
hospital deployment runs: ``flower-superlink`` (Fleet, Control and Runtime APIs on one HTTP port;
it starts the ServerApp), and per site a ``flower-supernode`` with ``--node-config
site-config=...`` (it starts a ClientApp process per message). A test kills one machine's worth
of processes (a process and everything it started) with SIGKILL at once, as a crash would;
leaving the context manager does the same to everything it started, whatever happened in
between. TLS is left out on purpose (tests/test_transport.py covers it); everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from server.simulate import find_project_dir, flower_env, free_port, toml_value

CONNECTION = "fedsense-local"
_BIN = Path(sys.executable).parent
_NODE_ID = re.compile(rb"SuperNode ID: (\d+)")

T = TypeVar("T")


class DeploymentError(RuntimeError):
    """The harness itself failed (a process did not start, a run did not end in time)."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``predicate`` until it returns something truthy; ``DeploymentError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _processes() -> dict[int, tuple[int, str]]:
    """Every live (non-zombie) process: pid -> (parent pid, command line), from Linux ``/proc``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # After the parenthesised command name (which may hold spaces): state, ppid, ...
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            if state != "Z":
                found[int(entry.name)] = (int(ppid), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return found


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and all its live descendants, with their command lines.

    Flower detaches some children into sessions of their own (the SuperLink's SuperExec), so a
    process group does not hold everything a process started; parent links do.
    """
    processes = _processes()
    tree, frontier = {}, [pid]
    while frontier:
        current = frontier.pop()
        if current in processes:
            tree[current] = processes[current][1]
            frontier += [child for child, (parent, _) in processes.items() if parent == current]
    return tree


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    return pid in _processes()


def kill_survivors(tree: dict[int, str]) -> None:
    """SIGKILL the processes of ``tree`` (from :func:`process_tree`) that are still alive.

    A pid counts as the same process only while its command line is unchanged (pids get reused).
    """
    now = _processes()
    for pid, cmd in tree.items():
        if pid in now and now[pid][1] == cmd:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_tree(process: subprocess.Popen[bytes]) -> set[int]:
    """SIGKILL ``process`` and everything it started, all at once (a crash); returns the pids killed."""
    killed: set[int] = set()
    for _ in range(2):  # a second pass catches a child forked while the first one ran
        for pid in process_tree(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
    process.wait(timeout=30)
    # SIGKILL is not instant: a large (torch) process takes a moment to tear down after it. Callers check
    # that nothing survived, so wait for the teardown (fresh-clone CI once saw one still exiting).
    deadline = time.monotonic() + 10
    while killed & _processes().keys() and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


class Deployment:
    """An insecure local SuperLink plus named SuperNodes; everything it started is SIGKILLed on exit."""

    def __init__(self, workdir: Path, project: Path | None = None, superlink_cpus: set[int] | None = None) -> None:
        self.workdir = workdir
        self.superlink_cpus = superlink_cpus  # the SuperLink and the ServerApp it starts run on these cores
        self.home = workdir / "flwr-home"
        self.logs = workdir / "logs"
        self.project = project or find_project_dir()
        self.port = free_port()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()
        self._site_configs: dict[str, Path] = {}
        self._node_logs: dict[str, Path] = {}

    # lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
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
        """SIGKILL every process this deployment started and all of theirs (ServerApp, ClientApps)."""
        for process in reversed(self.started):
            self.killed |= kill_tree(process)

    def env(self) -> dict[str, str]:
        """Environment of every Flower process: the same as ``fedsense simulate`` gives its own."""
        return flower_env(self.home)

    def _spawn(
        self, command: list[str], log: Path, env: Mapping[str, str] | None = None, cpus: set[int] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` logging to ``log``; ``cpus`` pins it (and all it starts) to those cores."""
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with open(log, "ab") as stream:
            process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env={**self.env(), **(env or {})},
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,
            )
        self.started.append(process)
        return process

    # SuperLink ---------------------------------------------------------------------------------

    def start_superlink(self) -> None:
        """Start (or restart, on the same port and database) the SuperLink; returns once it listens."""
        command = [
            str(_BIN / "flower-superlink"),
            "--insecure",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        link = self.superlink = self._spawn(command, self.logs / "superlink.log", cpus=self.superlink_cpus)

        def listening() -> bool:
            if link.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with {link.returncode}; see {self.logs}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(listening, 60, "flower-superlink to listen")

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink, its SuperExec and the ServerApp it runs, at once."""
        assert self.superlink is not None
        self.killed |= kill_tree(self.superlink)

    # SuperNodes --------------------------------------------------------------------------------

    def start_supernode(
        self,
        name: str,
        site_config: Path | None = None,
        warm: bool = False,
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
        superlink: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """Start (or restart) site ``name``'s SuperNode; ``site_config`` is needed the first time.

        ``warm``: through ``fedsense client`` (SuperNode in process isolation plus the warm
        ``fedsense-superexec``) instead of a bare ``flower-supernode`` with Flower's own SuperExec.
        ``env`` adds to its environment; ``cpus`` confines the site to those cores, as if it had a
        machine of its own. ``superlink`` is the address it dials instead of the SuperLink's own (a link
        proxy in front of it, deploy/wan/proxy.py). ``args``: more ``fedsense client`` flags (``warm`` only).
        """
        address = superlink or f"127.0.0.1:{self.port}"
        if site_config is not None:
            self._site_configs[name] = Path(site_config).resolve()
        starts = sum(1 for p in self.logs.glob(f"supernode-{name}-*.log"))
        self._node_logs[name] = self.logs / f"supernode-{name}-{starts + 1}.log"
        if warm:
            command = [
                sys.executable,
                "-m",
                "client.supernode",
                "--insecure",
                "--superlink",
                address,
                "--site-config",
                str(self._site_configs[name]),
                "--runtime-port",
                str(free_port()),
                *args,
            ]
        else:
            command = [
                str(_BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                address,
                "--node-config",
                f"site-config='{self._site_configs[name]}'",
                "--port",
                str(free_port()),  # this SuperNode's local ClientApp Runtime API
            ]
        self.supernodes[name] = self._spawn(command, self._node_logs[name], env, cpus)

    def node_id(self, name: str, timeout: float = 60) -> int:
        """The SuperLink's id of site ``name``'s current SuperNode (a restart registers a new one)."""
        log = self._node_logs[name]
        match = wait_for(lambda: _NODE_ID.search(log.read_bytes()), timeout, f"{name}'s SuperNode to register")
        return int(match.group(1))

    def kill_supernode(self, name: str) -> None:
        """SIGKILL site ``name``'s SuperNode, its SuperExec and any running ClientApp, at once."""
        self.killed |= kill_tree(self.supernodes[name])

    def clientapp_running(self, name: str) -> bool:
        """Whether site ``name`` is executing a ClientApp right now, i.e. is in the middle of a task."""
        return any("flwr-clientapp" in cmd for cmd in process_tree(self.supernodes[name].pid).values())

    # runs --------------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """A ``flwr`` CLI command against this SuperLink with ``--format json``; its parsed output."""
        out = subprocess.run(
            [str(_BIN / "flwr"), *args, "--format", "json"],
            cwd=self.project,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        try:
            return dict(json.loads(out.stdout))
        except json.JSONDecodeError as exc:
            raise DeploymentError(f"flwr {' '.join(args)}: {out.stdout[-800:]} {out.stderr[-800:]}") from exc

    def submit(self, run_config: Mapping[str, Any]) -> int:
        """``flwr run`` the FedSense app with ``run_config`` overrides; returns the run id."""
        overrides = self.workdir / f"run-config-{time.monotonic_ns()}.toml"
        overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()), encoding="utf-8")
        result = self.flwr("run", str(self.project), CONNECTION, "--run-config", str(overrides))
        if not result.get("success"):
            raise DeploymentError(f"flwr run failed: {result}")
        return int(result["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it, e.g. ``running`` or ``finished:failed``."""
        runs = self.flwr("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        return str(runs[0]["status"]) if runs else "missing"

    def wait_finished(self, run_id: int, timeout: float) -> str:
        """Block until run ``run_id`` has finished; returns its status (``finished:completed`` etc.)."""

        def finished() -> str:
            status = self.status(run_id)
            return status if status.startswith("finished") else ""

        return wait_for(finished, timeout, f"run {run_id} to finish (logs: {self.logs})", interval=2.0)


def tiny_run(run_dir: Path, rounds: int, **overrides: object) -> dict[str, object]:
    """Run-config overrides for a fast federated run (a 4-channel U-Net, one local step per round).

    Federated evaluation is off unless asked for: these tests are about who trains, and every
    ClientApp task costs a process start.
    """
    return {
        "name": "reliability",
        "num-server-rounds": rounds,
        "strategy": "fedavg",
        "model-args": json.dumps({"chans": 4, "num_pool_layers": 2}),
        "local-steps": 1,
        "batch-size": 1,
        "fraction-evaluate": 0.0,
        "max-eval-slices": 1,
        "node-wait-timeout": 60.0,
        "run-dir": str(run_dir),
        "resume": False,
        **overrides,
    }
