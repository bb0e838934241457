"""``fedsense-superexec``: a site's SuperExec that starts each ClientApp from a warm process.

Flower 1.41 runs every message a site receives in a fresh ``flwr-clientapp`` process (its
SuperExec ``SubprocessExecutor`` execs one per task; the ``warm`` executor it ships is an inert
Kubernetes pod, not a process pool). Each such process imports PyTorch, NumPy, h5py, nibabel and
Flower before the ClientApp computes: seconds per message, twice per round. This SuperExec is
Flower's own (same flags, same Runtime API protocol, same ``run_clientapp`` code path) with one
change: it imports those libraries once, and launches each task by ``fork`` of itself, so a task
starts with them already loaded. FedSense's own packages are not pre-imported: the child loads
the ClientApp from the run's FAB as ``flwr-clientapp`` would.

Run the SuperNode with ``--isolation process`` and this next to it::

    flower-supernode ... --isolation process --clientappio-api-address 127.0.0.1:9094
    fedsense-superexec --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as flower_superexec_loop
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from client.supernode_poll import install_object_pulls, resolve_poll_interval

logger = logging.getLogger(__name__)

#: What a ClientApp process would otherwise import on every message (the expensive part of its start).
#: Opacus (``client.app`` imports it through ``common.dp``) alone took 1.4 s per message on an idle
#: core: it pulls in ``torch.distributed.tensor`` and SymPy.
WARM_MODULES = (
    "numpy",
    "scipy.ndimage",
    "torch",
    "h5py",
    "nibabel",
    "pydantic",
    "opacus",
    "finufft",
    "prometheus_client",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> float:
    """Import ``modules`` in this process (before any task is forked) and make PyTorch's first optimiser
    step; returns the seconds it took."""
    started = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    _first_optimiser_step()
    return time.perf_counter() - started


def _first_optimiser_step() -> None:
    """One Adam step on a throwaway tensor: a process's first optimiser imports ``torch._dynamo`` and
    ``torch._inductor`` (0.5 s per training message when every task paid it again)."""
    import torch

    weight = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([weight])
    weight.sum().backward()
    optimiser.step()


class ForkExecutor(SubprocessExecutor):
    """Launch ClientApp tasks as forks of this (warm) process; any other task type as Flower does."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        certificates = None
        if not spec.insecure and spec.root_certificates_path is not None:
            certificates = Path(spec.root_certificates_path).read_bytes()
        pid = os.fork()
        if pid == 0:  # the task's process
            os._exit(_run_task(spec, certificates))
        self.children.add(pid)
        logger.debug("task %d: ClientApp forked as pid %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes (no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Running tasks end with the SuperNode (their ``parent_pid`` monitor), as flwr-clientapp's do."""
        self.reconcile()


def _run_task(spec: ExecutionSpec, certificates: bytes | None) -> int:
    """Flower's own ClientApp process body, in the forked child; returns its exit code."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        if spec.suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=certificates,
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        return 0
    except SystemExit as exc:  # flwr_exit ends the task with its exit code
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a task must never return into the SuperExec loop
        logger.exception("ClientApp task %d failed", spec.task_id)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> None:
    """``fedsense-superexec``: Flower's ``flower-superexec`` (same flags) with warm, forked ClientApps."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    # Before warm_up: an imported library (Opacus) configures the root logger at WARNING otherwise.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seconds = warm_up()
    if resolve_poll_interval(None, os.environ) is not None:  # FEDSENSE_POLL_INTERVAL=flower keeps Flower's waits
        # Inherited by every forked task: its pull of the message it was started for.
        install_object_pulls()
    logger.info("fedsense-superexec: libraries loaded once in %.1f s; ClientApp tasks are forked from here", seconds)
    flower_superexec_loop.get_executor = lambda *args, **kwargs: ForkExecutor()
    flower_superexec()


if __name__ == "__main__":
    main()
