"""What federation costs: framework overhead per round, bytes per round, scaling with sites, fp16 updates.

Sections (run one, or ``all``)::

    python -m bench.cost overhead   # real Flower simulation: round wall time minus the sites' local compute
    python -m bench.cost bytes      # model bytes on the wire per round and site, per model
    python -m bench.cost scale      # 4, 8, 16, 32 simulated sites: round time and peak memory
    python -m bench.cost fp16       # fp16 transport of weights and updates: bytes and quality
    python -m bench.cost parallel   # 4 equal sites: Flower's default 2 CPUs per site vs --client-cpus 1
    python -m bench.cost index      # a 200-volume fastMRI site: time to a ready site, cold vs warm index cache
    python -m bench.cost clientapps # local deployment (real SuperLink + SuperNodes): Flower's per-message
                                    # flwr-clientapp processes vs fedsense-superexec's warm forks
    python -m bench.cost local      # the same with each site on cores of its own (when the machine has
                                    # enough), Flower's waits vs FedSense's, short and >= 30 s training

``overhead`` reads everything from the run's metrics.jsonl: the sites' ``compute-seconds`` (their local
training / evaluation time) and the ServerApp's ``seconds`` and ``overhead_seconds`` per phase.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_to_proto
from torch import nn

from bench.harness import (
    TreeMemory,
    check_output,
    emulate_fedavg,
    fresh_output,
    markdown_table,
    mean_std,
    model_recon,
    replicate_sites,
    score_slices,
    start_bench,
    write_sites,
)
from bench.quality import MODELS as QUALITY_MODELS
from common.data.loaders import load_site, make_loader
from common.models import build_model, count_parameters
from common.registry import MODELS
from common.runconfig import RunConfig
from common.training import train
from server.simulate import SimResources, simulate
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger("bench.cost")

# The quality benchmark's models (about equal parameter counts) and every product model at its defaults.
BYTES_MODELS: dict[str, tuple[str, dict[str, int]]] = {
    **{f"{label} (bench)": spec for label, spec in QUALITY_MODELS.items()},
    **{f"{name} (default)": (name, {}) for name in MODELS},
}
OVERHEAD_MODEL = BYTES_MODELS["U-Net (bench)"]
SCALE_MODEL = ("unet", {"chans": 8, "num_pool_layers": 2})


def sim_config(
    sites: list[Path], run_dir: Path, rounds: int, local_steps: int, batch: int, model: tuple[str, dict[str, int]]
) -> RunConfig:
    """A FedAvg run over all ``sites``, every site required in every round."""
    return RunConfig.from_flat(
        {
            "name": run_dir.name,
            "num-server-rounds": rounds,
            "strategy": "fedavg",
            "proximal-mu": 0.0,
            "model": model[0],
            "model-args": model[1],
            "local-steps": local_steps,
            "batch-size": batch,
            "min-train-nodes": len(sites),
            "min-evaluate-nodes": len(sites),
            "min-available-nodes": len(sites),
            "sites": ",".join(str(p) for p in sites),
            "run-dir": str(run_dir),
            "num-samples": 0,
            "resume": False,
        }
    )


def round_times(store: RunDir) -> dict[int, dict[str, float]]:
    """Per round r >= 1, from the run's metrics.jsonl: ``wall`` (end of round r-1's evaluation to the end of
    round r's), and per phase (``train`` / ``evaluate``) the ServerApp's ``seconds`` and ``overhead``
    (``overhead_seconds``: the phase minus the slowest site's ``compute-seconds``), and the sites'
    compute-seconds: slowest (``*_max``) and summed (``*_sum``)."""
    records = store.read_metrics(dedupe=True)
    ends = {r["round"]: r["time"] for r in records if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"}
    out: dict[int, dict[str, float]] = {rnd: {"wall": ends[rnd] - ends[rnd - 1]} for rnd in ends if rnd - 1 in ends}
    for rec in records:
        if rec["round"] not in out:
            continue
        row, phase = out[rec["round"]], rec["phase"]
        if rec["site"] == GLOBAL_SITE:
            row[phase] = float(rec["seconds"])
            row[f"{phase}_overhead"] = float(rec["overhead_seconds"])
        else:
            compute = float(rec["metrics"]["compute-seconds"])
            row[f"{phase}_max"] = max(row.get(f"{phase}_max", 0.0), compute)
            row[f"{phase}_sum"] = row.get(f"{phase}_sum", 0.0) + compute
    return out


def site_compute(store: RunDir) -> dict[str, tuple[float, float]]:
    """Per site, median ``compute-seconds`` of its training and of its validation over rounds >= 2."""
    values: dict[str, dict[str, list[float]]] = {}
    for rec in store.read_metrics(dedupe=True):
        if rec["site"] != GLOBAL_SITE and rec["round"] >= 2:
            per_site = values.setdefault(rec["site"], {"train": [], "evaluate": []})
            per_site[rec["phase"]].append(float(rec["metrics"]["compute-seconds"]))
    return {
        site: (statistics.median(v["train"]), statistics.median(v["evaluate"])) for site, v in sorted(values.items())
    }


#: Where one reply's time went, from the phase's push to its arrival at the ServerApp.
BREAKDOWN = ("reply s", "outside the ClientApp s", "set-up s", "compute s", "rest of the handler s")


def reply_breakdown(store: RunDir) -> dict[str, dict[str, tuple[float, ...]]]:
    """Per phase and site, medians over rounds >= 2 (all rounds if there is only one) of :data:`BREAKDOWN`.

    ``reply`` is the ServerApp's ``reply_seconds`` (push to arrival); ``outside the ClientApp`` is that
    minus the site's ``handler-seconds``: the SuperNode's pull, the task's start (fork, FAB, app load),
    the reply's way back and the ServerApp's poll. Records without these fields (older runs, carried
    evaluations) are skipped.
    """
    records = [
        r
        for r in store.read_metrics(dedupe=True)
        if r["site"] != GLOBAL_SITE and "reply_seconds" in r and "handler-seconds" in r["metrics"]
    ]
    late = [r for r in records if r["round"] >= 2] or records
    values: dict[str, dict[str, list[tuple[float, ...]]]] = {}
    for rec in late:
        m = rec["metrics"]
        reply, handler, setup, compute = (
            float(rec["reply_seconds"]),
            m["handler-seconds"],
            m["setup-seconds"],
            m["compute-seconds"],
        )
        row = (reply, reply - handler, setup, compute, handler - setup - compute)
        values.setdefault(rec["phase"], {}).setdefault(rec["site"], []).append(row)
    return {
        phase: {site: tuple(statistics.median(col) for col in zip(*rows)) for site, rows in sorted(sites.items())}
        for phase, sites in values.items()
    }


def wire_bytes(model: nn.Module) -> tuple[int, int]:
    """(tensor bytes of the state dict, bytes of its serialised Flower ArrayRecord protobuf)."""
    state = model.state_dict()
    raw = sum(t.numel() * t.element_size() for t in state.values())
    return raw, len(array_record_to_proto(ArrayRecord(state)).SerializeToString())


def section_bytes(args: argparse.Namespace) -> None:
    """Bytes each site moves per round: the global model down for training, its update up, and the global
    model down again for federated evaluation (FedSense evaluates every round)."""
    rows = []
    for label, (name, kwargs) in BYTES_MODELS.items():
        model = build_model(name, **kwargs)
        raw, proto = wire_bytes(model)
        half = wire_bytes(model.half())[1]
        rows.append(
            (
                label,
                f"{count_parameters(model):,}",
                f"{raw:,}",
                f"{proto:,}",
                f"{2 * proto:,}",
                f"{3 * proto:,}",
                f"{3 * half:,}",
            )
        )
    print("\n### Bytes per round per site (ArrayRecord protobuf; gRPC framing and TLS not included)\n")
    print(
        markdown_table(
            (
                "model",
                "params",
                "state_dict bytes",
                "ArrayRecord bytes",
                "train down+up",
                "+ evaluate down",
                "all three in fp16",
            ),
            rows,
        )
    )


def section_overhead(args: argparse.Namespace) -> None:
    """Real simulation of the three demo sites; overhead = phase wall time minus the sites' recorded compute."""
    out = args.out / "overhead"
    fresh_output(out, args.overwrite)
    sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices)
    run = sim_config(sites, out / "run", args.rounds, args.local_steps, args.batch, OVERHEAD_MODEL)
    start = time.perf_counter()
    store = simulate(run, timeout=1800, report=logger.info)
    total = time.perf_counter() - start
    print(
        f"\n### Federation overhead: {len(sites)} sites, {OVERHEAD_MODEL[0]} {OVERHEAD_MODEL[1]}, "
        f"{args.size}², {args.local_steps} local steps x batch {args.batch}, {args.rounds} rounds\n"
    )
    times = print_overhead(store)
    print(
        f"whole simulation: {total:.1f} s wall, of which start-up, the round-0 evaluation and shut-down take "
        f"{total - sum(t['wall'] for t in times.values()):.1f} s"
    )


