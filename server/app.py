"""The FedSense ServerApp: coordinates FedAvg / FedProx / robust aggregation across hospital sites."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.models import build_model, count_parameters
from common.personalise import split_state
from common.runconfig import RunConfig
from server.collect import quick_reply_object_pulls
from server.federation import Federation
from server.optimisers import load_optimiser_state
from server.privacy import wrap_client_dp
from server.round_state import round_state_of
from server.store import RunDir
from server.strategy import build_strategy
from server.tracking.prometheus import MonitoredGrid, server_metrics
from server.tracking.tracked import tracked_store
from server.transport import PackedGrid

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Start (or resume from the last checkpoint) and run the configured number of rounds."""
    run = RunConfig.from_flat(dict(context.run_config))
    quick_reply_object_pulls()
    monitor = server_metrics(run)  # Prometheus /metrics on metrics-port (None: off)
    # The ClientApp's packed_transport_mod unpacks at the site.
    fp16 = run.transport_dtype == "fp16"
    grid = PackedGrid(grid, fp16) if monitor is None else MonitoredGrid(grid, monitor, fp16)
    torch.manual_seed(run.seed)
    model = build_model(run.model, **run.model_kwargs)
    # Local layers (local-layers) stay at the sites: the server aggregates and checkpoints the rest.
    _, local = split_state(model.state_dict(), run.local_layer_patterns)
    store = tracked_store(run, [monitor] if monitor else [])  # metrics.jsonl, plus trackers and /metrics
    store.init(run.to_flat(), resume=run.resume)
    start = 1
    latest = store.latest_checkpoint() if run.resume else None
    if latest is not None:
        done, payload = latest
        model.load_state_dict({**local, **payload["state_dict"]})
        start = done + 1
        logger.info("resuming %s after round %d", run.run_dir, done)
    logger.info("model %s: %d parameters; strategy %s", run.model, count_parameters(model), run.strategy)
    if local:
        logger.info("%d arrays stay at the sites (local-layers %s)", len(local), run.local_layers)
    shared, _ = split_state(model.state_dict(), run.local_layer_patterns)
    arrays = ArrayRecord(shared)
    strategy = build_strategy(run)
    if latest is not None and load_optimiser_state(strategy, latest[1].get("server_optimizer")):
        logger.info("restored the %s server optimiser state of round %d", run.strategy, latest[0])
    if latest is not None and latest[1].get("round_state"):
        round_state_of(strategy).load_state_dict(latest[1]["round_state"])
        logger.info("restored the %s round state of round %d", run.strategy, latest[0])
    federation = Federation(grid, run, wrap_client_dp(strategy, run, start - 1), store, model)
    try:
        if start == 1 and not federation.carries_evaluation:
            federation.evaluate_round(0, arrays)  # (with evaluate-with-train, round 1's training carries it)
        last, arrays = federation.run_rounds(start, arrays)
        if run.fine_tune_steps > 0:
            federation.fine_tune_round(last, *_fine_tune_start(store, last, arrays))
    except BaseException as exc:
        store.set_status("failed", error=str(exc))
        raise
    store.set_status("finished", **(federation.best.stop_detail() if federation.best.exhausted else {}))


def _fine_tune_start(store: RunDir, last: int, last_arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
    """The global model the sites fine-tune and its round: the run's best round when it has one, else ``last``.

    The best round is the model the run selected on validation (what ``fedsense export`` ships); after
    an early stop it is not the last one. The round goes to the sites (``STATE_ROUND``) so that they add
    their local layers of that round. The phase is recorded under the last round trained.
    """
    best = store.best()
    if best is None or best["round"] == last:
        return last_arrays, last
    logger.info("fine-tuning starts from round %d, the best by %s (%.4g)", best["round"], best["metric"], best["value"])
    return ArrayRecord(store.load_checkpoint(best["round"])["state_dict"]), best["round"]
