"""What SecAgg+ costs per round: wall time and bytes, plain FedAvg against ``secagg = true``, side by side.

The real ServerApp (``server.app.main``) and the real ClientApp run in this process: a loopback grid
hands each message to the destination site's ClientApp (one ``Context`` per site, kept across
messages) and counts the payload bytes both ways (array data, bytes and strings of config records,
8 bytes per scalar). Sites run one after another, so the SecAgg+ time includes every site's
cryptography in sequence (deployed sites do theirs in parallel): an upper bound on the wall time a
deployed round adds. Each setting runs the same rounds on the same data with the same seed.

Run::

    python -m bench.secagg_overhead            # 3 and 8 sites, 3 rounds each
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import server.app
from bench.harness import markdown_table, replicate_sites, start_bench, write_sites
from bench.loopback import LoopbackGrid
from common.models import build_model, count_parameters
from common.runconfig import RunConfig
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger("bench.secagg_overhead")

RUN_ID, SERVER_NODE = 5, 1
MODEL_ARGS = {"chans": 8, "num_pool_layers": 2}


def payload_bytes(content: RecordDict) -> int:
    """Bytes a message carries: array data, bytes and string values, 8 per number."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for value in record.values():
                for v in value if isinstance(value, list) else [value]:
                    total += len(v) if isinstance(v, (bytes, str)) else 8
    return total


class CountingGrid(LoopbackGrid):
    """The loopback grid, counting the payload bytes each way."""

    def __init__(self, sites: list[Path], run_config: dict[str, Any]) -> None:
        super().__init__(sites, run_config, RUN_ID)
        self.sent_bytes = self.received_bytes = 0

    def deliver(self, request: Message) -> Message | None:
        self.sent_bytes += payload_bytes(request.content)
        reply = super().deliver(request)
        if reply is not None and reply.has_content():
            self.received_bytes += payload_bytes(reply.content)
        return reply


def measure(sites: list[Path], run_dir: Path, rounds: int, secagg: bool) -> dict[str, float]:
    """Median train-phase seconds per round and bytes per site and round, each way."""
    run = RunConfig.from_flat(
        {
            "name": "secagg-overhead",
            "num-server-rounds": rounds,
            "strategy": "fedavg",
            "model-args": json.dumps(MODEL_ARGS),
            "local-steps": 1,
            "batch-size": 1,
            "fraction-evaluate": 0.0,
            "min-train-nodes": len(sites),
            "min-available-nodes": len(sites),
            "run-dir": str(run_dir),
            "resume": False,
            "secagg": secagg,
            "secagg-num-shares": min(len(sites), 5) | 1,
            "secagg-reconstruction-threshold": 2,
        }
    )
    grid = CountingGrid(sites, run.to_flat())
    server.app.main(grid, Context(RUN_ID, SERVER_NODE, {}, RecordDict(), run.to_flat()))
    trains = [r for r in RunDir(run_dir).read_metrics() if r["phase"] == "train" and r["site"] == GLOBAL_SITE]
    per = len(sites) * rounds
    return {
        "seconds": statistics.median(r["seconds"] for r in trains),
        "up": grid.received_bytes / per,
        "down": grid.sent_bytes / per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    start_bench("secagg_overhead", args.threads)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = RUN_ID, 1, SERVER_NODE  # the ServerApp's
    params = count_parameters(build_model("unet", **MODEL_ARGS))
    print(f"model unet {MODEL_ARGS}: {params} parameters; {args.rounds} rounds of 1 local step; sites in sequence")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = write_sites(Path(tmp) / "base", size=48, subjects=2, slices=2)
        for n in args.sites:
            sites = replicate_sites(base, n, Path(tmp) / f"sites-{n}")
            measure(sites, Path(tmp) / f"warm-{n}", 1, secagg=True)  # imports, index caches, first-call costs
            plain = measure(sites, Path(tmp) / f"plain-{n}", args.rounds, secagg=False)
            secure = measure(sites, Path(tmp) / f"secagg-{n}", args.rounds, secagg=True)
            rows.append(
                [
                    n,
                    f"{plain['seconds']:.2f}",
                    f"{secure['seconds']:.2f}",
                    f"{secure['seconds'] / plain['seconds']:.2f}x",
                    f"{plain['up'] / 1e3:.0f}",
                    f"{secure['up'] / 1e3:.0f}",
                    f"{secure['up'] / plain['up']:.2f}x",
                    f"{plain['down'] / 1e3:.0f}",
                    f"{secure['down'] / 1e3:.0f}",
                    f"{secure['down'] / plain['down']:.2f}x",
                ]
            )
    print(
        markdown_table(
            [
                "sites",
                "plain s/round",
                "SecAgg+ s/round",
                "time ratio",
                "plain kB up/site",
                "SecAgg+ kB up/site",
                "up ratio",
                "plain kB down/site",
                "SecAgg+ kB down/site",
                "down ratio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