def print_overhead(store: RunDir) -> dict[int, dict[str, float]]:
    """Per-site compute and per-round overhead tables of a finished run; returns the round times."""
    times = round_times(store)
    print(
        markdown_table(
            ("site", "train compute s / round", "validation compute s / round"),
            ((s, f"{t:.2f}", f"{v:.2f}") for s, (t, v) in site_compute(store).items()),
        )
    )
    print()
    rows, steady = [], []
    for rnd, t in sorted(times.items()):
        over = (
            t["train_overhead"],
            t["train"] - t["train_sum"],
            t["evaluate_overhead"],
            t["wall"] - t["train_sum"] - t["evaluate_sum"],
        )
        rows.append(
            (
                rnd,
                f"{t['wall']:.2f}",
                f"{t['train']:.2f}",
                f"{t['train_max']:.2f}",
                f"{t['train_sum']:.2f}",
                f"{t['evaluate']:.2f}",
                f"{t['evaluate_sum']:.2f}",
                *(f"{o:.2f}" for o in over),
            )
        )
        if rnd > 1:
            steady.append(over)
    print(
        markdown_table(
            (
                "round",
                "wall s",
                "train phase s",
                "slowest site s",
                "all sites s",
                "evaluate phase s",
                "all sites s",
                "train overhead (recorded)",
                "train − all sites",
                "evaluate overhead (recorded)",
                "wall − all site compute",
            ),
            rows,
        )
    )
    last = max(times, default=1)
    for phase, sites in reply_breakdown(store).items():
        print(f"\n{phase}: where each site's reply time went (medians over rounds >= 2)\n")
        print(markdown_table(("site", *BREAKDOWN), ((site, *(f"{v:.2f}" for v in row)) for site, row in sites.items())))
    medians = [statistics.median(o[i] for o in steady) for i in range(4)] if steady else [float("nan")] * 4
    shares = [
        (t["wall"] - t["train_max"] - t.get("evaluate_max", 0.0)) / t["wall"]
        for rnd, t in times.items()
        if rnd > 1 and "train_max" in t
    ]
    print(
        f"\nmedian over rounds 2..{last} (round 1 is the first training pass in the ClientApp process): "
        f"train overhead {medians[0]:.2f} s, train − all sites {medians[1]:.2f} s, evaluate overhead "
        f"{medians[2]:.2f} s, wall − all site compute {medians[3]:.2f} s per round; the round's wall time beyond "
        f"its slowest site's training and validation: "
        f"{100 * statistics.median(shares) if shares else float('nan'):.0f} % of the round. 'overhead' is the "
        f"ServerApp's overhead_seconds (phase minus the slowest site's compute-seconds): what a round costs "
        f"above local work when sites run in parallel, as hospitals do. Flower's default of 2 CPUs per "
        f"simulated client lets this {os.cpu_count()}-core machine run one site at a time, so in a simulation "
        f"the framework's own cost is the phase minus all sites' compute."
    )
    return times


