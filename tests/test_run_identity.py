"""Runs never mix: a resume continues a run directory only when the run's identity matches, and a run
directory this process cannot write is refused at start with the fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.errors import FedSenseError
from common.runconfig import RunConfig
from server.store import RESUME_IDENTITY_KEYS, RunDir

ROOT = Path(__file__).resolve().parent.parent


def config(**changes: object) -> dict[str, object]:
    return RunConfig.from_flat({"name": "r", "sites": "/a.toml,/b.toml", **changes}).to_flat()


def test_resume_with_the_same_identity_continues_and_may_add_rounds(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    store.init(config(), resume=True)
    store.init(config(**{"num-server-rounds": 9, "round-timeout": 10.0}), resume=True)
    assert store.read_config()["num-server-rounds"] == 9


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model", "varnet"),
        ("model-args", '{"chans": 8}'),
        ("sites", "/a.toml"),
        ("strategy", "fedavg"),
        ("site-caps", '{"a": 3}'),
        ("learning-rate", 0.5),
    ],
)
def test_resume_with_a_changed_identity_is_refused_naming_the_keys(tmp_path: Path, key: str, value: object) -> None:
    assert key in RESUME_IDENTITY_KEYS
    store = RunDir(tmp_path / "run")
    store.init(config(), resume=True)
    before = store.config_path.read_bytes()
    with pytest.raises(FedSenseError, match=f"cannot resume: the run in this directory differs in {key} "):
        store.init(config(**{key: value}), resume=True)
    assert store.config_path.read_bytes() == before, "the refused run must not touch the stored one"


def test_a_key_the_stored_run_predates_does_not_block_a_resume(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    old = {k: v for k, v in config().items() if k != "site-caps"}
    store.init(old, resume=True)
    store.init(config(), resume=True)


def test_a_run_directory_of_another_user_is_refused_with_the_fix() -> None:
    """What happened after `make demo` as one user and the container's ServerApp as another.

    As root (CI) the check runs in a child dropped to ``nobody``, the way the image drops to its user.
    """
    base = Path(tempfile.mkdtemp(prefix="fedsense-runs-"))  # pytest's own tmp dirs are private to their user
    base.chmod(0o755)
    run = base / "run"
    run.mkdir(mode=0o755)
    code = f"from server.store import RunDir; RunDir({str(run)!r}).check_writable()"
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to drop root")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
    else:
        run.chmod(0o555)
        command = [sys.executable, "-c", code]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    finally:
        run.chmod(0o755)
        shutil.rmtree(base)
    assert done.returncode != 0
    assert re.search(
        rf"{re.escape(str(run))}: run directory is not writable by uid \d+ \({re.escape(str(run))} is "
        r"owned by uid \d+, mode 0[57]55\).*Fix: `sudo chown -R",
        done.stderr,
    ), done.stderr[-2000:]


def test_a_run_directory_under_a_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    """Also what root sees (it may write anywhere else): the directory cannot even be created."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(FedSenseError, match=r"file/run: run directory is not writable .*Fix: "):
        RunDir(tmp_path / "file" / "run").check_writable()
