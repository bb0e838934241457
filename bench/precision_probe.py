"""How steady is ``precision = auto``'s timing when several sites share a machine's cores?

Starts ``--processes`` copies of one measurement at once, each with ``--threads`` torch threads (as compose or
``simulate`` run several sites on one machine), and prints per copy: the best-of ratio ``measure`` decides on
(fp32 / bf16 seconds per step, the bf16 speed-up), the spread of its paired repeats (largest / smallest
ratio; ``auto`` retakes a measurement on one thread above :data:`common.precision.MAX_SPREAD`) and what
``choose_precision`` then chose. Run::

    python -m bench.precision_probe --processes 3 --threads 2 [--model unet --size 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import torch

from bench.harness import markdown_table

logger = logging.getLogger("bench.precision_probe")


def one(model_name: str, size: int, threads: int) -> dict[str, float | str]:
    """One site's measurement and decision (cache off), on a synthetic 8-coil batch of 2."""
    from common import precision
    from common.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = {
        "masked_kspace": torch.randn(2, 8, size, size, dtype=torch.complex64),
        "mask": torch.ones(2, 1, size, size),
        "sens_maps": torch.randn(2, 8, size, size, dtype=torch.complex64),
    }
    timings = precision.measure(model, batch, torch.device("cpu"), "train")
    choice = precision.choose_precision("auto", model, batch, "cpu", "train")
    return {"speed-up": timings["fp32"] / timings["bf16"], "spread": timings["spread"], "choice": choice}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: print one JSON line
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.size, args.threads)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = {**os.environ, "FEDSENSE_PRECISION_CACHE": "off"}
    env.pop("FEDSENSE_AUTO_PRECISION", None)
    command = [sys.executable, "-m", "bench.precision_probe", "--one", "--threads", str(args.threads)]
    command += ["--model", args.model, "--size", str(args.size)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(args.processes)]
    rows = []
    for i, child in enumerate(children):
        out, _ = child.communicate(timeout=900)
        if child.returncode != 0:
            raise SystemExit(f"copy {i} exited {child.returncode}")
        result = json.loads(out.strip().splitlines()[-1])
        rows.append([str(i + 1), f"{result['speed-up']:.2f}x", f"{result['spread']:.2f}", str(result["choice"])])
    print(
        f"{args.processes} process(es) x {args.threads} thread(s), {args.model} at {args.size}², os.cpu_count() = "
        f"{os.cpu_count()}"
    )
    print(markdown_table(["copy", "best-of bf16 speed-up", "paired spread", "auto chose"], rows))


if __name__ == "__main__":
    main()
