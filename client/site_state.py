"""What a site keeps between rounds and never sends: its local layers, optionally its Adam state, and
its strategy's per-site state.

With ``local-layers`` the parameters matching those patterns stay at the site; with
``client-optimizer = keep`` so does the site's Adam state; a strategy with a part at the site keeps its
per-site arrays here too (SCAFFOLD's control variate ``c_i``, ``client.scaffold``). All live in the ClientApp's Flower
``Context.state`` (kept by Flower for the life of a run) and, when ``site-state-dir`` is set, in
site-local files ``<site-state-dir>/<site>/round-0003.pt``, because a resumed run is a new Flower
run with an empty Context. The fine-tuned personal model goes to ``<site-state-dir>/<site>/finetuned.pt``.

Rounds: the state saved after training round r is what round r's evaluation and round r + 1's
training start from. A resumed server repeats the round after its last checkpoint, and fine-tuning
starts from the best round (``common.protocol.STATE_ROUND``), which early stopping leaves up to
``patience`` rounds behind the last. So the last two rounds' files are kept whole (a resume starts from
one of them), and older rounds' files back to ``patience + 2`` rounds (every round's when patience is off,
or with ``stop-rule = every-site``, since the best round may then be any) are cut down to what fine-tuning
reads, the local layers (the Adam moments and control variates are model-sized; a run of hundreds of
rounds would keep hundreds of copies); without local layers they are removed. What a site restores is the newest state no later than
the round asked for.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from common.atomic import atomic_write
from common.models import build_model
from common.personalise import FINETUNED_FILE, FineTuneResult, split_state
from common.runconfig import RunConfig

logger = logging.getLogger(__name__)

LOCAL_KEY = "fedsense.local-layers"  # Context.state ArrayRecord: the local layers
META_KEY = "fedsense.site-state"  # Context.state ConfigRecord: round, optimiser state (torch.save bytes)
STRATEGY_KEY = "fedsense.strategy-state"  # Context.state ArrayRecord: the strategy's per-site arrays
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.pt$")


@dataclass
class SavedState:
    """One round's site-private state."""

    round: int
    local: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    strategy: dict[str, torch.Tensor] = field(default_factory=dict)


def _optimiser_bytes(state: dict[str, Any] | None) -> bytes:
    if state is None:
        return b""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _optimiser_from_bytes(data: bytes) -> dict[str, Any] | None:
    return torch.load(io.BytesIO(data), weights_only=True) if data else None


