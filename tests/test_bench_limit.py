"""bench.limit's "before" arm: the product's code at an older commit, run beside today's."""

import subprocess
from pathlib import Path

import pytest

from bench.limit import REPO, checkout


def test_checkout_gives_the_commits_files(tmp_path: Path) -> None:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    tree = checkout(head.stdout.strip(), tmp_path / "before")
    committed = subprocess.run(
        ["git", "-C", str(REPO), "show", "HEAD:common/dc.py"], capture_output=True, text=True, check=True
    ).stdout
    assert (tree / "common" / "dc.py").read_text() == committed
    assert (tree / "client" / "app.py").is_file() and (tree / "server" / "cli.py").is_file()


def test_an_unknown_commit_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--before-ref no-such-ref"):
        checkout("no-such-ref", tmp_path / "before")
