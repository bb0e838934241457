"""The federated round loop: configure, send, validate, aggregate, evaluate, record, checkpoint.

FedSense drives Flower's strategies round by round itself (rather than ``Strategy.start``) so
that it can resume from a checkpoint at any round, keep unsafe updates out of the aggregate,
and write every site's metrics of every round to the run directory as they arrive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.errors import FedSenseError
from common.runconfig import RunConfig
from server.best import BestTracker
from server.claims import Clipped, apply_caps
from server.collect import send_and_collect
from server.identity import SiteIdentity
from server.optimisers import optimiser_state
from server.pace import Pace
from server.privacy import client_dp_metrics, secure_client_dp_metrics
from server.receipts import Receipts
from server.round_state import round_state_of
from server.secagg import apply_update, secure_mean_update
from server.site_errors import LATE, STRAGGLER
from server.store import RunDir, global_record, site_record
from server.strategy import Rejection, precision_of, site_of, supervision_of, validate_updates

logger = logging.getLogger(__name__)

#: The ClientApp's fine-tuning action (``@app.train(FINETUNE_ACTION)`` in client/app.py).
FINETUNE_MESSAGE = f"{MessageType.TRAIN}.{protocol.FINETUNE_ACTION}"


class RoundFailed(FedSenseError):
    """Too few sites replied (or survived validation) for a round to be aggregated."""


def _site_records(
    run: RunConfig,
    rnd: int,
    phase: str,
    replies: list[Message],
    prefix: str = "",
    reply_seconds: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One record per reply; ``prefix`` selects (and strips) the metrics of a carried evaluation.

    Without a prefix, carried metrics are left out, so a training record holds training metrics only.
    ``reply_seconds`` (request message id -> seconds from the phase's push to its arrival) becomes the
    record's ``reply_seconds``: with the site's own ``setup-seconds`` and ``handler-seconds`` it splits
    a phase's overhead into the site's set-up and everything outside the ClientApp.
    """
    records = []
    for msg in replies:
        raw = dict(next(iter(msg.content.metric_records.values())))
        if prefix:
            metrics = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
            if protocol.NUM_EXAMPLES not in metrics:
                continue
        else:
            metrics = {k: v for k, v in raw.items() if not k.startswith(protocol.CARRIED)}
        n = int(cast(int, metrics.pop(protocol.NUM_EXAMPLES)))
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        seconds = (reply_seconds or {}).get(msg.metadata.reply_to_message_id)
        timing = {"reply_seconds": seconds} if seconds is not None else {}
        records.append(
            site_record(
                run.name, rnd, phase, site_of(msg), n, numeric, **supervision_of(msg), **precision_of(msg), **timing
            )
        )
    return records


def _global_record(
    run: RunConfig, rnd: int, phase: str, site_records: list[dict[str, Any]], rejected: list[Rejection], seconds: float
) -> dict[str, Any]:
    """The example-weighted mean of the sites' metrics, with who contributed and who did not."""
    slowest = max((r["metrics"].get(protocol.COMPUTE_SECONDS, 0.0) for r in site_records), default=0.0)
    return global_record(
        run.name,
        rnd,
        phase,
        site_records,
        rejected=[{"site": r.site, "reason": r.reason} for r in rejected],
        seconds=seconds,
        # Wall time of the phase beyond the slowest site's own compute: what federation costs.
        overhead_seconds=seconds - slowest,
    )


def _error_rejections(replies: list[Message], sent: Mapping[str, int]) -> tuple[list[Message], list[Rejection]]:
    """Split off error replies, naming the node each request went to.

    The SuperLink itself answers for a node that stopped heartbeating ("node unavailable"), from its
    own node id; ``sent`` (request message id -> destination node) names the node that died instead.
    """
    ok, bad = [], []
    for msg in replies:
        if msg.has_error():
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            bad.append(Rejection(f"node-{node}", f"error reply: {msg.error.reason}", msg.metadata.message_id))
        else:
            ok.append(msg)
    return ok, bad


def _note_clipped(summary: dict[str, Any], clipped: list[Clipped]) -> None:
    """Name in a phase's global record the claims that were cut to their site's cap."""
    if clipped:
        summary["clipped"] = [{"site": c.site, "claimed": c.claimed, "cap": c.cap, "reason": c.reason} for c in clipped]


class Outstanding(NamedTuple):
    """A straggler's unanswered training message: the round it belongs to, its node and when it was sent."""

    round: int
    node: int
    sent: float


