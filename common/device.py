"""Where the network runs (CPU or CUDA) and at which precision (fp32 or bf16 autocast).

A hospital's GPU server should train and reconstruct at GPU speed, and a CPU with native bfloat16
(AVX-512 BF16 / AMX) runs the convolutions about 1.4x faster under bf16 autocast. Only the network's
real-valued layers are autocast: k-space, FFTs, coil combination, data consistency, the loss and the
metrics stay float32 / complex64 (autocast leaves complex and FFT ops alone, and
:func:`common.fft.channels_to_complex` lifts a bf16 network output back to float32 before it becomes
complex). Weights always travel and are stored as CPU float32 tensors, whatever the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")


def resolve_device(spec: str, source: str = "device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a :class:`ConfigError`."""
    if spec not in DEVICES:
        raise ConfigError(f"{source}: must be one of {', '.join(DEVICES)}, got {spec!r}")
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: 'cuda' requested but torch sees no CUDA device on this machine")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast of the network's layers on ``device``; a no-op for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def cpu_allotment(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: ``OMP_NUM_THREADS`` when set (Ray sets it to a simulated site's
    ``--client-cpus``), else the smaller of the CPU affinity and the container's cgroup quota.

    torch sizes its thread pool by the machine's cores, so a site container limited to 2 of 32 CPUs
    (``docker run --cpus 2``) would run 32 threads on 2 CPUs' worth of time slices.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (cgroup_root / "cpu.max").read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def use_cpu_allotment() -> int:
    """Size torch's intra-op thread pool to :func:`cpu_allotment` (once per process); returns the count."""
    threads = cpu_allotment()
    if torch.get_num_threads() != threads:
        logger.info("torch threads: %d -> %d (the site's CPU allotment)", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads


def batch_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to ``device`` (non-blocking from pinned memory); other values unchanged."""
    if device.type == "cpu":
        return dict(batch)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as detached, contiguous CPU tensors: what is sent, stored and exported."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