def section_deployment(args: argparse.Namespace) -> None:
    """The same tables for a finished deployment run (e.g. the compose project's ./runs/<name>)."""
    if args.run_dir is None:
        raise SystemExit("deployment: --run-dir RUN_DIR (a finished run directory) is required")
    print(f"\n### Federation overhead of the deployed run {args.run_dir}\n")
    print_overhead(RunDir(args.run_dir))


def section_scale(args: argparse.Namespace) -> None:
    """4..32 tiny sites (copies of the three demo sites), tiny model, 2 rounds: round time and memory."""
    out = args.out / "scale"
    fresh_output(out, args.overwrite)
    # R = 4 for every template: the 32-column grid cannot realise site-b's own R = 6 random mask.
    templates = write_sites(out / "templates", size=32, subjects=3, slices=2, acceleration=4)
    rows, first = [], None
    for count in args.sites:
        sites = replicate_sites(templates, count, out / f"n{count}" / "sites")
        run = sim_config(sites, out / f"n{count}" / "run", 2, 2, 2, SCALE_MODEL)
        start = time.perf_counter()
        with TreeMemory(0.5) as memory:
            store = simulate(run, timeout=1800, report=logger.info)
        total = time.perf_counter() - start
        times = round_times(store)
        per_round = statistics.mean(t["wall"] for t in times.values())
        first = first or (count, per_round, memory.peak_pss_kib)
        rows.append(
            (
                count,
                f"{total:.1f}",
                f"{per_round:.2f}",
                f"{per_round / count:.2f}",
                f"{memory.peak_rss_kib / 1024:.0f}",
                f"{memory.peak_pss_kib / 1024:.0f}",
                memory.peak_processes,
                f"{(memory.peak_pss_kib - first[2]) / 1024 / max(count - first[0], 1):.1f}"
                if count != first[0]
                else "-",
            )
        )
    print(
        f"\n### Scale: {SCALE_MODEL[0]} {SCALE_MODEL[1]}, 32² sites at R = 4 (3 subjects x 2 slices), 2 rounds x 2 local "
        f"steps, FedAvg, every site in every round; memory of this process and all its descendants, sampled "
        f"every 0.5 s\n"
    )
    print(
        markdown_table(
            (
                "sites",
                "simulation s",
                "round s (mean)",
                "round s per site",
                "peak RSS sum MiB",
                "peak PSS sum MiB",
                "processes at peak",
                "PSS MiB per added site",
            ),
            rows,
        )
    )


