"""Shared pieces of the benchmarks: small heterogeneous demo sites, per-slice scores, tables, memory.

The quality and cost benchmarks must see the same sites the product sees, so sites are copies of
``deploy/sites/*.toml`` (different coils, field strength, contrasts, masks) with only the size, the
amount of data and, where a benchmark asks for it, the acceleration changed; the data is the offline
MNI-anatomy demo data written by ``common.data.demo`` in the real file formats.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch import nn

from common.config import load_site_config
from common.data.dataset import SiteDataset
from common.data.demo import generate_demo
from common.data.loaders import make_loader
from common.metrics import nmse, psnr, ssim
from common.models import build_model
from common.runconfig import RunConfig
from common.training import predict, train

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
SITE_NAMES = ("site-a", "site-b", "site-c")
# The low-data scenario adds a fourth, benchmark-only site (bench/sites/site-d.toml).
LOW_DATA_SITE_NAMES = (*SITE_NAMES, "site-d")


def _holds_anything(path: Path) -> bool:
    """Whether ``path`` exists as anything but an empty folder."""
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def check_output(path: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse a benchmark output folder that already holds anything, unless ``--overwrite`` was given.

    Benchmarks rebuild their folder from scratch: a mistyped ``--out`` must not delete a user's files
    without asking. Checked before any work, so a refusal costs nothing.
    """
    if _holds_anything(path) and not overwrite:
        raise SystemExit(f"{option} {path}: exists and is not empty; pass --overwrite to replace it")


def fresh_output(path: Path, overwrite: bool, option: str = "--out") -> Path:
    """Make ``path`` an empty folder for a benchmark's sites, data and run dirs (see :func:`check_output`)."""
    check_output(path, overwrite, option)
    if _holds_anything(path):  # reached only with --overwrite
        logger.info("--overwrite: replacing %s", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def site_template(name: str) -> Path:
    """The TOML a benchmark site is copied from: a product site in deploy/sites, else bench/sites."""
    for folder in (ROOT / "deploy" / "sites", ROOT / "bench" / "sites"):
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise FileNotFoundError(f"no site config {name}.toml in deploy/sites or bench/sites")


Batch = dict[str, object]
Recon = Callable[[Batch], torch.Tensor]


def _set(text: str, key: str, value: str) -> str:
    """Replace ``key = ...`` (first match, any section) in a site TOML; refuse a key that is not there."""
    new, count = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text, count=1)
    if count != 1:
        raise ValueError(f"site template has no {key!r} line")
    return new


def write_sites(
    directory: Path,
    *,
    size: int,
    subjects: int,
    slices: int,
    acceleration: float | None = None,
    names: Sequence[str] = SITE_NAMES,
    center_fraction: float | None = None,
) -> list[Path]:
    """Copies of ``deploy/sites/<name>.toml`` at ``size``², with demo data written under ``directory/data``.

    ``acceleration`` overrides every site's R (their masks stay different); ``None`` keeps each site's own;
    ``center_fraction`` likewise overrides the fully sampled centre (the calibration lines at small sizes).
    """
    directory = directory.resolve()  # data_path in a site TOML is relative to the TOML, not to the cwd
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        text = site_template(name).read_text(encoding="utf-8")
        text = _set(text, "data_path", f'"{(directory / "data" / name).as_posix()}"')
        text = _set(text, "matrix", f"[{size}, {size}]")
        text = _set(text, "max_slices_per_volume", str(slices))
        text = _set(text, "subjects", str(subjects))
        if acceleration is not None:
            text = _set(text, "acceleration", repr(float(acceleration)))
        if center_fraction is not None:
            text = _set(text, "center_fraction", repr(float(center_fraction)))
        path = directory / f"{name}.toml"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    generate_demo(directory / "data", size=size, seed=0, sites=[load_site_config(p) for p in paths])
    return paths


def replicate_sites(templates: Sequence[Path], count: int, directory: Path) -> list[Path]:
    """``count`` site configs named site-001, ... cycling through ``templates`` and sharing their data.

    Scale tests need many sites, not many different data sets: each copy reads its template's files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        template = templates[i % len(templates)]
        text = _set(template.read_text(encoding="utf-8"), "name", f'"site-{i + 1:03d}"')
        path = directory / f"site-{i + 1:03d}.toml"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class SliceScore:
    """fastMRI metrics of one slice; the data range is the max of the slice's target *volume*."""

    site: str
    volume: str
    slice_idx: int
    psnr: float
    ssim: float
    nmse: float


def model_recon(model: nn.Module) -> Recon:
    """The model's reconstruction, cropped to the target, in eval mode: what the ClientApp evaluates."""
    model.eval()
    return partial(predict, model)


