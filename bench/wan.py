"""Round time and bytes per site over emulated WAN links: the ``lan``, ``vpn`` and ``bad`` presets side by side.

A real deployment on this machine (a SuperLink and one SuperNode per site on loopback, as the reliability
tests run it), every SuperNode dialling the SuperLink through its own :class:`deploy.wan.proxy.ProxyThread`
with the preset's delay, jitter, bandwidth cap, connection resets and stalls; each preset with the weights
travelling as float32 and as float16 (``transport-dtype``). The same sites, data, model and run for every
preset, so the differences are the link's. Printed: the median round wall time over
rounds >= 2 (round 1 holds the ClientApps' start-up) and its ratio to ``lan`` with fp32, the bytes each site's link
carried per round in each direction (the proxy's counters: gRPC, HTTP/2 and the packed arrays; no TLS here),
and the resets and stalls the link injected. Run::

    python -m bench.wan [--presets lan vpn bad --transports fp32 fp16 --rounds 4 --out runs/bench-wan]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from bench.cost import round_times
from bench.harness import fresh_output, markdown_table, start_bench, write_sites
from deploy.wan.proxy import PRESETS, ProxyThread, profile
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-wan"), help="sites and run directories")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["lan", "vpn", "bad"])
    parser.add_argument("--transports", nargs="+", choices=["fp32", "fp16"], default=["fp32", "fp16"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--model-args", default="{}", help="U-Net arguments (JSON); default: the product's U-Net")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per site")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (round 1 holds the start-up and is not timed)")
    return args


def run_preset(
    preset: str, transport: str, sites: list[Path], workdir: Path, args: argparse.Namespace
) -> dict[str, object]:
    """One federated run with every site behind its own ``preset`` link; its times and the links' counters."""
    from tests.deployment import Deployment  # the reliability tests' local deployment (no TLS, loopback only)

    store = RunDir(workdir / "run")
    run = {
        "name": f"wan-{preset}-{transport}",
        "transport-dtype": transport,
        "num-server-rounds": args.rounds,
        "strategy": "fedavg",
        "model": "unet",
        "model-args": args.model_args,
        "local-steps": args.local_steps,
        "batch-size": 2,
        "max-eval-slices": 2,
        "min-train-nodes": len(sites),
        "min-evaluate-nodes": len(sites),
        "min-available-nodes": len(sites),
        "node-wait-timeout": 120.0,
        "round-timeout": 600.0,
        "run-dir": str(store.path),
        "resume": False,
    }
    link = profile(preset)
    started = time.monotonic()
    with Deployment(workdir / "deployment") as deployment:
        proxies = {p.stem: ProxyThread(("127.0.0.1", deployment.port), link, seed=i) for i, p in enumerate(sites)}
        for proxy in proxies.values():
            proxy.__enter__()
        try:
            for path in sites:
                deployment.start_supernode(
                    path.stem, path, superlink=proxies[path.stem].address, env={"OMP_NUM_THREADS": str(args.threads)}
                )
            status = deployment.wait_finished(deployment.submit(run), 3600)
        finally:
            for proxy in proxies.values():
                proxy.__exit__()
    if status != "finished:completed":
        raise SystemExit(f"{preset}: the run ended {status}; logs in {workdir / 'deployment' / 'logs'}")
    times = round_times(store)
    steady = [t["wall"] for rnd, t in times.items() if rnd >= 2]
    counters = [p.counters for p in proxies.values()]
    final = next(r for r in reversed(store.read_metrics()) if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate")
    return {
        "preset": preset,
        "transport": transport,
        "psnr": final["metrics"]["psnr"],
        "round_s": statistics.median(steady),
        "run_s": time.monotonic() - started,
        # Per site and round, including start-up and the final evaluation: what the link carried in all.
        "up": statistics.mean(c.bytes_up for c in counters) / args.rounds,
        "down": statistics.mean(c.bytes_down for c in counters) / args.rounds,
        "resets": sum(c.resets for c in counters),
        "stalls": sum(c.stalls for c in counters),
    }


def describe(preset: str) -> str:
    link = PRESETS[preset]
    if link == PRESETS["lan"]:
        return "no delay, no cap"
    return (
        f"{link.rtt_ms:g} ± {link.jitter_ms:g} ms RTT, {link.bandwidth_mbit:g} Mbit/s"
        + (f", a reset every {link.reset_every_s:g} s" if link.reset_every_s else "")
        + (f", a {link.stall_s:g} s stall every {link.stall_every_s:g} s" if link.stall_every_s else "")
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = start_bench("wan", args.threads)
    fresh_output(args.out, args.overwrite)
    sites = write_sites(args.out / "sites", size=args.size, subjects=args.subjects, slices=args.slices)
    results = [
        run_preset(preset, transport, sites, args.out / f"{preset}-{transport}", args)
        for preset in args.presets
        for transport in args.transports
    ]
    (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    base = next((r["round_s"] for r in results if r["preset"] == "lan" and r["transport"] == "fp32"), None)
    print(
        f"\n### {len(sites)} sites, each behind its own link; U-Net {args.model_args}, {args.size}², "
        f"{args.local_steps} local steps x batch 2, FedAvg, {args.rounds} rounds, every site in every phase\n"
    )
    print(
        markdown_table(
            (
                "preset",
                "link",
                "transport",
                "round s (median, rounds 2..)",
                "× lan fp32",
                "bytes up / site / round",
                "bytes down / site / round",
                "resets",
                "stalls",
                "final val PSNR (dB)",
            ),
            [
                (
                    r["preset"],
                    describe(str(r["preset"])),
                    r["transport"],
                    f"{r['round_s']:.2f}",
                    f"{float(r['round_s']) / base:.2f}×" if base else "-",  # type: ignore[arg-type]
                    f"{r['up']:,.0f}",
                    f"{r['down']:,.0f}",
                    r["resets"],
                    r["stalls"],
                    f"{r['psnr']:.2f}",
                )
                for r in results
            ],
        )
    )
    print(f"\ntotal: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
