"""The FedSense ServerApp: coordinates FedAvg / FedProx / robust aggregation across hospital sites."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.models import build_model, count_parameters
from common.runconfig import RunConfig
from server.federation import Federation
from server.store import RunDir
from server.strategy import build_strategy

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Start (or resume from the last checkpoint) and run the configured number of rounds."""
    run = RunConfig.from_flat(dict(context.run_config))
    store = RunDir(run.run_dir)
    store.init(run.to_flat(), resume=run.resume)
    torch.manual_seed(run.seed)
    model = build_model(run.model, **run.model_kwargs)
    start = 1
    latest = store.latest_checkpoint() if run.resume else None
    if latest is not None:
        done, payload = latest
        model.load_state_dict(payload["state_dict"])
        start = done + 1
        logger.info("resuming %s after round %d", run.run_dir, done)
    logger.info("model %s: %d parameters; strategy %s", run.model, count_parameters(model), run.strategy)
    arrays = ArrayRecord(model.state_dict())
    federation = Federation(grid, run, build_strategy(run), store, model)
    try:
        if start == 1:
            federation.evaluate_round(0, arrays)
        federation.run_rounds(start, arrays)
    except BaseException as exc:
        store.set_status("failed", error=str(exc))
        raise
    store.set_status("finished", **(federation.best.stop_detail() if federation.best.exhausted else {}))
