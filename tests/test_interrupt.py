"""Ctrl-C and SIGTERM: no process of a run survives it, the run says ``interrupted``, and it resumes.

The fast tests use a child that detaches a grandchild into a session of its own (what Flower's SuperLink
and Ray do); the slow test interrupts a real ``fedsense simulate`` after its first checkpoint. Both
check the process table itself: the test process is made a child subreaper for the duration, so any
process that escaped the command re-parents to the test and shows up among its descendants.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.proctree import ProcessTree, descendants
from tests.conftest import ROOT, write_small_sites

_LIBC = ctypes.CDLL(None, use_errno=True)
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process-tree handling is Linux-specific")

# A child that starts a grandchild in a new session, prints its pid and exits: an orphan, like Ray's raylet.
DETACH = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True,\n"
    "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(p.pid, flush=True)\n"
)


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.fixture
def subreaper() -> Iterator[set[int]]:
    """Make this process a subreaper; yields the descendants it had before (not the test's business)."""
    _LIBC.prctl(36, 1)
    before = set(descendants())
    try:
        yield before
    finally:
        _LIBC.prctl(36, 0)
        for pid in set(descendants()) - before:  # leave nothing behind even when the test failed
            os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def test_detached_grandchildren_are_stopped_on_exit() -> None:
    with ProcessTree(grace=2.0):
        out = subprocess.run([sys.executable, "-c", DETACH], capture_output=True, text=True, check=True)
        orphan = int(out.stdout)
        assert _alive(orphan) and orphan in descendants()  # re-parented to us, not to init
    assert not _alive(orphan)


def test_sigterm_raises_keyboard_interrupt_and_stops_children() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with ProcessTree(grace=2.0):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert child.wait(timeout=5) == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


# A child that exits 3 when stopped, after a moment of clean-up (long enough for the stopping loop to poll
# it): its exit code is its starter's to collect, not ProcessTree's.
EXIT_3_ON_SIGTERM = (
    "import os, signal, time\n"
    "def stop(*_):\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    time.sleep(0.5)\n"
    "    os._exit(3)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)
# A child that starts a grandchild in its own group (it dies with it and becomes an orphan) and prints its pid.
WITH_GRANDCHILD = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def test_cleanup_leaves_the_exit_code_of_our_own_child_to_its_popen() -> None:
    with ProcessTree(grace=5.0):
        child = subprocess.Popen([sys.executable, "-c", EXIT_3_ON_SIGTERM], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    assert child.wait(timeout=5) == 3  # was 0: the cleanup had reaped it, and Popen took "no child" for success
    child.stdout.close()


def test_orphans_of_the_command_are_reaped_not_left_as_zombies() -> None:
    with ProcessTree(grace=5.0):
        child = subprocess.Popen([sys.executable, "-c", WITH_GRANDCHILD], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        assert _alive(grandchild)
    assert child.wait(timeout=5) == -signal.SIGTERM
    child.stdout.close()
    assert not Path(f"/proc/{grandchild}").exists()  # stopped and reaped: not even a zombie is left


def test_a_sigterm_while_stopping_does_not_abandon_the_stop() -> None:
    """A supervisor's SIGTERM during the grace period must not skip what follows stop() (recording the run)."""
    after_stop: list[int] = []
    with pytest.raises(KeyboardInterrupt), ProcessTree(grace=5.0) as tree:
        child = subprocess.Popen([sys.executable, "-c", EXIT_3_ON_SIGTERM], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            after_stop.extend(tree.stop())  # the child takes 0.5 s to go; the SIGTERM arrives meanwhile
            raise
    assert after_stop == [child.pid] and child.wait(timeout=5) == 3
    child.stdout.close()


def test_sigint_raises_keyboard_interrupt_even_when_inherited_as_ignored() -> None:
    """A command started from a background shell job inherits SIGINT ignored: Ctrl-C must still stop it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt), ProcessTree(grace=2.0):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # what the caller had is back
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_ignored() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a background shell job starts with


def test_a_command_started_with_sigint_ignored_still_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The disposition a background job inherits: the command installs its own handler, so SIGINT stops it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "dashboard", str(tmp_path / "not-yet"), "--wait", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_sigint_ignored,
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]  # was: ignored, the dashboard served on for ever
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in output and "dashboard stopped" in output, output[-2000:]


# Enough rounds that Ctrl-C after the first checkpoint lands mid-run on an idle machine too: rounds this small
# take well under a second each, and a 3-round run once finished before the signal was handled.
ROUNDS = 12


def _run_command(sites: list[Path], run_dir: Path, *command: str) -> list[str]:
    """``fedsense COMMAND`` (``simulate``, ``baseline centralized``) of a tiny ``ROUNDS``-round run."""
    return [
        sys.executable,
        "-m",
        "server.cli",
        *command,
        "--sites",
        *map(str, sites),
        "--rounds",
        str(ROUNDS),
        "--model",
        "unet",
        "--set",
        'model-args={"chans": 4, "num_pool_layers": 1}',
        "--local-steps",
        "1",
        "--run-dir",
        str(run_dir),
        "--set",
        "batch-size=1",
        "--set",
        "max-eval-slices=2",
        "--set",
        "num-samples=0",
    ]


@pytest.mark.slow
def test_ctrl_c_during_simulate_leaves_no_process_and_the_run_resumes(tmp_path: Path, subreaper: set[int]) -> None:
    sites = write_small_sites(tmp_path / "sites", ("site-a", "site-c"), size=32, slices=2)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = _run_command(sites, run_dir, "simulate")
    # SIGINT at its default, as for a command typed at a terminal, even where the tests run as a background job
    # (which inherits it ignored: the cause of this test's old failures, a run that ignored Ctrl-C to its end).
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = run_dir / "checkpoints" / "round-0001.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert checkpoint.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "no checkpoint"
    running = set(descendants()) - subreaper - {proc.pid}
    assert running, "the simulation's processes should be running now"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "interrupted" in output

    left = set(descendants()) - subreaper
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if _alive(p)]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["status"] == "interrupted", config.get("status_detail")
    last = config["status_detail"]["last_complete_round"]
    assert 1 <= last < ROUNDS

    kept = (run_dir / "checkpoints" / f"round-{last:04d}.pt").stat().st_mtime_ns
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert json.loads((run_dir / "config.json").read_text())["status"] == "finished"
    # Resumed, not restarted: the rounds done before Ctrl-C were neither trained nor checkpointed again.
    assert (run_dir / "checkpoints" / f"round-{last:04d}.pt").stat().st_mtime_ns == kept
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r["round"] for r in records if r["site"] == "__global__" and r["phase"] == "train"]
    before = [r for r in trained if r <= last]
    assert sorted(before) == list(range(1, last + 1)) and set(trained) == set(range(1, ROUNDS + 1))
    assert (run_dir / "checkpoints" / f"round-{ROUNDS:04d}.pt").exists()
    assert not set(descendants()) - subreaper


@pytest.mark.slow
def test_sigterm_during_a_baseline_says_where_it_resumes_and_it_does(tmp_path: Path, subreaper: set[int]) -> None:
    """A real ``fedsense baseline`` stopped by SIGTERM (a supervisor, ``docker stop``) after its first checkpoint."""
    sites = write_small_sites(tmp_path / "sites", ("site-a", "site-c"), size=32, slices=2)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = _run_command(sites, run_dir, "baseline", "centralized")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = run_dir / "checkpoints" / "round-0001.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), proc.communicate(timeout=60) if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err and err.strip().endswith("fedsense: interrupted"), err[-2000:]
    left = set(descendants()) - subreaper
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if _alive(p)]
    config = json.loads((run_dir / "config.json").read_text())
    last = config["status_detail"]["last_complete_round"]
    assert config["status"] == "interrupted" and 1 <= last < ROUNDS, config
    assert f"{run_dir} resumes after round {last} when the same command is run again" in out, out[-2000:]

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming the interrupted run" in resumed.stdout
    assert json.loads((run_dir / "config.json").read_text())["status"] == "finished"
