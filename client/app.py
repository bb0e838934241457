"""The FedSense ClientApp: one hospital site's side of a federated round.

Only the model weights and scalar metrics leave the site; images, k-space and file paths never do.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import egress_audit_mod
from client.privacy import client_dp_mod, ledger_path, load_ledger, store_ledger, train_with_budget
from client.task import resolve_site_config_path
from common.data.loaders import load_site, make_loader
from common.models import build_model
from common.runconfig import RunConfig
from common.samples import save_samples
from common.training import evaluate as evaluate_model
from common.training import train as train_model

logger = logging.getLogger(__name__)

app = ClientApp(mods=[egress_audit_mod])


def _setup(msg: Message, context: Context) -> tuple[RunConfig, str, torch.nn.Module, dict]:
    run = RunConfig.from_flat(dict(context.run_config))
    site_path = resolve_site_config_path(context.node_config, run)
    site, datasets = load_site(str(site_path))
    torch.manual_seed(run.seed + int(msg.content["config"].get("server-round", 0)))
    model = build_model(run.model, **run.model_kwargs)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return run, site.name, model, datasets


def _reply(msg: Message, site: str, metrics: dict[str, float], model: torch.nn.Module | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})
    if model is not None:
        content["arrays"] = ArrayRecord(model.state_dict())
    return Message(content=content, reply_to=msg)


@app.train(mods=[client_dp_mod])
def train(msg: Message, context: Context) -> Message:
    """Local training from the global weights; FedProx's proximal term when the server sends mu > 0."""
    run, site, model, datasets = _setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    mu = float(msg.content["config"].get("proximal-mu", run.proximal_mu))
    loader = make_loader(datasets["train"], run.batch_size, shuffle=True, seed=run.seed + server_round)
    started = time.perf_counter()
    if run.dp_noise_multiplier > 0:
        return _train_private(msg, context, run, site, model, loader, mu)
    result = train_model(
        model,
        loader,
        epochs=run.local_epochs,
        steps=run.local_steps,
        lr=run.learning_rate,
        loss=run.loss,
        proximal_mu=mu,
    )
    logger.info("site %s round %d: train loss %.4f over %d steps", site, server_round, result.loss, result.steps)
    # compute-seconds lets the server separate local compute from federation overhead per round.
    metrics = {"num-examples": result.num_examples, "loss": result.loss, "steps": result.steps,
               "compute-seconds": time.perf_counter() - started, **_client_dp_weight(run)}
    return _reply(msg, site, metrics, model)


def _client_dp_weight(run: RunConfig) -> dict[str, float]:
    # Client-level DP averages the clipped updates uniformly (the server weights by this key).
    return {"dp-weight": 1.0} if run.dp_client_level != "off" else {}


def _train_private(msg: Message, context: Context, run: RunConfig, site: str, model: torch.nn.Module,
                   loader: torch.utils.data.DataLoader, mu: float) -> Message:
    """DP-SGD training; ε from the site's ledger. Past the target ε the site sends no weights, only the flag."""
    started = time.perf_counter()
    path = ledger_path(context, run, resolve_site_config_path(context.node_config, run), site)
    result, ledger, privacy = train_with_budget(run, model, loader, mu, load_ledger(context, path))
    if result is None:
        metrics = {"num-examples": 0, **privacy, "compute-seconds": time.perf_counter() - started}
        return _reply(msg, site, metrics, None)
    store_ledger(context, path, ledger)
    logger.info("site %s: DP-SGD loss %.4f over %d steps, ε=%.3f at δ=%g", site, result.loss, result.steps,
                privacy["dp-epsilon"], run.dp_delta)
    metrics = {"num-examples": result.num_examples, "loss": result.loss, "steps": result.steps,
               "compute-seconds": time.perf_counter() - started, **privacy, **_client_dp_weight(run)}
    return _reply(msg, site, metrics, model)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation-split PSNR / SSIM / NMSE of the global model at this site."""
    run, site, model, datasets = _setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    loader = make_loader(datasets["val"], run.batch_size, shuffle=False, seed=run.seed)
    num_samples = run.num_samples if run.sample_dir else 0
    started = time.perf_counter()
    result = evaluate_model(
        model, loader, loss=run.loss, max_slices=run.max_eval_slices, num_samples=num_samples
    )
    if run.sample_dir and result.samples:
        # Sample images stay on this machine: written to a site-local directory, never sent.
        save_samples(run.sample_dir, server_round, site, result.samples)
    logger.info("site %s round %d: %s", site, server_round, result.metrics)
    metrics = {"num-examples": result.num_examples, **result.metrics,
               "compute-seconds": time.perf_counter() - started}
    return _reply(msg, site, metrics, None)
