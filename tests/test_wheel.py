"""An installed wheel works without the repository: ``fedsense data demo`` and a 1-round ``simulate``.

The wheel is built from a copy of the sources (nothing is written into the checkout) and installed with
``--no-deps`` into a fresh venv; the already-installed dependencies are made visible through a ``.pth``
file (torch is not downloaded again) and Flower's console scripts are recreated in the venv so every
Flower process runs the venv's interpreter, which imports FedSense from the wheel only.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SOURCES = ("pyproject.toml", "setup.py", "README.md", "common", "server", "client", "deploy/sites")


def _flower_scripts(bindir: Path, python: Path) -> None:
    """Flower's console scripts, run by the venv's interpreter (as pip would have written them)."""
    for ep in md.distribution("flwr").entry_points:
        if ep.group == "console_scripts":
            module, _, attr = ep.value.partition(":")
            script = bindir / ep.name
            script.write_text(
                f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]}\nsys.exit({attr}())\n"
            )
            script.chmod(0o755)


def test_installed_wheel_runs_the_demo_outside_the_repository(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    wheel = next(wheels.glob("fedsense-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "fedsense-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _flower_scripts(env_dir / "bin", python)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    where = subprocess.run(
        [str(python), "-c", "import server, common, client; print(server.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(purelib), where

    fedsense = str(env_dir / "bin" / "fedsense")
    demo = subprocess.run(
        [fedsense, "data", "demo", "--out", "demo", "--size", "32", "--subjects", "5"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    configs = sorted(str(p.relative_to(work)) for p in (work / "demo").glob("*.toml"))
    assert configs == ["demo/site-a.toml", "demo/site-b.toml", "demo/site-c.toml"]
    run = subprocess.run(
        [
            fedsense,
            "simulate",
            "--sites",
            *configs,
            "--rounds",
            "1",
            "--model",
            "unet",
            "--set",
            'model-args={"chans": 4, "num_pool_layers": 1}',
            "--local-steps",
            "1",
            "--set",
            "batch-size=1",
            "--set",
            "max-eval-slices=2",
            "--set",
            "num-samples=0",
            "--run-dir",
            "runs/wheel",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (work / "runs" / "wheel" / "checkpoints" / "round-0001.pt").is_file()
