"""The FedSense ClientApp: one hospital site's side of a federated round.

Only the model weights and scalar metrics leave the site; images, k-space and file paths never do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import egress_audit_mod
from client.monitoring import SiteMonitor, counting_read_errors, site_monitor
from client.privacy import client_dp_mod, ledger_path, load_ledger, store_ledger, train_with_budget
from client.rehearsal import slowed
from client.scaffold import ScaffoldRound
from client.secagg import secagg_mod
from client.site_context import site_context
from client.site_errors import site_named_errors_mod
from client.site_state import SavedState, SiteMemory
from client.transport import packed_transport_mod
from common.config_layers import updated
from common.data.loaders import make_loader
from common.device import resolve_device, use_cpu_allotment
from common.errors import ConfigError
from common.models import build_model
from common.personalise import fine_tune_site
from common.protocol import (
    ARRAYS,
    CARRIED,
    COMPUTE_SECONDS,
    CONFIG,
    DP_EPSILON,
    DP_WEIGHT,
    EVALUATE_FIRST,
    FINETUNE_ACTION,
    LOCAL_STEPS,
    METRICS,
    NUM_EXAMPLES,
    PRECISION,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE,
    SITE_NAME,
    STATE_ROUND,
    STEPS,
    SUPERVISION,
)
from common.runconfig import RunConfig
from common.samples import save_samples
from common.ssdu import SSDUTrainLoss, evaluate_self_supervised
from common.training import evaluate as evaluate_model
from common.training import train as train_model

logger = logging.getLogger(__name__)

# Outermost: the other mods, the audit and the handlers see the arrays unpacked (server.transport packs them).
# Innermost: the site's errors name its config, for the site's log (the audit tells the server only the type).
app = ClientApp(mods=[packed_transport_mod, egress_audit_mod, site_named_errors_mod])

#: Strategies with a part at the site: name -> its per-round object (a step hook, then extra reply records).
SITE_ROUNDS = {"scaffold": ScaffoldRound}


def _server_round(msg: Message) -> int:
    """The round number in the message's config (0 when it has none)."""
    return int(cast(int, msg.content[CONFIG].get(SERVER_ROUND, 0)))


def _setup(
    msg: Message, context: Context, state_round: int
) -> tuple[RunConfig, str, torch.nn.Module, dict, SiteMemory, SavedState | None]:
    """The run config, site, datasets, and the model: the server's arrays plus what the site kept
    (its local layers as of ``state_round``; see :mod:`client.site_state`)."""
    known = site_context(context)  # built on the run's first message
    run, site, datasets = known.run, known.site, known.datasets
    use_cpu_allotment()  # torch's threads = the site's CPUs (Ray's --client-cpus, a container's quota)
    torch.manual_seed(run.seed + _server_round(msg))
    model = build_model(run.model, **run.model_kwargs)
    memory = SiteMemory(context, run, site.name, strategy_state=run.strategy in SITE_ROUNDS)
    saved = memory.restore(state_round)
    model.load_state_dict(memory.model_state(msg.content.array_records[ARRAYS].to_torch_state_dict(), saved))
    return run, site.name, model, datasets, memory, saved


def _reply(
    msg: Message,
    site: str,
    metrics: Mapping[str, float],
    arrays: dict[str, torch.Tensor] | None,
    supervision: str = "full",
    precision: str = "",
    extra: dict[str, ArrayRecord] | None = None,
) -> Message:
    # "supervision" lets the server's tables and dashboard mark self-supervised sites; "precision" records
    # what the site's network trained at (precision = auto resolves per site).
    facts = {SITE_NAME: site, SUPERVISION: supervision, **({PRECISION: precision} if precision else {})}
    # dict(): Flower's records take a dict of their whole value union, which dict[str, float] is not.
    content = RecordDict({METRICS: MetricRecord(dict(metrics)), SITE: ConfigRecord(dict(facts))})
    if arrays is not None:
        content[ARRAYS] = ArrayRecord({k: v.detach().cpu() for k, v in arrays.items()})  # CPU, whatever the device
    for key, record in (extra or {}).items():
        content[key] = record
    return Message(content=content, reply_to=msg)


