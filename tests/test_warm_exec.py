"""Warm ClientApps: ``fedsense client`` runs its SuperNode in process isolation beside ``fedsense-superexec``,
which forks each ClientApp task from a process that has PyTorch and Flower loaded already."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from client.supernode import build_parser, build_superexec_command, build_supernode_command
from deployment import Deployment, alive, process_tree, tiny_run
from server.store import GLOBAL_SITE, RunDir


def test_the_warm_command_pair(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("", encoding="utf-8")
    warm = build_supernode_command("link:9092", None, None, site, insecure=True, runtime_port=9200, warm=True)
    assert warm[-6:] == ["--isolation", "process", "--host", "127.0.0.1", "--port", "9200"]
    cold = build_supernode_command("link:9092", None, None, site, insecure=True, runtime_port=9200)
    assert "--isolation" not in cold and cold[-2:] == ["--port", "9200"]
    exec_cmd = build_superexec_command(9200, 4321)
    assert exec_cmd[0].endswith("fedsense-superexec")
    assert exec_cmd[1:] == ["--runtime-api-address", "127.0.0.1:9200", "--insecure", "--parent-pid", "4321"]
    assert not build_parser().parse_args(["--superlink", "a:1", "--site-config", "s"]).cold_clientapps


def _modules_around(task: str) -> tuple[set[str], set[str]]:
    """``sys.modules`` names in a fresh process after ``warm_up()``, before and after running ``task`` (Python
    source): what they differ by, a forked ClientApp task would import again on every message."""
    code = (
        "import json, sys\nfrom client.warm_exec import warm_up\nwarm_up()\nbefore = sorted(sys.modules)\n"
        f"{task}\nprint(json.dumps([before, sorted(sys.modules)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return set(before), set(after)


def test_a_forked_clientapp_imports_no_third_party_library_the_warm_process_lacks() -> None:
    # Whatever client.app pulls in beyond the warm list is imported again by every task (Opacus did:
    # 1.4 s per message).
    before, after = ({name.split(".")[0] for name in names} for names in _modules_around("import client.app"))
    new = after - before - set(sys.stdlib_module_names) - {"client", "common"}
    assert not new, f"imported per task, not warm: {sorted(new)}"


def test_a_forked_task_s_first_optimiser_imports_nothing() -> None:
    before, after = _modules_around(
        "import torch\n"
        "model = torch.nn.Conv2d(1, 1, 3)\n"
        "optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)\n"
        "model(torch.zeros(1, 1, 8, 8)).sum().backward()\n"
        "optimiser.step()"
    )
    new = sorted(after - before)
    assert not new, f"imported by every task's first training step: {new[:10]} ({len(new)} modules)"


@pytest.mark.slow
def test_warm_and_cold_sites_train_and_evaluate_together(small_sites: list[Path], tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    config = tiny_run(
        store.path,
        rounds=2,
        **{
            "fraction-evaluate": 1.0,
            "min-available-nodes": 3,
            "min-train-nodes": 3,
            "min-evaluate-nodes": 3,
            "round-timeout": 300.0,
        },
    )
    warm = {"site-a", "site-b"}
    seen: dict[str, set[str]] = {name: set() for name in ("site-a", "site-b", "site-c")}
    stop = threading.Event()
    with Deployment(tmp_path / "deployment") as deployment:
        for path in small_sites:
            deployment.start_supernode(path.stem, path, warm=path.stem in warm)

        def watch() -> None:
            while not stop.wait(0.2):
                for name, proc in deployment.supernodes.items():
                    seen[name] |= {cmd for cmd in process_tree(proc.pid).values()}

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            run_id = deployment.submit(config)
            status = deployment.wait_finished(run_id, 600)
        finally:
            stop.set()
            watcher.join(timeout=5)
        logs = {name: deployment._node_logs[name].read_text(errors="replace") for name in seen}
    assert status == "finished:completed", logs
    assert deployment.killed and not [pid for pid in deployment.killed if alive(pid)], "processes left behind"
    for rnd in (1, 2):
        for phase in ("train", "evaluate"):
            sites = {r["site"] for r in store.read_metrics() if r["round"] == rnd and r["phase"] == phase}
            assert sites == {"site-a", "site-b", "site-c", GLOBAL_SITE}, (rnd, phase)
    for name in warm:
        assert "ClientApp tasks are forked from here" in logs[name]
        assert not [cmd for cmd in seen[name] if "flwr-clientapp" in cmd], "a warm site exec'd a ClientApp process"
    assert [cmd for cmd in seen["site-c"] if "flwr-clientapp" in cmd], "the cold site runs Flower's own processes"