def _unscale(x: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    return (x / scale.to(x.dtype).view(-1, 1, 1)).numpy()


@torch.no_grad()
def score_slices(recon: Recon, loader: Iterable[Batch]) -> list[SliceScore]:
    """Per-slice PSNR / SSIM / NMSE of ``recon`` (a batch -> (B, h, w) image) over a loader's slices.

    Images are un-scaled to the data's own units first, as ``common.training.evaluate`` does, and each
    slice's PSNR / SSIM use its volume's target max, fastMRI's convention for the data range.
    """
    volumes: dict[tuple[str, str], dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for batch in loader:
        scale = batch["scale"]
        assert isinstance(scale, torch.Tensor)
        pred = _unscale(recon(batch).float(), scale)
        target = _unscale(batch["target"], scale)  # type: ignore[arg-type]
        for i in range(target.shape[0]):
            key = (str(batch["site"][i]), str(batch["fname"][i]))  # type: ignore[index]
            volumes[key][int(batch["slice_idx"][i])] = (target[i], pred[i])  # type: ignore[index]
    scores = []
    for (site, volume), slices in volumes.items():
        maxval = max(float(gt.max()) for gt, _ in slices.values())
        for idx in sorted(slices):
            gt, pr = slices[idx]
            scores.append(SliceScore(site, volume, idx, psnr(gt, pr, maxval), ssim(gt, pr, maxval), nmse(gt, pr)))
    return scores


def mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` (population std over the values) at ``digits`` decimals."""
    arr = np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (the benchmarks print these so the doc can quote them verbatim)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    """What the numbers were measured on, printed at the top of every benchmark's output."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{threads} intra-op thread(s) (torch.set_num_threads and OMP_NUM_THREADS), load average {load:.2f} at start"
    )


def start_bench(name: str, threads: int) -> float:
    """What every benchmark does first: log to the terminal, pin threads, print the machine line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads(threads)
    print(f"# bench.{name} — {machine_line(threads)}")
    return time.perf_counter()


def set_threads(threads: int) -> None:
    """Pin torch's threads here and, through OMP_NUM_THREADS, in the Flower processes started from here."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree[ppid].append(int(entry.name))
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/PID/smaps_rollup; (0, 0) once it has exited."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory:
    """Samples the memory of this process and all its descendants every ``interval`` s (Linux /proc).

    RSS summed over processes counts shared pages (PyTorch's libraries, Ray's object store) once per
    process that maps them; PSS splits shared pages between their users, so its sum is the tree's real
    footprint. Both peaks are kept.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_rss_kib = self.peak_pss_kib = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """One sample of the whole tree; updates the peaks."""
        tree, todo, pids = _children(), [os.getpid()], []
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(tree.get(pid, []))
        totals = [_memory_kib(pid) for pid in pids]
        self.peak_rss_kib = max(self.peak_rss_kib, sum(r for r, _ in totals))
        self.peak_pss_kib = max(self.peak_pss_kib, sum(p for _, p in totals))
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Stopwatch:
    """Named wall-clock timings of a benchmark's stages, logged as they finish and printed at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block under ``name``."""
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        logger.info("%s: %.1f s", name, self.seconds[name])


def _weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)) for k in states[0]}  # type: ignore[misc]


def emulate_fedavg(
    run: RunConfig, datasets: dict[str, dict[str, SiteDataset]], fp16: bool = False
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """FedAvg without Flower, yielding (round, global weights) after every round.

    Each site trains exactly as the ClientApp does (seed, loader order and ``augment`` draws, steps,
    ``precision``, its Adam state kept across rounds with ``client-optimizer = keep``) and the server
    averages as Flower's FedAvg does (weighted by training examples), so a run matches a Flower simulation
    of the same config up to float rounding, at none of the framework's cost: what long-budget and
    transport experiments need. With ``fp16`` only what travels is rounded: the global weights on the way
    down and each site's update (its weights minus what it received) on the way up; the server keeps fp32
    weights and adds the averaged update to them.
    """
    torch.manual_seed(run.seed)
    state = {k: v.detach().clone() for k, v in build_model(run.model, **run.model_kwargs).state_dict().items()}
    keep = run.client_optimizer == "keep"
    kept: dict[str, dict[str, object]] = {}  # each site's Adam state, as the ClientApp remembers it
    for rnd in range(1, run.num_server_rounds + 1):
        received = {k: v.half().float() for k, v in state.items()} if fp16 else state
        sent, weights = [], []
        for site, splits in datasets.items():
            torch.manual_seed(run.seed + rnd)
            model = build_model(run.model, **run.model_kwargs)
            model.load_state_dict(received)
            optimiser = torch.optim.Adam(model.parameters(), lr=run.learning_rate)
            if keep and site in kept:
                optimiser.load_state_dict(kept[site])
            loader = make_loader(
                splits["train"], run.batch_size, shuffle=True, seed=run.seed + rnd, augment=run.augment
            )
            result = train(
                model,
                loader,
                epochs=run.local_epochs,
                steps=run.local_steps,
                lr=run.learning_rate,
                loss=run.loss,
                optimiser=optimiser,
                precision=run.precision,
            )
            if keep:
                kept[site] = copy.deepcopy(optimiser.state_dict())
            local = {k: v.detach().clone() for k, v in model.state_dict().items()}
            sent.append({k: (local[k] - received[k]).half() for k in local} if fp16 else local)
            weights.append(result.num_examples)
        average = _weighted_mean(sent, weights)
        state = {k: state[k] + average[k] for k in state} if fp16 else average
        yield rnd, state