# secagg_mod answers SecAgg+'s stages and masks the reply; plain training messages pass through it.
@app.train(mods=[secagg_mod, client_dp_mod])
@counting_read_errors
def train(msg: Message, context: Context) -> Message:
    """Local training from the global weights; FedProx's proximal term when the server sends mu > 0."""
    clock = HandlerClock()
    server_round = _server_round(msg)
    run, site, model, datasets, memory, saved = _setup(msg, context, state_round=server_round - 1)
    if LOCAL_STEPS in msg.content[CONFIG]:
        # adaptive-local-steps: the server gives a slow site fewer steps, so it replies by the round's deadline.
        run = updated(
            run, "server (adaptive local steps)", local_steps=int(cast(int, msg.content[CONFIG][LOCAL_STEPS]))
        )
    clock.setup_done()
    monitor = site_monitor()
    monitor.watch(datasets)
    mu = float(cast(float, msg.content[CONFIG].get(PROXIMAL_MU, run.proximal_term_mu)))
    carried: dict[str, float] = {}
    if msg.content[CONFIG].get(EVALUATE_FIRST, False):
        # evaluate-with-train: the model received is round (server_round - 1)'s; score it before training.
        carried = {f"{CARRIED}{k}": v for k, v in _validate(run, site, model, datasets, server_round - 1).items()}
    device = resolve_device(run.device, "run config: device")
    model.to(device)  # before the optimiser (and any kept state) is bound to the parameters
    optimiser = torch.optim.Adam(model.parameters(), lr=run.learning_rate)
    if run.client_optimizer == "keep" and saved is not None and saved.optimizer is not None:
        optimiser.load_state_dict(saved.optimizer)
    loader = make_loader(
        datasets["train"], run.batch_size, shuffle=True, seed=run.seed + server_round, augment=run.augment
    )
    supervision = datasets["train"].config.supervision
    # A self-supervised site's batches carry no reference: its loss is SSDU's, in k-space.
    batch_loss = (
        SSDUTrainLoss(run.ssdu_rho, run.ssdu_masks, seed=run.seed, epoch=server_round)
        if supervision == "self"
        else None
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    if run.dp_noise_multiplier > 0:
        reply = _train_private(msg, context, run, site, model, loader, mu, memory, supervision, carried, clock, monitor)
        monitor.finished(datasets)
        return reply
    kept = saved.strategy if saved is not None else {}
    site_round = SITE_ROUNDS[run.strategy](msg, kept, model) if run.strategy in SITE_ROUNDS else None
    result = train_model(
        model,
        loader,
        epochs=run.local_epochs,
        steps=run.local_steps,
        lr=run.learning_rate,
        loss=run.loss,
        proximal_mu=mu,
        batch_loss=batch_loss,
        optimiser=optimiser,
        device=device,
        precision=run.precision,
        compile=run.compile,
        on_step=slowed(monitor.step_timer(), site_context(context).site.rehearsal.slowdown),
        step_hook=site_round.step_hook if site_round is not None else None,
    )
    monitor.trained(server_round)
    monitor.finished(datasets)
    strategy_state, extra = site_round.finish() if site_round is not None else ({}, None)
    memory.remember(server_round, model, optimiser, strategy_state)
    logger.info("site %s round %d: train loss %.4f over %d steps", site, server_round, result.loss, result.steps)
    # compute-seconds lets the server separate local compute from federation overhead per round.
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        "loss": result.loss,
        STEPS: result.steps,
        COMPUTE_SECONDS: time.perf_counter() - started,
        # CPU time of this process: the step rate on a shared machine, whatever else runs there.
        "compute-cpu-seconds": time.process_time() - cpu_started,
        **_client_dp_weight(run),
        **carried,
    }
    # Only the shared part leaves the site; local layers (local-layers) stay here.
    return _reply(msg, site, clock.stamp(metrics), memory.shared(model), supervision, result.precision, extra)