def section_fp16(args: argparse.Namespace) -> None:
    """Quality cost of fp16 transport, measured with the quality benchmark's R = 4 sites and budget."""
    out = args.out / "fp16"
    fresh_output(out, args.overwrite)
    sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices, acceleration=4)
    datasets = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sites)}
    rows = []
    for label in ("U-Net (bench)", "Unrolled-DC (bench)"):
        model = BYTES_MODELS[label]
        run = sim_config(sites, out / "unused", args.fp16_rounds, args.fp16_local_steps, args.batch, model)
        results: dict[bool, list[Any]] = {}
        for fp16 in (False, True):
            net = build_model(model[0], **model[1])
            for _, state in emulate_fedavg(run, datasets, fp16):  # type: ignore[arg-type]
                net.load_state_dict(state)
            recon = model_recon(net)
            results[fp16] = [
                s
                for d in datasets.values()
                for s in score_slices(recon, make_loader(d["test"], 4, shuffle=False, seed=0))
            ]
        diff = np.array([b.psnr - a.psnr for a, b in zip(results[False], results[True])])
        raw = wire_bytes(build_model(model[0], **model[1]))[1]
        half = wire_bytes(build_model(model[0], **model[1]).half())[1]
        rows.append(
            (
                label,
                mean_std([s.psnr for s in results[False]], 2),
                mean_std([s.psnr for s in results[True]], 2),
                f"{diff.mean():+.3f} (max abs {np.abs(diff).max():.3f})",
                mean_std([s.ssim for s in results[False]], 4),
                mean_std([s.ssim for s in results[True]], 4),
                f"{raw:,} → {half:,}",
            )
        )
    print(
        f"\n### fp16 transport: FedAvg emulated in-process, R = 4 demo sites, {args.fp16_rounds} rounds x "
        f"{args.fp16_local_steps} local steps x batch {args.batch}; test split, mean ± std over slices\n"
    )
    print(
        markdown_table(
            ("model", "PSNR fp32", "PSNR fp16", "ΔPSNR per slice dB", "SSIM fp32", "SSIM fp16", "bytes per transfer"),
            rows,
        )
    )


