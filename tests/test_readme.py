"""README's example commands: every ``fedsense`` line parses with the real CLI, and the "Using the trained
model" block runs as written, each line through bash in a fresh folder (globs expand as a user's would), on
a small stand-in for what ``make demo`` leaves: ``demo-data/`` at 64² with 2 slices per volume and the
site TOMLs' matrix to match, and a 1-step ``runs/demo``.

The ``fedsense`` lines of the first "Using it" block run as written too, in order, in a fresh folder holding
``deploy/sites/*.toml`` cut to 2 slices per volume and a 64² scanner matrix; the dashboard until its page answers, then Ctrl-C. Its
``flwr run .`` line (Flower's own CLI on the checkout, at the app's default sizes) is not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from client import cli as site_cli
from common.command import prepare_parser
from common.config import load_site_config
from common.data.demo import generate_demo
from common.runconfig import RunConfig
from server import cli
from server.baseline import Baseline

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_commands(section: str | None = None) -> list[str]:
    """The ``fedsense ...`` commands of README's bash blocks (of one ``## section``), comments and ``[...]`` dropped."""
    text = README.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).strip()
            if line.startswith("fedsense "):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_parses() -> None:
    commands = readme_commands()
    assert len(commands) >= 15
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            args = prepare_parser(cli.build_parser()).parse_args(argv)
            if args.command in cli.SITE_COMMANDS:
                prepare_parser(site_cli.build_parser()).parse_args([args.command, *args.rest])
        except SystemExit as exc:
            pytest.fail(f"README: `{command}` does not parse (exit {exc.code})")


@pytest.mark.slow
def test_using_the_trained_model_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "sites").mkdir(parents=True)
    for toml in sorted((ROOT / "deploy" / "sites").glob("*.toml")):
        text = re.sub(r"(?m)^matrix = .*$", "matrix = [64, 64]", toml.read_text(encoding="utf-8"))
        text = re.sub(r"(?m)^max_slices_per_volume = .*$", "max_slices_per_volume = 2", text)
        (tmp_path / "deploy" / "sites" / toml.name).write_text(text, encoding="utf-8")
    sites = sorted(str(p) for p in (tmp_path / "deploy" / "sites").glob("*.toml"))
    generate_demo(tmp_path / "demo-data", size=64, subjects=3, sites=[load_site_config(p) for p in sites])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def bash(command: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert proc.returncode == 0, f"README: `{command}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        return proc

    Baseline(
        "centralized",
        RunConfig.from_flat(
            {  # what `make demo` leaves in runs/demo, in seconds
                "name": "demo",
                "num-server-rounds": 1,
                "model": "unet",
                "model-args": '{"chans": 4, "num_pool_layers": 2}',
                "local-steps": 1,
                "batch-size": 2,
                "sites": ",".join(sites),
                "run-dir": str(tmp_path / "runs" / "demo"),
                "num-samples": 0,
                "max-eval-slices": 1,
            }
        ),
    ).execute()
    commands = readme_commands("Using the trained model")
    assert len(commands) == 5
    done = [bash(command) for command in commands]
    assert "evaluating cs on site-a (test split)" in done[2].stderr  # progress, also when stderr is a log file
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert len(list((tmp_path / "recon").glob("*.h5"))) == len(list((tmp_path / "demo-data" / "site-a").glob("*.h5")))
    assert list((tmp_path / "recon-t2").glob("*-T2.nii.gz"))


def _first_block_commands(section: str) -> list[str]:
    """The ``fedsense`` lines of the first bash block of README's ``## section`` (as :func:`readme_commands`)."""
    text = README.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block is not None
    lines = [
        re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).strip()
        for line in block.group(1).replace("\\\n", " ").splitlines()
    ]
    return [" ".join(line.split()) for line in lines if line.startswith("fedsense ")]


@pytest.mark.slow
def test_using_it_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "sites").mkdir(parents=True)
    for toml in sorted((ROOT / "deploy" / "sites").glob("*.toml")):
        text = re.sub(
            r"(?m)^max_slices_per_volume = .*$", "max_slices_per_volume = 2", toml.read_text(encoding="utf-8")
        )
        text = re.sub(r"(?m)^matrix = .*$", "matrix = [64, 64]", text)  # the scanner at the data's --size 64
        (tmp_path / "deploy" / "sites" / toml.name).write_text(text, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    commands = _first_block_commands("Using it")
    assert [c.split()[1] for c in commands] == ["data", "simulate", "baseline", "metrics", "metrics", "dashboard"]
    outputs = []
    for command in commands[:-1]:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert proc.returncode == 0, f"README: `{command}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        outputs.append(proc.stdout)
    assert "site-c" in outputs[3] and "status finished" in outputs[3]  # `metrics show`
    assert (tmp_path / "runs" / "fedsense-run" / "checkpoints" / "round-0002.pt").exists()
    assert (tmp_path / "runs" / "local" / "metrics.jsonl").exists() and list((tmp_path / "plots").iterdir())
    # "Should a site join?" asks it of these two runs.
    verdicts = readme_commands("Choosing a strategy and personalisation")
    assert [c.split()[1] for c in verdicts] == ["verdict", "verdict"], verdicts
    for command in verdicts:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert proc.returncode == 0, f"README: `{command}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert "site-b" in proc.stdout and "Traceback" not in proc.stderr

    port = int(commands[-1].split("--port ")[1].split()[0])
    dashboard = subprocess.Popen(
        ["bash", "-c", commands[-1]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, page = time.monotonic() + 60, ""
        while not page and dashboard.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode("utf-8", "replace")
            except OSError:
                time.sleep(0.3)
        assert "fedsense-run" in page or "<html" in page.lower(), dashboard.communicate(timeout=10)[0][-2000:]
    finally:
        os.killpg(dashboard.pid, signal.SIGINT)
        output = dashboard.communicate(timeout=30)[0]
    assert dashboard.returncode == 0 and "Traceback" not in output
