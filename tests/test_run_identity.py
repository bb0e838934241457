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


def test_site_configs_are_the_same_site_by_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A baseline records the paths as typed, simulate resolves them: ``demo/a.toml`` is ``/…/demo/a.toml``."""
    monkeypatch.chdir(tmp_path)
    store = RunDir(tmp_path / "run")
    store.init(config(sites="demo/a.toml,demo/b.toml"), resume=True)
    absolute = f"{tmp_path / 'demo' / 'a.toml'},{tmp_path / 'demo' / 'b.toml'}"
    store.init(config(sites=absolute), resume=True)
    store.init(config(sites="./demo/a.toml,demo/../demo/b.toml"), resume=False)  # the full identity check too
    with pytest.raises(FedSenseError, match="differs in sites"):
        store.init(config(sites="demo/b.toml,demo/a.toml"), resume=True)  # the order is the partition


@pytest.mark.parametrize(
    ("baseline", "status", "continues"),
    [
        (None, "interrupted", True),
        (None, "failed", True),  # resumes from its last checkpoint
        (None, "running", True),  # a crashed process never wrote its end
        (None, "finished", False),
        (None, "finished-without-sites", False),
        ("centralized", "finished", False),  # simulate never continues a baseline...
        ("centralized", "interrupted", False),
    ],
)
def test_simulate_continues_only_an_unfinished_federated_run(
    tmp_path: Path, baseline: str | None, status: str, continues: bool
) -> None:
    from server import cli

    store = RunDir(tmp_path / "run")
    store.init({**config(), **({"baseline": baseline} if baseline else {})}, resume=False)
    store.set_status(status)
    assert cli._continues(store, baseline=None) is continues
    assert not cli._continues(store, "local")  # ...nor a baseline another kind of run
    rounds = int(store.read_config()["num-server-rounds"])
    # More rounds continue a finished federated run (and nothing else it would not continue anyway).
    assert cli._continues(store, baseline=None, rounds=rounds + 2) is (baseline is None)
    assert cli._continues(store, baseline=None, rounds=rounds) is continues
    if not continues:
        with pytest.raises(FedSenseError, match=r"holds an earlier run; pass --overwrite to replace it, or choose"):
            store.check_fresh(resume=False, overwrite=False)


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
        # another user's folder is handed over; one's own read-only folder only needs its mode changed
        r"owned by uid \d+, mode 0[57]55\).*Fix: `(sudo chown -R \d+:\d+|chmod -R u\+w) " + re.escape(str(run)) + "`",
        done.stderr,
    ), done.stderr[-2000:]


def test_a_run_directory_under_a_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    """Also what root sees (it may write anywhere else): the directory cannot even be created."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file/run: run directory is not writable .*Fix: choose another"):
        RunDir(tmp_path / "file" / "run").check_writable()  # an OSError: the file system said no (exit 4)