def _site_start_seconds(site_toml: Path, cache: Path | str) -> tuple[float, float]:
    """(seconds in a fresh process from start to the site's datasets ready, of which indexing + datasets)."""
    code = (
        "import time; t0 = time.perf_counter(); from common.data.loaders import load_site; "
        f"t1 = time.perf_counter(); load_site({str(site_toml)!r}); print(time.perf_counter() - t1)"
    )
    env = {**os.environ, "FEDSENSE_INDEX_CACHE": str(cache)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, float(out.stdout.strip().splitlines()[-1])


def section_index(args: argparse.Namespace) -> None:
    """A fastMRI site of ``--volumes`` h5 volumes: process start to site ready, no cache / cold / warm."""
    out = args.out / "index"
    fresh_output(out, args.overwrite)
    (template,) = write_sites(
        out / "template", size=args.size, subjects=args.volumes, slices=args.slices, names=("site-a",)
    )
    cache = out / "cache"
    rows = []
    for label, where in (
        ("no cache", "off"),
        ("cold cache (first start)", cache),
        ("warm cache", cache),
        ("warm cache (again)", cache),
    ):
        total, ready = _site_start_seconds(template, where)
        rows.append((label, f"{total:.2f}", f"{ready:.3f}"))
    files = len(list((out / "template" / "data").rglob("*.h5")))
    print(
        f"\n### Site index cache: site-a, {files} fastMRI h5 volumes at {args.size}² ({args.slices} slices kept per "
        f"volume), each start a fresh process (as every Flower message is at a deployed site)\n"
    )
    print(markdown_table(("start", "process start to site ready s", "index + datasets s"), rows))
    cold, warm = float(rows[1][2]), float(rows[2][2])
    print(
        f"\nindexing cold / warm: {cold / warm:.1f}x; whole start cold / warm: "
        f"{float(rows[1][1]) / float(rows[2][1]):.2f}x"
    )


def section_clientapps(args: argparse.Namespace) -> None:
    """The three demo sites as real SuperNodes, once with Flower's ClientApp processes, once with warm forks."""
    from tests.deployment import Deployment  # the reliability tests' local deployment (no TLS, loopback only)

    out = args.out / "clientapps"
    fresh_output(out, args.overwrite)
    sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices)
    summary = []
    for label, warm in (("flwr-clientapp per message (Flower)", False), ("fedsense-superexec (warm fork)", True)):
        run_dir = out / ("warm" if warm else "cold")
        run = sim_config(sites, run_dir / "run", args.rounds, args.local_steps, args.batch, OVERHEAD_MODEL)
        with Deployment(run_dir / "deployment") as deployment:
            for path in sites:
                deployment.start_supernode(path.stem, path, warm=warm)
            run_id = deployment.submit({**run.to_flat(), "max-eval-slices": 4})
            status = deployment.wait_finished(run_id, 1800)
        if status != "finished:completed":
            raise SystemExit(f"clientapps: {label}: run ended {status}; logs in {run_dir / 'deployment' / 'logs'}")
        print(f"\n### {label}\n")
        times = print_overhead(RunDir(run.run_dir))
        steady = [t for rnd, t in times.items() if rnd > 1] or list(times.values())
        summary.append(
            (
                label,
                *(
                    f"{statistics.median(t[k] for t in steady):.2f}"
                    for k in ("wall", "train_overhead", "evaluate_overhead")
                ),
            )
        )
    print(
        f"\n### ClientApp start: {len(sites)} sites, {OVERHEAD_MODEL[0]} {OVERHEAD_MODEL[1]}, {args.size}², "
        f"{args.rounds} rounds x {args.local_steps} local steps; medians over rounds >= 2\n"
    )
    print(markdown_table(("ClientApps", "round wall s", "train overhead s", "evaluate overhead s"), summary))


def core_plan(sites: int) -> tuple[list[set[int]], set[int]] | None:
    """Cores of this process split into one block per site plus the rest for the SuperLink and ServerApp;
    ``None`` when there are fewer cores than sites + 1 (the sites then share them)."""
    cores = sorted(os.sched_getaffinity(0))
    per_site = len(cores) // (sites + 1)
    if per_site < 1:
        return None
    return [set(cores[i * per_site : (i + 1) * per_site]) for i in range(sites)], set(cores[sites * per_site :])


