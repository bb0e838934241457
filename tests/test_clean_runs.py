"""``make clean`` removes run folders that hold files a container wrote as its uid 10001
(deploy/clean-runs.sh: through a throwaway container of the local base image when ``rm`` may not).

Run as root, ``rm`` could remove anything: the script runs as root without capabilities (setpriv), for
which another user's folder is as closed as it is for a normal user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.docker
BASE_IMAGE = os.environ.get("BASE_IMAGE", "fedsense/base:bookworm")


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create files of uid 10001")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's capabilities")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def _container_runs(tmp_path: Path) -> Path:
    """``runs/`` as an older compose run left it: a run folder owned by uid 10001."""
    old = tmp_path / "runs" / "old-run"
    (old / "checkpoints").mkdir(parents=True)
    (old / "metrics.jsonl").write_text("{}\n")
    (old / "checkpoints" / "round-0001.pt").write_bytes(b"x")
    for path in [old, *old.rglob("*")]:
        os.chown(path, 10001, 10001)
    return tmp_path / "runs"


def test_clean_removes_runs_a_container_wrote(tmp_path: Path) -> None:
    prefix = _as_user()
    if (
        not shutil.which("docker")
        or subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False).returncode != 0
    ):
        pytest.skip(f"no Docker engine or no {BASE_IMAGE} (make images builds it)")
    runs = _container_runs(tmp_path)
    plain = subprocess.run([*prefix, "rm", "-rf", str(runs)], capture_output=True, check=False)
    assert plain.returncode != 0 and (runs / "old-run" / "metrics.jsonl").exists()  # what users ran into
    done = subprocess.run(
        [*prefix, "bash", str(ROOT / "deploy" / "clean-runs.sh"), "runs"],
        cwd=tmp_path,
        env={**os.environ, "BASE_IMAGE": BASE_IMAGE},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not runs.exists() and list(tmp_path.iterdir()) == []


def test_clean_without_the_image_says_how_and_removes_nothing(tmp_path: Path) -> None:
    prefix = _as_user()
    runs = _container_runs(tmp_path)
    done = subprocess.run(
        [*prefix, "bash", str(ROOT / "deploy" / "clean-runs.sh"), "runs"],
        cwd=tmp_path,
        env={**os.environ, "BASE_IMAGE": "fedsense/no-such-image:none"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "sudo rm -rf runs" in done.stderr, done.stderr
    assert (runs / "old-run" / "metrics.jsonl").read_text() == "{}\n"
