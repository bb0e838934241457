"""The coordinating centre's side of the Control API, through the public ``flwr`` CLI (JSON output).

``register``: admit the sites' SuperNode keys (``flwr supernode register``); re-running is a no-op.
``submit``: start the federated run (``flwr run``) and wait until it has finished; exit 0 only if
Flower reports it completed. Both talk HTTPS to the SuperLink, verified with the deployment CA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

logger = logging.getLogger("fedsense.control")

CONNECTION = "fedsense"


def write_connection(superlink: str, root_cert: Path) -> None:
    """The SuperLink connection lives in $FLWR_HOME/config.toml since Flower 1.2x ("[superlink.NAME]")."""
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {"default": CONNECTION, CONNECTION: {"address": superlink, "root-certificates": str(root_cert)}}
    }
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def flwr_json(*args: str) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; its stdout is one JSON object with ``success`` (exit code is 0 either way)."""
    proc = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, check=False)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {"success": False, "error-message": (proc.stdout + proc.stderr).strip()}
    return result


def wait_for_superlink(timeout: float) -> None:
    """The Control API answers once the SuperLink is up; compose's healthcheck only sees the port."""
    deadline = time.monotonic() + timeout
    while True:
        result = flwr_json("supernode", "list", CONNECTION)
        if result.get("success"):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"SuperLink not reachable: {result.get('error-message')}")
        time.sleep(2)


def register(sites: list[str], keys_dir: Path, timeout: float) -> int:
    """Register each site's public key; "already in use" means an earlier run registered it."""
    wait_for_superlink(timeout)
    for site in sites:
        result = flwr_json("supernode", "register", str(keys_dir / f"{site}.pub"), CONNECTION, "--name", site)
        message = str(result.get("error-message", ""))
        if result.get("success"):
            logger.info("registered %s as node %s", site, result.get("node-id"))
        elif "already in use" in message:
            logger.info("%s: key already registered", site)
        else:
            logger.error("%s: registration failed: %s", site, message)
            return 1
    return 0


def stage_app(app_dir: Path) -> Path:
    """A writable copy of the app without ``[tool.flwr.federations]``: ``flwr run`` would otherwise
    migrate that legacy table into $FLWR_HOME and rewrite pyproject.toml in place."""
    stage = Path(tempfile.mkdtemp(prefix="fedsense-app-")) / "app"
    shutil.copytree(app_dir, stage, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pyproject = stage / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    pyproject.write_text(tomli_w.dumps(config), encoding="utf-8")
    return stage


def submit(app_dir: Path, run_config: list[str], timeout: float, poll: float) -> int:
    """Start the run, follow its status, print its log; 0 iff Flower reports ``finished:completed``."""
    wait_for_superlink(timeout)
    stage = stage_app(app_dir)
    args = ["run", str(stage), CONNECTION]
    for override in run_config:
        args += ["--run-config", override]
    started = flwr_json(*args)
    shutil.rmtree(stage.parent, ignore_errors=True)
    if not started.get("success") or not started.get("run-id"):
        logger.error("flwr run failed: %s", started.get("error-message", started))
        return 1
    run_id = str(started["run-id"])
    logger.info("run %s submitted (%s)", run_id, " ".join(run_config))
    deadline = time.monotonic() + timeout
    status = ""
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        listed = flwr_json("list", CONNECTION, "--run-id", run_id)
        runs = listed.get("runs") or []
        if runs and runs[0].get("status") != status:
            status = str(runs[0]["status"])
            logger.info("run %s: %s", run_id, status)
        if status.startswith("finished"):
            break
        time.sleep(poll)
    else:
        logger.error("run %s not finished after %.0f s (status %r)", run_id, timeout, status)
        subprocess.run(["flwr", "stop", run_id, CONNECTION], check=False)
    subprocess.run(["flwr", "log", run_id, CONNECTION, "--show"], check=False, stdout=sys.stderr)
    if status == "finished:completed":
        logger.info("run %s completed", run_id)
        return 0
    logger.error("run %s ended as %r: %s", run_id, status, runs[0].get("status-details") if runs else "")
    return 1


def main(argv: list[str] | None = None) -> int:
    """``flwr_control.py register|submit --superlink HOST:PORT ...`` (see deploy/docker/entrypoint.sh)."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("register", "submit"):
        p = sub.add_parser(name)
        p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
        p.add_argument("--root-cert", type=Path, default=Path("/keys/ca.crt"))
        p.add_argument("--timeout", type=float, default=float(os.environ.get("FEDSENSE_TIMEOUT", "1800")))
    p = sub.choices["register"]
    p.add_argument("--sites", required=True, help="space-separated site names")
    p.add_argument("--keys-dir", type=Path, default=Path("/keys/sites"), help="holds SITE.pub per site")
    p = sub.choices["submit"]
    p.add_argument("--app", type=Path, default=Path(os.environ.get("FEDSENSE_APP", "/opt/fedsense-app")))
    p.add_argument("--run-dir", required=True, help="where the ServerApp writes metrics and checkpoints")
    p.add_argument(
        "--run-config", action="append", default=[], help="extra KEY=VALUE overrides (default: $FEDSENSE_RUN_CONFIG)"
    )
    p.add_argument("--poll", type=float, default=5.0)
    args = parser.parse_args(argv)

    write_connection(args.superlink, args.root_cert)
    if args.command == "register":
        return register(args.sites.split(), args.keys_dir, args.timeout)
    # Each override string is parsed by flwr as space-separated TOML pairs (quotes kept).
    env_config = os.environ.get("FEDSENSE_RUN_CONFIG", "").strip()
    overrides = args.run_config or ([env_config] if env_config else [])
    # The run directory is fixed by the deployment (the ServerApp's ./runs mount); the run is named after it.
    overrides = [*overrides, f"run-dir={json.dumps(args.run_dir)}"]
    if not any(o.lstrip().startswith("name=") or " name=" in o for o in overrides):
        overrides.append(f"name={json.dumps(Path(args.run_dir).name)}")
    return submit(args.app, overrides, args.timeout, args.poll)


if __name__ == "__main__":
    raise SystemExit(main())