class Federation:
    """Runs rounds ``start..num_server_rounds`` of one run against a Flower grid."""

    def __init__(self, grid: Grid, run: RunConfig, strategy: Strategy, store: RunDir, model: torch.nn.Module) -> None:
        self.grid, self.run, self.strategy, self.store, self.model = grid, run, strategy, store, model
        #: The global summary of the evaluation the last training round carried (evaluate-with-train).
        self.carried: dict[str, Any] | None = None
        #: Seconds from the last phase's push to each reply's arrival, by the id of the message it answers.
        self.reply_seconds: dict[str, float] = {}
        self.best = BestTracker(store, run.select_metric, run.patience, every_site=run.stop_rule == "every-site")
        #: Each site's validation metrics by round, until :meth:`_stops` has counted them (``stop-rule``).
        self.evaluated: dict[int, dict[str, dict[str, float]]] = {}
        #: Replies are taken from the site their node's key was registered for (``site-keys``).
        self.identity = SiteIdentity.from_file(run.site_keys)
        #: Every reply received and its verdict (``received.jsonl``): each accepted exactly once.
        self.receipts = Receipts(run.run_dir, resume=run.resume)
        #: The last phase's messages (id -> node) and every reply it received, for :meth:`_record`.
        self.phase: tuple[dict[str, int], list[Message]] = ({}, [])
        #: What the strategy adds to each round (:mod:`server.round_state`; SCAFFOLD's control variates).
        self.round_state = round_state_of(strategy)
        #: Seconds per step of each node and the local steps it gets next (``adaptive-local-steps``).
        self.pace = Pace(run)
        #: The site each node last replied as: names the stragglers, which send nothing in time.
        self.node_sites: dict[int, str] = {}
        #: Training messages left unanswered at a round's deadline (message id -> round, node, when sent):
        #: their late replies are pulled with later phases and discarded.
        self.outstanding: dict[str, Outstanding] = {}
        #: The sites the last training phase did not wait for (``round-deadline``).
        self.stragglers: list[str] = []
        #: The sites the last training phase asked for fewer local steps, and how many.
        self.paced: dict[str, int] = {}
        self._round = 0  # the training round in progress (the round a straggler is recorded for)

    def wait_for_nodes(self, needed: int) -> None:
        """Block until ``needed`` SuperNodes are connected; fail clearly after ``node-wait-timeout``.

        (Flower's own sampling would wait forever, which hides a dead federation.)
        """
        deadline = time.monotonic() + self.run.node_wait_timeout
        while (connected := len(list(self.grid.get_node_ids()))) < needed:
            if time.monotonic() > deadline:
                raise RoundFailed(
                    f"only {connected} of the {needed} required sites connected within "
                    f"{self.run.node_wait_timeout:.0f} s (node-wait-timeout)"
                )
            time.sleep(1.0)

    def _send(
        self, messages: Iterable[Message], deadline: bool = False, settle: bool = False
    ) -> tuple[list[Message], list[Rejection]]:
        """Send one phase's messages and collect the replies until ``round-timeout``.

        With ``deadline`` (a training phase) and a ``round-deadline``, collection ends at the deadline once
        ``min-train-nodes`` replied; the sites still silent are this phase's :attr:`stragglers`, and so are
        the sites not sent this phase's message because they still train an earlier round's. With ``settle``
        (fine-tuning: every site's last chance) the phase first waits for those, up to their ``round-timeout``.

        Returns the replies that are not errors, in site order, and a rejection for every node that sent an error
        or nothing in time (so the round's record accounts for every site it asked), for every late, duplicate
        or replayed reply (:mod:`server.receipts`; a straggler's late reply among them) and every reply from a
        site other than its key's (:mod:`server.identity`).
        """
        messages = list(messages)
        early = self._pull_late(settle)  # a straggler whose late reply is in is free for this phase
        pulled = {m.metadata.reply_to_message_id for m in early}
        busy = self._busy_nodes(pulled)
        skipped = [m for m in messages if m.metadata.dst_node_id in busy]
        # A straggler still training an earlier round is not sent more work: it would only queue behind that.
        messages = [m for m in messages if m.metadata.dst_node_id not in busy]
        cutoff = self.run.round_deadline if deadline else 0.0
        t0 = time.monotonic()
        arrivals = send_and_collect(
            self.grid,
            messages,
            self.run.round_timeout,
            round_deadline=cutoff,
            enough=self.run.min_train_nodes,
            also_pull=set(self.outstanding) - pulled,
        )
        timed_out = time.monotonic() - t0 >= self.run.round_timeout
        replies = early + [a.message for a in arrivals]
        # The grid stamps each message with its id while sending it.
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        self.reply_seconds = {
            a.message.metadata.reply_to_message_id: a.seconds
            for a in arrivals
            if a.message.metadata.reply_to_message_id in sent
        }
        self.phase = (sent, replies)
        fresh, stale = self.receipts.screen(sent, replies)
        stale = self._late_stragglers(replies, stale)
        ok, failed = _error_rejections(fresh, sent)
        self.identity.refresh(self.grid)
        ok, impostors = self.identity.check(ok)
        self.node_sites.update((m.metadata.src_node_id, site_of(m)) for m in ok)
        # In site order, not arrival order: floating-point sums (the aggregate, the metrics' means) then
        # do not depend on which site answered first.
        ok.sort(key=site_of)
        answered = {m.metadata.reply_to_message_id for m in fresh}
        unanswered = {message_id: node for message_id, node in sent.items() if message_id not in answered}
        if cutoff > 0 and not timed_out:
            self.stragglers = sorted(self.node_sites.get(node, f"node-{node}") for node in unanswered.values())
            self.outstanding.update({mid: Outstanding(self._round, node, t0) for mid, node in unanswered.items()})
            self.pace.missed(unanswered.values())
            reason = f"{STRAGGLER}no reply by round-deadline ({cutoff:g} s); a late reply is discarded"
        else:
            self.stragglers = []
            reason = f"no reply within round-timeout ({self.run.round_timeout:g} s)"
        silent = [
            Rejection(self.node_sites.get(node, f"node-{node}") if cutoff > 0 else f"node-{node}", reason)
            for node in unanswered.values()
        ]
        for msg in skipped:
            node = msg.metadata.dst_node_id
            name = self.node_sites.get(node, f"node-{node}")
            silent.append(Rejection(name, f"{STRAGGLER}still training round {busy[node]}; not sent this phase"))
            self.paced.pop(name, None)  # its paced steps were never sent
            if cutoff > 0:
                self.stragglers = sorted([*self.stragglers, name])
        return ok, failed + silent + stale + impostors

    def _pull_late(self, wait: bool = False) -> list[Message]:
        """The stragglers' late replies at the SuperLink: one pull, or with ``wait`` every one that comes
        within its message's ``round-timeout``."""
        pending = set(self.outstanding)
        if not pending:
            return []
        stop = max(late.sent for late in self.outstanding.values()) + self.run.round_timeout
        if wait:
            logger.info("waiting for %d straggler(s) to finish their round", len(pending))
        replies: list[Message] = []
        while True:
            arrived = list(self.grid.pull_messages(sorted(pending)))
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not wait or not pending or time.monotonic() >= stop:
                return replies
            time.sleep(0.1)

    def _busy_nodes(self, answered: set[str]) -> dict[int, int]:
        """Nodes still training an earlier round (node -> that round), leaving out the messages ``answered``
        already; a message unanswered for longer than ``round-timeout`` is given up (its node is asked again)."""
        now = time.monotonic()
        for message_id, late in list(self.outstanding.items()):
            if now - late.sent > self.run.round_timeout:
                logger.warning(
                    "gave up on round %d's message %s to node %d after round-timeout",
                    late.round,
                    message_id[:12],
                    late.node,
                )
                del self.outstanding[message_id]
        return {late.node: late.round for mid, late in self.outstanding.items() if mid not in answered}

    def _late_stragglers(self, replies: list[Message], stale: list[Rejection]) -> list[Rejection]:
        """Name the stragglers' late replies among ``stale`` as such; their step times still pace the site."""
        late = {
            m.metadata.message_id: self.outstanding.pop(m.metadata.reply_to_message_id).round
            for m in replies
            if m.metadata.reply_to_message_id in self.outstanding
        }
        self.pace.observe([m for m in replies if m.metadata.message_id in late], {})
        for message_id, rnd in late.items():
            logger.info("discarded a straggler's late reply to round %d (message %s)", rnd, message_id[:12])
        return [
            Rejection(r.site, f"{LATE} to round {late[r.message_id]}, discarded", r.message_id)
            if r.message_id in late
            else r
            for r in stale
        ]

    def _record(self, rnd: int, phase: str, accepted: list[Message], rejected: list[Rejection]) -> None:
        """Append the last phase's verdicts to ``received.jsonl`` (:class:`server.receipts.Receipts`)."""
        sent, received = self.phase
        self.receipts.record(rnd, phase, sent, received, accepted, rejected)

    @property
    def carries_evaluation(self) -> bool:
        """Whether each training message also asks for the evaluation of the model it carries."""
        return self.run.evaluate_with_train and self.run.fraction_evaluate > 0.0

    def _train_config(self, rnd: int) -> ConfigRecord:
        return ConfigRecord(
            {
                protocol.PROXIMAL_MU: self.run.proximal_term_mu,
                protocol.EVALUATE_FIRST: self.carries_evaluation,
                **self.round_state.train_config(rnd),
            }
        )

    def _train_messages(self, rnd: int, arrays: ArrayRecord) -> list[Message]:
        """The strategy's training messages, with the records its round state adds to each.

        A node that :attr:`pace` slows down gets its own config record, with its ``local-steps``.
        """
        messages = list(self.strategy.configure_train(rnd, arrays, self._train_config(rnd), self.grid))
        extra = self.round_state.train_records(rnd)
        for content in {id(m.content): m.content for m in messages}.values():  # often one, shared
            for key, record in extra.items():
                content[key] = record
        self.paced = {}
        for msg in messages:
            steps = self.pace.steps_for(msg.metadata.dst_node_id)
            if steps is not None:
                content = RecordDict(dict(msg.content.items()))  # the arrays are shared, not copied
                content[protocol.CONFIG] = ConfigRecord(
                    {**msg.content.config_records[protocol.CONFIG], protocol.LOCAL_STEPS: steps}
                )
                msg.content = content
                self.paced[self.node_sites.get(msg.metadata.dst_node_id, f"node-{msg.metadata.dst_node_id}")] = steps
        if self.paced:
            logger.info("round %d: adaptive local steps %s (others: %d)", rnd, self.paced, self.run.local_steps)
        return messages

    def evaluate_round(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """Federated evaluation of ``arrays`` on every sampled site's validation split."""
        if self.run.fraction_evaluate == 0.0:
            return None
        self.wait_for_nodes(max(self.run.min_available_nodes, self.run.min_evaluate_nodes))
        messages = self.strategy.configure_evaluate(rnd, arrays, ConfigRecord(), self.grid)
        return self._metrics_phase(rnd, "evaluate", messages, f"round {rnd}: evaluation")

    def _metrics_phase(
        self, rnd: int, phase: str, messages: Iterable[Message], what: str, settle: bool = False
    ) -> dict[str, Any]:
        """Send a phase whose replies carry only metrics; at least ``min-evaluate-nodes`` must answer.

        Records every site's metrics and their global summary as ``phase`` of round ``rnd``; ``settle``:
        see :meth:`_send`.
        """
        t0 = time.time()
        ok, failed = self._send(messages, settle=settle)
        # Evaluation claims are capped like training ones: they weigh the global validation metrics.
        ok, uncapped, clipped = apply_caps(ok, self.run.caps)
        failed += uncapped
        self._record(rnd, phase, ok, failed)
        if len(ok) < self.run.min_evaluate_nodes:
            raise RoundFailed(
                f"{what} needs {self.run.min_evaluate_nodes} sites, {len(ok)} replied"
                + (f" ({'; '.join(f'{r.site}: {r.reason}' for r in failed)})" if failed else "")
            )
        records = _site_records(self.run, rnd, phase, ok, reply_seconds=self.reply_seconds)
        summary = _global_record(self.run, rnd, phase, records, failed, time.time() - t0)
        _note_clipped(summary, clipped)
        if phase == "evaluate":
            self.evaluated[rnd] = {r["site"]: r["metrics"] for r in records}
        self.store.append_metrics(records + [summary])
        return summary

    def train_round(self, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round of local training at the sites and aggregation of the valid updates.

        With ``evaluate-with-train`` the sites first evaluate the model they received (round
        ``rnd - 1``'s global model); that evaluation is recorded as round ``rnd - 1``'s, and its
        global summary kept in :attr:`carried`.
        """
        self.wait_for_nodes(max(self.run.min_available_nodes, self.run.min_train_nodes))
        t0 = time.time()
        if self.run.secagg:
            return self._secure_train_round(rnd, arrays, t0)
        self._round = rnd
        replies, failed = self._send(self._train_messages(rnd, arrays), deadline=True)
        self.pace.observe(replies, self.reply_seconds)
        self.carried = None
        if self.carries_evaluation:
            carriers, _, eval_clipped = apply_caps(
                list(replies), self.run.caps, key=f"{protocol.CARRIED}{protocol.NUM_EXAMPLES}"
            )
            evaluated = _site_records(self.run, rnd - 1, "evaluate", carriers, prefix=protocol.CARRIED)
            if evaluated:
                # The evaluation rode on the training message: it has no wall time or overhead of its own.
                compute = max(r["metrics"].get(protocol.COMPUTE_SECONDS, 0.0) for r in evaluated)
                self.carried = _global_record(self.run, rnd - 1, "evaluate", evaluated, failed, compute)
                self.evaluated[rnd - 1] = {r["site"]: r["metrics"] for r in evaluated}
                self.carried["carried_by"] = f"round {rnd} train"
                _note_clipped(self.carried, eval_clipped)
                self.store.append_metrics(evaluated + [self.carried])
        unusable = self.round_state.take(replies, arrays)
        replies = [m for m in replies if all(m is not bad for bad, _ in unusable)]
        valid, rejected = validate_updates(replies, arrays, self.run.norm_outlier_factor)
        rejected = [Rejection(site_of(m), reason, m.metadata.message_id) for m, reason in unusable] + rejected
        valid, uncapped, clipped = apply_caps(valid, self.run.caps)
        rejected = failed + rejected + uncapped
        self._record(rnd, "train", valid, rejected)
        if len(valid) < self.run.min_train_nodes:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "no reply in time"
            raise RoundFailed(f"round {rnd}: {len(valid)} valid updates, {self.run.min_train_nodes} needed ({reasons})")
        new_arrays, _ = self.strategy.aggregate_train(rnd, valid)
        if new_arrays is None:
            raise RoundFailed(f"round {rnd}: the strategy produced no aggregate")
        self.round_state.absorb(rnd, valid, len(list(self.grid.get_node_ids())))
        records = _site_records(self.run, rnd, "train", valid, reply_seconds=self.reply_seconds)
        summary = _global_record(self.run, rnd, "train", records, rejected, time.time() - t0)
        summary["metrics"].update(client_dp_metrics(self.strategy))
        _note_clipped(summary, clipped)
        if self.run.round_deadline > 0:
            summary["stragglers"] = self.stragglers
            summary["metrics"]["stragglers"] = float(len(self.stragglers))
        if self.paced:
            summary["local_steps"] = self.paced
        self.store.append_metrics(records + [summary])
        return new_arrays

    def _secure_train_round(self, rnd: int, arrays: ArrayRecord, t0: float) -> ArrayRecord:
        """Round ``rnd``'s training through SecAgg+ (:mod:`server.secagg`): only the sum is ever unmasked.

        The sites FedSense's strategy samples train; their example-weighted mean update, added to the
        global weights, goes to the strategy as one reply, so FedAvg / FedProx keep it and the server
        optimisers take it as their pseudo-gradient. Per-site checks of the update cannot run (the
        server never sees one); the aggregate must be finite.
        """
        messages = list(self.strategy.configure_train(rnd, arrays, self._train_config(rnd), self.grid))
        if not messages:
            raise RoundFailed(f"round {rnd}: the strategy sampled no sites")
        nodes = [m.metadata.dst_node_id for m in messages]
        secure = secure_mean_update(
            self.grid, self.run, rnd, arrays, nodes, messages[0].content.config_records[protocol.CONFIG]
        )
        self.carried = None
        if self.carries_evaluation:
            evaluated = _site_records(self.run, rnd - 1, "evaluate", secure.replies, prefix=protocol.CARRIED)
            if evaluated:
                compute = max(r["metrics"].get(protocol.COMPUTE_SECONDS, 0.0) for r in evaluated)
                self.carried = _global_record(self.run, rnd - 1, "evaluate", evaluated, [], compute)
                self.evaluated[rnd - 1] = {r["site"]: r["metrics"] for r in evaluated}
                self.carried["carried_by"] = f"round {rnd} train"
                self.store.append_metrics(evaluated + [self.carried])
        dropped = [Rejection(f"node-{n}", "dropped out of the SecAgg+ round") for n in secure.dropped]
        reasons = "; ".join(f"{r.site}: {r.reason}" for r in dropped)
        if secure.mean_update is None or len(secure.replies) < self.run.min_train_nodes:
            raise RoundFailed(f"round {rnd}: SecAgg+ unmasked no sum of {self.run.min_train_nodes} sites ({reasons})")
        if not all(np.all(np.isfinite(v)) for v in secure.mean_update.values()):
            raise RoundFailed(f"round {rnd}: the SecAgg+ aggregate is not finite (every site's weight was 0?)")
        total = sum(
            float(cast(float, r.content.metric_records[protocol.METRICS].get(protocol.NUM_EXAMPLES, 0)))
            for r in secure.replies
        )
        mean = Message(
            RecordDict(
                {
                    protocol.ARRAYS: apply_update(arrays, secure.mean_update),
                    protocol.METRICS: MetricRecord(
                        {
                            protocol.NUM_EXAMPLES: max(total, 1.0),
                            **({protocol.DP_WEIGHT: 1.0} if self.run.dp_client_level != "off" else {}),
                        }
                    ),
                }
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        new_arrays, _ = self.strategy.aggregate_train(rnd, [mean])
        if new_arrays is None:
            raise RoundFailed(f"round {rnd}: the strategy produced no aggregate")
        records = _site_records(self.run, rnd, "train", secure.replies)
        summary = _global_record(self.run, rnd, "train", records, dropped, time.time() - t0)
        summary["secagg"] = {"stage_seconds": secure.stage_seconds, "sites_summed": len(secure.replies)}
        summary["metrics"].update(secure_client_dp_metrics(self.run, rnd))
        self.store.append_metrics(records + [summary])
        return new_arrays

    def fine_tune_round(self, rnd: int, arrays: ArrayRecord, state_round: int | None = None) -> dict[str, Any]:
        """Every connected site fine-tunes the final model on its own data (``fine-tune-steps``).

        ``arrays`` are round ``state_round``'s (default ``rnd``): each site adds its local layers of that
        round. The sites keep the fine-tuned weights; their validation metrics are recorded as phase
        ``finetune`` of round ``rnd`` (the last round).
        """
        self.wait_for_nodes(max(self.run.min_available_nodes, self.run.min_evaluate_nodes))
        config: dict[str, Any] = {
            protocol.SERVER_ROUND: rnd,
            protocol.STATE_ROUND: rnd if state_round is None else state_round,
        }
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord(config)})
        messages = [
            Message(content=content, message_type=FINETUNE_MESSAGE, dst_node_id=node)
            for node in self.grid.get_node_ids()
        ]
        # A straggler still training the last round is waited for: it must not be left without its model.
        return self._metrics_phase(rnd, "finetune", messages, "fine-tuning", settle=True)

    def run_rounds(self, start: int, arrays: ArrayRecord) -> tuple[int, ArrayRecord]:
        """Rounds ``start..N``; each ends with an atomic checkpoint of the global model.

        After each evaluated round ``best.json`` is updated (:mod:`server.best`); once ``patience``
        rounds pass without improvement the loop stops early (see :attr:`BestTracker.exhausted`).
        Returns the last round checkpointed and its global model.
        """
        config = self.run.to_flat()
        self.best.resume(start - 1)
        done = start - 1
        if self.best.exhausted:  # a resumed run that had already stopped early stays stopped
            return done, arrays
        last = self.run.num_server_rounds
        for rnd in range(start, last + 1):
            logger.info("round %d/%d", rnd, last)
            previous = arrays
            arrays = self.train_round(rnd, arrays)
            if self.carried is not None and rnd > 1 and self._stops(rnd - 1, self.carried):
                # Round rnd - 1 was the last one worth keeping; round rnd is neither evaluated nor saved.
                arrays = previous
                break
            # With evaluate-with-train the next round's training evaluates this round's model.
            summary = self.evaluate_round(rnd, arrays) if not self.carries_evaluation or rnd == last else None
            state = arrays.to_torch_state_dict()
            # A server optimiser's moments go with the weights, so a resumed run continues the same optimisation.
            server_optimizer = optimiser_state(self.strategy)
            extra = {"server_optimizer": server_optimizer} if server_optimizer is not None else {}
            # So does the strategy's own round state (SCAFFOLD's control variate c).
            if round_state := self.round_state.state_dict():
                extra["round_state"] = round_state
            self.store.save_checkpoint(rnd, state, config, extra=extra)
            done = rnd
            if summary is not None and self._stops(rnd, summary):
                break
        return done, arrays

    def _stops(self, rnd: int, summary: dict[str, Any]) -> bool:
        """Update ``best.json`` with round ``rnd``'s evaluation; True once patience is exhausted."""
        self.best.update(rnd, summary["metrics"], self.evaluated.pop(rnd, None))
        if self.best.exhausted:
            logger.info("stopping early after round %d: %s", rnd, self.best.stop_detail()["early_stop"])
        return self.best.exhausted
