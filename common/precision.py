"""``precision = auto``: fp32 or bf16 autocast of the network, whichever this machine runs faster.

Whether bf16 autocast pays depends on the CPU (native AVX-512 BF16 / AMX or emulation), the model's layer
mix (a U-Net's instance norms and a cascade's small convolutions gain differently), the slice shape and the
batch. A fixed rule gets some of these wrong, so ``auto`` times a few real training (or inference) steps of
the model on the first batch in each precision, once, and keeps the decision on disk keyed by everything it
depends on: torch version, device (GPU name, or CPU model, capability and bf16 flags), thread count, the
model's architecture, the batch's shapes and the mode. bf16 is used where it is at least
:data:`MIN_SPEEDUP` times faster; fp32 otherwise (a tie is not worth bf16's rounding). Sites that share a
machine's cores (compose, simulate) make CPU time a poor clock once their threads outnumber the cores: a
measurement whose paired ratios vary by more than :data:`MAX_SPREAD` is taken again on one thread, and one
that is still noise gives fp32 for that process without being cached.

The cache lives in ``$FEDSENSE_PRECISION_CACHE`` (``off`` disables it: every process measures again),
else ``$XDG_CACHE_HOME/fedsense/precision``. ``$FEDSENSE_AUTO_PRECISION`` (``fp32`` or ``bf16``) pins what
``auto`` means on a machine without measuring: for an operator who measured already, or a test session
that must reproduce exact fp32 numbers. Timing runs on a copy of the model with its own optimiser and
the global RNG state restored afterwards, so choosing never changes what training computes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from common.atomic import atomic_write_bytes
from common.device import PRECISIONS, autocast, cpu_has_bf16
from common.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "fedsense-precision/1"
ENV_DIR = "FEDSENSE_PRECISION_CACHE"
ENV_PIN = "FEDSENSE_AUTO_PRECISION"
#: bf16 must be at least this much faster than fp32 to be chosen.
MIN_SPEEDUP = 1.1
#: Paired fp32/bf16 steps whose ratios differ by more than this (largest / smallest) are noise, not a
#: measurement. Measured on the 2-core CPU: one process alone, or three at one thread each, 1.05-1.45;
#: three processes at two threads each (compose's sites on one machine) 3.8-14.7, with best-of ratios from
#: 0.71 to 1.31 for one U-Net: CPU time is no clock once OpenMP threads outnumber the cores.
MAX_SPREAD = 2.0

Mode = Literal["train", "infer"]
Precision = Literal["fp32", "bf16"]
#: ``measure(model, batch, device, mode) -> {"fp32": seconds per step, "bf16": seconds per step, "spread": ...}``
#: (``spread``, optional: the largest over the smallest fp32/bf16 ratio of the paired repeats).
Measure = Callable[[nn.Module, Mapping[str, Any], torch.device, str], dict[str, float]]

_decided: dict[str, Precision] = {}


def default_cache_dir() -> Path | None:
    """``$FEDSENSE_PRECISION_CACHE`` (``off`` disables it), else ``$XDG_CACHE_HOME/fedsense/precision``."""
    value = os.environ.get(ENV_DIR)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedsense" / "precision"


def machine_facts(device: torch.device) -> dict[str, Any]:
    """What the speed of either precision depends on, besides the model and the data."""
    facts: dict[str, Any] = {"torch": torch.__version__, "device": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        return facts
    facts["cpu"] = platform.processor() or platform.machine()
    facts["capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            info = fh.read()
    except OSError:
        info = ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    facts["cpu"] = names[0] if names else facts["cpu"]
    facts["bf16_flags"] = sorted({f for f in info.split() if f in ("avx512_bf16", "amx_bf16", "amx_tile")})
    return facts


def architecture(model: nn.Module) -> list[Any]:
    """The model's structure without its values: module types and every weight's name, shape and dtype.

    (Not ``repr(model)``: it prints learned values such as a DC layer's lambda, which change every round.)
    """
    modules = [[name, type(m).__qualname__] for name, m in model.named_modules()]
    weights = [[name, list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()]
    return [modules, weights]


def decision_key(facts: Mapping[str, Any], model: nn.Module, batch: Mapping[str, Any], mode: str) -> str:
    """SHA-256 over the machine, the model's architecture, the batch's tensor shapes and the mode."""
    shapes = {k: [list(v.shape), str(v.dtype)] for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor)}
    payload = json.dumps(
        {"format": FORMAT, "facts": dict(facts), "model": architecture(model), "shapes": shapes, "mode": mode},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def decide(timings: Mapping[str, float], min_speedup: float = MIN_SPEEDUP) -> Precision:
    """bf16 when fp32's seconds per step are at least ``min_speedup`` times bf16's, else fp32."""
    return "bf16" if timings["fp32"] >= min_speedup * timings["bf16"] else "fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    batch: Mapping[str, Any],
    device: torch.device,
    mode: str,
    *,
    repeats: int = 5,
    clock: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Best-of-``repeats`` seconds per step in each precision, after one untimed warm-up step each, and the
    ``spread`` of the repeats' fp32/bf16 ratios (largest / smallest: see :data:`MAX_SPREAD`).

    On a CPU the clock is this process's CPU time (``time.process_time``), not wall time: a site's
    server is often shared, and other processes' load would otherwise decide the precision (and the
    decision is cached). On CUDA it is wall time around synchronised steps.

    A training step is forward, a stand-in loss (the output's mean magnitude: the loss itself runs in
    fp32 either way), backward and an Adam step, on a copy of ``model``; an inference step is a
    ``no_grad`` forward pass in eval mode. The precisions alternate, so a burst of load elsewhere on a
    shared machine slows both alike, and the best repeat is kept (load only ever slows a step down).
    """
    clock = clock or (time.perf_counter if device.type == "cuda" else time.process_time)
    twin = copy.deepcopy(model).to(device)
    inputs = tuple(batch[k] for k in ("masked_kspace", "mask", "sens_maps"))
    optimiser = torch.optim.Adam(twin.parameters(), lr=1e-6) if mode == "train" else None
    twin.train(mode == "train")

    def step(precision: str) -> None:
        if optimiser is None:
            with torch.no_grad(), autocast(device, precision):
                twin(*inputs)
            return
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = twin(*inputs)
        out.float().abs().mean().backward()
        optimiser.step()

    best = {"fp32": float("inf"), "bf16": float("inf")}
    ratios = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for precision in best:
            step(precision)  # warm-up: allocator, kernel selection, bf16 weight casts
        for _ in range(repeats):
            seconds = {}
            for precision in best:
                _sync(device)
                start = clock()
                step(precision)
                _sync(device)
                seconds[precision] = clock() - start
                best[precision] = min(best[precision], seconds[precision])
            ratios.append(seconds["fp32"] / max(seconds["bf16"], 1e-12))
    return {**best, "spread": max(ratios) / max(min(ratios), 1e-12)}


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bf16_candidate(device: torch.device) -> bool:
    """Whether bf16 could win here at all: a bf16-capable GPU, or a CPU with native bf16 (emulation never does)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_bf16()


def choose_precision(
    spec: str,
    model: nn.Module,
    batch: Mapping[str, Any],
    device: torch.device | str,
    mode: Mode = "train",
    *,
    source: str = "precision",
    measure_fn: Measure | None = None,
) -> Precision:
    """The precision to run ``model`` at: ``spec`` itself, or for ``auto`` the measured (cached) choice."""
    if spec not in PRECISIONS:
        raise ConfigError(f"{source}: must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec != "auto":
        return spec  # type: ignore[return-value]
    device = torch.device(device)
    if not bf16_candidate(device):
        return "fp32"
    pinned = os.environ.get(ENV_PIN, "").strip().lower()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ConfigError(f"${ENV_PIN}: must be fp32 or bf16, got {pinned!r}")
        return pinned  # type: ignore[return-value]
    key = decision_key(machine_facts(device), model, batch, mode)
    if key in _decided:
        return _decided[key]
    directory = default_cache_dir()
    cached = _load(directory, key) if directory is not None else None
    if cached is not None:
        _decided[key] = cached
        return cached
    measure_with = measure_fn or measure
    timings = measure_with(model, batch, device, mode)
    threads = torch.get_num_threads()
    if timings.get("spread", 1.0) > MAX_SPREAD and device.type == "cpu" and threads > 1:
        # Other processes' threads compete for the cores: one thread's CPU time still measures the kernels.
        logger.warning(
            "precision auto (%s): fp32/bf16 ratios of paired steps varied %.1fx at %d threads (other processes "
            "compete for this CPU); measuring again on one thread",
            mode,
            timings["spread"],
            threads,
        )
        with _threads(1):
            timings = measure_with(model, batch, device, mode)
        threads = 1
    noisy = timings.get("spread", 1.0) > MAX_SPREAD
    choice = "fp32" if noisy else decide(timings)
    logger.info(
        "precision auto (%s, %s, measured at %d thread(s)): fp32 %.3f s/step, bf16 %.3f s/step (%.2fx) -> %s",
        mode,
        device.type,
        threads,
        timings["fp32"],
        timings["bf16"],
        timings["fp32"] / timings["bf16"],
        choice,
    )
    _decided[key] = choice
    if noisy:  # fp32, the precision that is never a regression; a later process measures again
        logger.warning(
            "precision auto (%s): timings too noisy to decide (ratios varied %.1fx); fp32 for this process, not cached",
            mode,
            timings["spread"],
        )
        return choice
    if directory is not None:
        _store(
            directory,
            key,
            {
                "format": FORMAT,
                "choice": choice,
                "seconds_per_step": {k: timings[k] for k in ("fp32", "bf16")},
                "measured_threads": threads,
                "mode": mode,
                "facts": machine_facts(device),
            },
        )
    return choice


def _load(directory: Path, key: str) -> Precision | None:
    """The cached choice for ``key``; None when absent, unreadable or not ours (then it is measured again)."""
    try:
        data = json.loads((directory / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("choice") not in ("fp32", "bf16"):
        return None
    choice: Precision = data["choice"]  # checked above: "fp32" or "bf16"
    return choice


def _store(directory: Path, key: str, record: dict[str, Any]) -> None:
    """Write the decision atomically; a read-only or full cache directory only costs a re-measurement."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / f"{key}.json", json.dumps(record, indent=1, sort_keys=True).encode())
    except OSError as exc:
        logger.warning("precision cache %s not written: %s", directory, exc)
