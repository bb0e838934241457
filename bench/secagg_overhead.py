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
import copy
import json
import logging
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

import client.app
import server.app
from bench.harness import markdown_table, replicate_sites, start_bench, write_sites
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


class CountingGrid(Grid):
    """Delivers each message to the real ClientApp of its site, in this process, counting bytes each way."""

    def __init__(self, sites: list[Path], run_config: dict[str, Any]) -> None:
        self.contexts = {100 + i: Context(RUN_ID, 100 + i, {"site-config": str(p)}, RecordDict(), run_config)
                         for i, p in enumerate(sites)}
        self.sent_bytes = self.received_bytes = 0
        self._replies: dict[str, Message] = {}
        self._count = 0
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{self._count}"
            self._count += 1
            self.sent_bytes += payload_bytes(message.content)
            request = copy.deepcopy(message)
            reply = client.app.app(request, self.contexts[request.metadata.dst_node_id])
            if reply.has_content():
                self.received_bytes += payload_bytes(reply.content)
            self._replies[request.metadata.message_id] = reply
            ids.append(request.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the ServerApp collects replies itself (server.collect)")


def measure(sites: list[Path], run_dir: Path, rounds: int, secagg: bool) -> dict[str, float]:
    """Median train-phase seconds per round and bytes per site and round, each way."""
    run = RunConfig.from_flat({
        "name": "secagg-overhead", "num-server-rounds": rounds, "strategy": "fedavg",
        "model-args": json.dumps(MODEL_ARGS), "local-steps": 1, "batch-size": 1, "fraction-evaluate": 0.0,
        "min-train-nodes": len(sites), "min-available-nodes": len(sites), "run-dir": str(run_dir),
        "resume": False, "secagg": secagg, "secagg-num-shares": min(len(sites), 5) | 1,
        "secagg-reconstruction-threshold": 2,
    })
    grid = CountingGrid(sites, run.to_flat())
    server.app.main(grid, Context(RUN_ID, SERVER_NODE, {}, RecordDict(), run.to_flat()))
    trains = [r for r in RunDir(run_dir).read_metrics() if r["phase"] == "train" and r["site"] == GLOBAL_SITE]
    per = len(sites) * rounds
    return {"seconds": statistics.median(r["seconds"] for r in trains),
            "up": grid.received_bytes / per, "down": grid.sent_bytes / per}


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
            rows.append([n, f"{plain['seconds']:.2f}", f"{secure['seconds']:.2f}",
                         f"{secure['seconds'] / plain['seconds']:.2f}x",
                         f"{plain['up'] / 1e3:.0f}", f"{secure['up'] / 1e3:.0f}", f"{secure['up'] / plain['up']:.2f}x",
                         f"{plain['down'] / 1e3:.0f}", f"{secure['down'] / 1e3:.0f}",
                         f"{secure['down'] / plain['down']:.2f}x"])
    print(markdown_table(["sites", "plain s/round", "SecAgg+ s/round", "time ratio", "plain kB up/site",
                          "SecAgg+ kB up/site", "up ratio", "plain kB down/site", "SecAgg+ kB down/site",
                          "down ratio"], rows))


if __name__ == "__main__":
    main()