def calibrate_steps(site: Path, run: RunConfig, cpus: set[int] | None, seconds: float) -> int:
    """Local steps that take about ``seconds`` of training at ``site`` on ``cpus`` (one thread per core)."""
    own, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    try:
        _, datasets = load_site(str(site))
        model = build_model(run.model, **run.model_kwargs)
        loader = make_loader(datasets["train"], run.batch_size, shuffle=True, seed=0)
        train(model, loader, steps=1)  # first step: allocations, lazy initialisation
        start = time.perf_counter()
        train(model, loader, steps=3)
        per_step = (time.perf_counter() - start) / 3
    finally:
        os.sched_setaffinity(0, own)
        torch.set_num_threads(threads)
    return max(1, math.ceil(seconds / per_step))


#: ``local`` section: (label, warm ClientApps through ``fedsense client``, FEDSENSE_POLL_INTERVAL, long training).
LOCAL_VARIANTS = {
    "flower": ("Flower: flwr-clientapp per message, Flower's waits", False, "flower", False),
    "flower-waits": ("fedsense client, Flower's waits", True, "flower", False),
    "fedsense": ("fedsense client", True, None, False),
    "flower-long": ("Flower: flwr-clientapp per message, Flower's waits, ≥ 30 s training", False, "flower", True),
    "fedsense-long": ("fedsense client, ≥ 30 s training", True, None, True),
}


def section_local(args: argparse.Namespace) -> None:
    """A deployment on this machine: a real SuperLink and one SuperNode per site on loopback, each site
    pinned to cores of its own when there are enough (a machine per site, as hospitals have), so a phase's
    overhead above its slowest site is the federation's and not the sites' competition for cores."""
    from tests.deployment import Deployment  # the reliability tests' local deployment (no TLS, loopback only)

    out = args.out / "local"
    fresh_output(out, args.overwrite)
    sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices)
    plan = core_plan(len(sites))
    base = RunConfig.from_flat(
        {
            **sim_config(sites, out / "unused", args.rounds, args.local_steps, args.batch, ("unet", {})).to_flat(),
            "max-eval-slices": 4,
            "device": args.device,
        }
    )
    long_steps = calibrate_steps(sites[0], base, plan[0][0] if plan else None, args.train_seconds)
    where = (
        f"{len(plan[0][0])} cores per site, {len(plan[1])} for the SuperLink and ServerApp"
        if plan
        else f"the sites share {os.cpu_count()} cores (fewer than sites + 1)"
    )
    summary = []
    for key in args.variants:
        label, warm, poll, long = LOCAL_VARIANTS[key]
        run_dir = out / key
        steps, rounds = (long_steps, args.long_rounds) if long else (args.local_steps, args.rounds)
        run = {
            **base.to_flat(),
            "local-steps": steps,
            "num-server-rounds": rounds,
            "run-dir": str(run_dir / "run"),
            "name": key,
        }
        with Deployment(run_dir / "deployment", superlink_cpus=plan[1] if plan else None) as deployment:
            for i, path in enumerate(sites):
                cpus = plan[0][i] if plan else None
                env = {
                    "OMP_NUM_THREADS": str(len(cpus) if cpus else args.threads),
                    **({"FEDSENSE_POLL_INTERVAL": poll} if poll else {}),
                }
                deployment.start_supernode(path.stem, path, warm=warm, env=env, cpus=cpus)
            status = deployment.wait_finished(deployment.submit(run), 3600)
        if status != "finished:completed":
            raise SystemExit(f"local: {label}: run ended {status}; logs in {run_dir / 'deployment' / 'logs'}")
        print(f"\n### {label} ({steps} local steps, {rounds} rounds)\n")
        times = print_overhead(RunDir(run["run-dir"]))
        steady = [t for rnd, t in times.items() if rnd > 1] or list(times.values())
        med = {
            k: statistics.median(t[k] for t in steady)
            for k in ("wall", "train_max", "evaluate_max", "train_overhead", "evaluate_overhead")
        }
        share = (med["wall"] - med["train_max"] - med["evaluate_max"]) / med["wall"]
        summary.append(
            (
                label,
                steps,
                f"{med['wall']:.2f}",
                f"{med['train_max']:.2f}",
                f"{med['train_overhead']:.2f}",
                f"{med['evaluate_overhead']:.2f}",
                f"{100 * share:.0f} %",
            )
        )
    print(
        f"\n### Local deployment: {len(sites)} sites, unet (defaults), {args.size}², batch {args.batch}, "
        f"device {args.device}, {where}; medians over rounds >= 2\n"
    )
    print(
        markdown_table(
            (
                "ClientApps and waits",
                "local steps",
                "round wall s",
                "slowest site's training s",
                "train phase − slowest site s",
                "evaluate phase − slowest site s",
                "overhead share of the round",
            ),
            summary,
        )
    )