class HandlerClock:
    """Where a handler's time went, sent with its metrics so the server can split a reply's latency into
    set-up (run config, site, model and weights), compute, and what lies outside the ClientApp (message
    delivery, task start, reply transport)."""

    def __init__(self) -> None:
        self.entered = time.perf_counter()
        self.setup_seconds = 0.0

    def setup_done(self) -> None:
        self.setup_seconds = time.perf_counter() - self.entered

    def stamp(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` plus ``setup-seconds`` and ``handler-seconds`` (entry until now)."""
        return {**metrics, "setup-seconds": self.setup_seconds, "handler-seconds": time.perf_counter() - self.entered}


def _client_dp_weight(run: RunConfig) -> dict[str, float]:
    # Client-level DP averages the clipped updates uniformly (the server weights by this key).
    return {DP_WEIGHT: 1.0} if run.dp_client_level != "off" else {}


def _train_private(
    msg: Message,
    context: Context,
    run: RunConfig,
    site: str,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    mu: float,
    memory: SiteMemory,
    supervision: str,
    carried: dict[str, float],
    clock: HandlerClock,
    monitor: SiteMonitor,
) -> Message:
    """DP-SGD training; ε from the site's ledger. Past the target ε the site sends no weights, only the flag."""
    started = time.perf_counter()
    path = ledger_path(context, run, site_context(context).site_path, site)
    result, ledger, privacy = train_with_budget(run, model, loader, mu, load_ledger(context, path))
    if result is None:
        metrics = {NUM_EXAMPLES: 0, **privacy, COMPUTE_SECONDS: time.perf_counter() - started, **carried}
        return _reply(msg, site, clock.stamp(metrics), None, supervision)
    store_ledger(context, path, ledger)
    monitor.trained(_server_round(msg), steps=result.steps)
    logger.info(
        "site %s: DP-SGD loss %.4f over %d steps, ε=%.3f at δ=%g",
        site,
        result.loss,
        result.steps,
        privacy[DP_EPSILON],
        run.dp_delta,
    )
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        "loss": result.loss,
        STEPS: result.steps,
        COMPUTE_SECONDS: time.perf_counter() - started,
        **privacy,
        **_client_dp_weight(run),
        **carried,
    }
    return _reply(msg, site, clock.stamp(metrics), memory.shared(model), supervision)


@app.evaluate()
@counting_read_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Validation-split PSNR / SSIM / NMSE of the global model at this site (with its own local layers)."""
    clock = HandlerClock()
    server_round = _server_round(msg)
    run, site, model, datasets, _, _ = _setup(msg, context, state_round=server_round)
    clock.setup_done()
    monitor = site_monitor()
    monitor.watch(datasets)
    metrics = _validate(run, site, model, datasets, server_round)
    monitor.finished(datasets)
    return _reply(msg, site, clock.stamp(metrics), None, datasets["val"].config.supervision)


def _validate(run: RunConfig, site: str, model: torch.nn.Module, datasets: dict, server_round: int) -> dict[str, float]:
    """Validation metrics of ``model`` as round ``server_round``'s (samples written site-locally)."""
    loader = make_loader(datasets["val"], run.batch_size, shuffle=False, seed=run.seed)
    device = resolve_device(run.device, "run config: device")
    num_samples = run.num_samples if run.sample_dir else 0
    started = time.perf_counter()
    supervision = datasets["val"].config.supervision
    if supervision == "self":
        result = evaluate_self_supervised(
            model,
            loader,
            rho=run.ssdu_rho,
            seed=run.seed,
            reference=datasets["val"].has_reference,
            loss=run.loss,
            max_slices=run.max_eval_slices,
            num_samples=num_samples,
        )
    else:
        result = evaluate_model(
            model,
            loader,
            loss=run.loss,
            max_slices=run.max_eval_slices,
            num_samples=num_samples,
            device=device,
            precision=run.precision,
        )
    if run.sample_dir and result.samples:
        # Sample images stay on this machine: written to a site-local directory, never sent.
        save_samples(run.sample_dir, server_round, site, result.samples)
    logger.info("site %s round %d: %s", site, server_round, result.metrics)
    return {NUM_EXAMPLES: result.num_examples, **result.metrics, COMPUTE_SECONDS: time.perf_counter() - started}


@app.train(FINETUNE_ACTION)
@counting_read_errors
def finetune(msg: Message, context: Context) -> Message:
    """After the last round: fine-tune the final model on this site's training split, keep the best
    by validation, write it to the site's state directory, and report only its validation metrics."""
    clock = HandlerClock()
    server_round = _server_round(msg)
    # The arrays are the best round's, so the local layers must be that round's too, not the last one's.
    state_round = int(cast(int, msg.content[CONFIG].get(STATE_ROUND, server_round)))
    run, site, model, datasets, memory, _ = _setup(msg, context, state_round=state_round)
    clock.setup_done()
    if datasets["train"].config.supervision == "self":
        # Fine-tuning selects by validation PSNR against a reference, which a self-supervised site lacks.
        raise ConfigError(f"fine-tune-steps: not supported at self-supervised site {site}")
    started = time.perf_counter()
    result = fine_tune_site(model, datasets, run)
    memory.save_finetuned(server_round, result)
    logger.info(
        "site %s fine-tuned: best of %d steps at step %d: %s", site, result.steps, result.best_step, result.metrics
    )
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        **result.metrics,
        STEPS: result.steps,
        "best-step": result.best_step,
        "start-psnr": result.start_metrics["psnr"],
        COMPUTE_SECONDS: time.perf_counter() - started,
    }
    return _reply(msg, site, clock.stamp(metrics), None)