class SiteMemory:
    """The site-private state of one site in one run: restore before a phase, remember after training."""

    def __init__(self, context: Context, run: RunConfig, site: str, strategy_state: bool = False) -> None:
        """``strategy_state``: the run's strategy keeps per-site state (see :meth:`remember`)."""
        self.context, self.run, self.site = context, run, site
        self.strategy_state = strategy_state
        self.patterns = run.local_layer_patterns
        self.directory = Path(run.site_state_dir) / site if run.site_state_dir else None

    @property
    def active(self) -> bool:
        """Whether this run keeps anything at the site between rounds."""
        return bool(self.patterns) or self.run.client_optimizer == "keep" or self.strategy_state

    def restore(self, upto_round: int) -> SavedState | None:
        """The newest saved state of a round <= ``upto_round``: from the Context, else the site's files."""
        if not self.active:
            return None
        state = self._from_context()
        if state is not None and state.round <= upto_round:
            return state
        older = self._from_files(upto_round)
        if older is None and state is not None:
            # Trained local layers of a later round are closer to the asked round's than initial weights.
            logger.warning(
                "site %s: no saved state of round %d or before (no site-state-dir keeps older rounds); "
                "it uses its newest, of round %d",
                self.site,
                upto_round,
                state.round,
            )
            return state
        return older

    def model_state(self, shared: dict[str, torch.Tensor], saved: SavedState | None) -> dict[str, torch.Tensor]:
        """The full state dict to load: the server's shared arrays plus this site's local layers.

        Before a site has trained (round 0, or round 1's training), its local layers are the initial
        weights, built from the run seed exactly as the server builds the initial global model.
        """
        if not self.patterns:
            return shared
        local = saved.local if saved is not None else self._initial_local()
        return {**shared, **local}

    def shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The part of ``model``'s weights that may leave the site."""
        shared, _ = split_state(model.state_dict(), self.patterns)
        return shared

    def remember(
        self,
        rnd: int,
        model: nn.Module,
        optimiser: torch.optim.Optimizer | None,
        strategy: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Keep round ``rnd``'s local layers (and Adam state with ``client-optimizer = keep``, and the
        strategy's per-site arrays)."""
        if not self.active:
            return
        _, local = split_state(model.state_dict(), self.patterns)
        local = {k: v.detach().clone() for k, v in local.items()}
        opt_state = optimiser.state_dict() if optimiser is not None and self.run.client_optimizer == "keep" else None
        kept = {k: v.detach().cpu().clone() for k, v in (strategy or {}).items()}
        self.context.state[LOCAL_KEY] = ArrayRecord(local)
        self.context.state[STRATEGY_KEY] = ArrayRecord(kept)
        self.context.state[META_KEY] = ConfigRecord({"round": rnd, "optimizer": _optimiser_bytes(opt_state)})
        if self.directory is None:
            logger.warning(
                "site %s: no site-state-dir set; its local state lives in memory only and a resumed "
                "run starts it afresh",
                self.site,
            )
            return
        payload = {"round": rnd, "local": local, "optimizer": opt_state, "strategy": kept}
        atomic_write(self.directory / f"round-{rnd:04d}.pt", lambda stream: torch.save(payload, stream))
        keep = self.kept_rounds
        for old, path in self._round_files():
            if old >= rnd - 1:
                continue  # the last two rounds stay whole
            if (keep and old <= rnd - keep) or not self.patterns:
                path.unlink(missing_ok=True)
            elif old == rnd - 2:  # older ones were cut down when they were this one
                self._keep_local_only(path)

    def _keep_local_only(self, path: Path) -> None:
        """Rewrite a round's file with its local layers only: all that fine-tuning from that round reads."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated/corrupt files
            logger.warning("%s: not cut down, unreadable site state: %s", path, exc)
            return
        slim = {"round": payload["round"], "local": payload["local"], "optimizer": None, "strategy": {}}
        atomic_write(path, lambda stream: torch.save(slim, stream))

    @property
    def kept_rounds(self) -> int:
        """How many rounds' files are kept (0: all): the best round's must outlive early stopping's wait.

        With ``stop-rule = every-site`` a run goes on while any site still improves, so the best round (of
        the mean) may be any number of rounds behind the last: every round's local layers are kept.
        """
        if self.run.patience <= 0 or self.run.stop_rule == "every-site":
            return 0
        return self.run.patience + 2

    def save_finetuned(self, rnd: int, result: FineTuneResult) -> Path | None:
        """Write the fine-tuned personal model to the site's state directory (never sent)."""
        if self.directory is None:
            logger.warning("site %s: no site-state-dir set; the fine-tuned model is not kept", self.site)
            return None
        payload = {
            "round": rnd,
            "state_dict": result.state_dict,
            "metrics": result.metrics,
            "best_step": result.best_step,
            "config": self.run.to_flat(),
        }
        path = self.directory / FINETUNED_FILE
        atomic_write(path, lambda stream: torch.save(payload, stream))
        return path

    def _from_context(self) -> SavedState | None:
        if META_KEY not in self.context.state.config_records:
            return None
        meta = self.context.state.config_records[META_KEY]
        local = self.context.state.array_records[LOCAL_KEY].to_torch_state_dict()
        strategy = self.context.state.array_records[STRATEGY_KEY].to_torch_state_dict()
        return SavedState(
            int(cast(int, meta["round"])),
            local,
            _optimiser_from_bytes(cast(bytes, meta["optimizer"])),
            strategy,
        )

    def _round_files(self) -> list[tuple[int, Path]]:
        if self.directory is None or not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _ROUND_FILE.match(p.name))]
        return sorted(found, reverse=True)

    def _from_files(self, upto_round: int) -> SavedState | None:
        for rnd, path in self._round_files():
            if rnd > upto_round:
                continue
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for truncated/corrupt files
                logger.warning("%s: skipping unreadable site state: %s", path, exc)
                continue
            logger.info("site %s: restored its local state of round %d from %s", self.site, rnd, path)
            return SavedState(rnd, dict(payload["local"]), payload["optimizer"], dict(payload.get("strategy", {})))
        return None

    def _initial_local(self) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(self.run.seed)
            initial = build_model(self.run.model, **self.run.model_kwargs)
        _, local = split_state(initial.state_dict(), self.patterns)
        return local