def section_parallel(args: argparse.Namespace) -> None:
    """Round time of 4 equal sites with Flower's default resources (2 CPUs per site) and with 1 CPU per site."""
    out = args.out / "parallel"
    fresh_output(out, args.overwrite)
    template = write_sites(
        out / "template", size=args.size, subjects=args.subjects, slices=args.slices, names=("site-c",)
    )
    sites = replicate_sites(template, 4, out / "sites")
    rows, means = [], {}
    for label, resources in (
        ("default (2 CPUs per site)", SimResources()),
        ("--client-cpus 1", SimResources(client_cpus=1)),
    ):
        run = sim_config(
            sites, out / label.split()[0].strip("-"), args.rounds, args.local_steps, args.batch, OVERHEAD_MODEL
        )
        store = simulate(run, timeout=1800, report=logger.info, resources=resources)
        walls = [t["wall"] for t in round_times(store).values()]
        means[label] = statistics.mean(walls)
        rows.append((label, f"{means[label]:.2f}", f"{min(walls):.2f}", f"{max(walls):.2f}"))
    ratio = means["--client-cpus 1"] / means["default (2 CPUs per site)"]
    print(
        f"\n### Parallel sites: 4 copies of site-c at {args.size}², {OVERHEAD_MODEL[0]} {OVERHEAD_MODEL[1]}, "
        f"{args.rounds} rounds x {args.local_steps} local steps, batch {args.batch}, {args.threads} torch thread(s) "
        f"per site, {os.cpu_count()} cores\n"
    )
    print(markdown_table(("resources", "round s (mean)", "min", "max"), rows))
    print(f"\nratio (1 CPU per site / default): {ratio:.2f}")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "overhead": section_overhead,
    "bytes": section_bytes,
    "scale": section_scale,
    "fp16": section_fp16,
    "deployment": section_deployment,
    "parallel": section_parallel,
    "index": section_index,
    "clientapps": section_clientapps,
    "local": section_local,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; each section's defaults finish in a few minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="+", choices=[*SECTIONS, "all"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cost"), help="sites, data and run dirs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out/SECTION folder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the overhead simulation")
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 8, 16, 32], help="site counts of 'scale'")
    parser.add_argument("--fp16-rounds", type=int, default=8)
    parser.add_argument("--fp16-local-steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (here and in Flower)")
    parser.add_argument("--run-dir", type=Path, help="finished run directory read by 'deployment'")
    parser.add_argument("--volumes", type=int, default=200, help="fastMRI volumes of the 'index' site")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(LOCAL_VARIANTS),
        default=list(LOCAL_VARIANTS),
        help="deployments the 'local' section runs",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=32.0,
        help="'local': the long variants' local training per site and round",
    )
    parser.add_argument("--long-rounds", type=int, default=2, help="'local': rounds of the long variants")
    parser.add_argument(
        "--device",
        choices=("cpu", "auto", "cuda"),
        default="cpu",
        help="'local': where the sites compute (cpu: as the compose deployment's sites do)",
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the requested sections and print their tables."""
    args = parse_args(argv)
    start_bench("cost", args.threads)
    names = [n for n in SECTIONS if n != "deployment"] if "all" in args.sections else args.sections
    for name in names:  # each section rebuilds args.out / name
        check_output(args.out / name, args.overwrite)
    for name in names:
        start = time.perf_counter()
        SECTIONS[name](args)
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
