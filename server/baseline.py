"""The baselines every federated-MRI paper compares against, written in the federated runs' format.

- ``zero-filled``: no learning, the inverse FFT of the undersampled k-space (round 0 only).
- ``local``: each site trains its own model on its own data only, for the same number of rounds
  and local steps as a federated run.
- ``centralized``: one model trained on all sites' data pooled (what federation avoids), every training
  slice equally likely (:class:`common.data.pooled.PooledLoader`), with the same total number of
  optimisation steps per round as a federated round (sites × local steps).
- ``centralized-balanced``: the same, but the batches come from each site in turn, so every site gets the
  same number of steps however few slices it has (the older, site-balanced variant).

Optimiser semantics follow the run's ``client-optimizer``, as a federated site's do: ``reset`` builds a
fresh Adam every round, ``keep`` carries each model's Adam state from round to round, so a comparison
with a federated run trains every arm alike.

An interrupted baseline (Ctrl-C, SIGTERM) resumes like a federated run: each round's checkpoint holds the
model(s) and, with ``keep``, the Adam state(s), so ``execute(resume=True)`` continues after the last
complete round as if it had not stopped.

All three evaluate on each site's validation split with the same code as the ClientApp, so one
table (``fedsense metrics show``) compares them with FedAvg and FedProx. Like a federated run they keep
``best.json`` up to date and stop early after ``patience`` rounds without improvement (:mod:`server.best`).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch

from common.data.dataset import SiteDataset
from common.data.loaders import InterleavedLoader, load_site, make_loader
from common.data.pooled import PooledLoader
from common.data.selfsup import ReferencedDataset
from common.device import cpu_state_dict, resolve_device
from common.errors import ConfigError
from common.models import build_model
from common.proctree import ProcessTree
from common.registry import BASELINES
from common.runconfig import RunConfig
from common.samples import save_samples
from common.ssdu import SiteLoss, check_model, evaluate_self_supervised
from common.training import EvalResult, evaluate, train
from server.best import BestTracker
from server.store import GLOBAL_SITE, RunDir, global_record, site_record
from server.tracking.tracked import tracked_store

logger = logging.getLogger(__name__)

KINDS = BASELINES


class Baseline:
    """One baseline run over the sites of ``run.sites``, recorded in ``run.run_dir``."""

    def __init__(self, kind: str, run: RunConfig) -> None:
        if kind not in KINDS:
            raise ConfigError(f"baseline: kind: must be one of {KINDS}, got {kind!r}")
        if not run.site_list:
            raise ConfigError("baseline: sites: at least one site config is needed")
        self.kind, self.run = kind, run
        self.sites: dict[str, dict[str, SiteDataset]] = {}
        self.self_supervised: set[str] = set()
        for path in run.site_list:
            config, datasets = load_site(path)
            self.sites[config.name] = datasets
            if config.supervision == "self":
                self.self_supervised.add(config.name)
                if kind != "zero-filled":
                    check_model(run.model, f"baseline (site {path})")
        self.store = tracked_store(run)  # metrics.jsonl, plus the trackers of `tracking`
        self.device = resolve_device(run.device, "run config: device")
        self.precision = run.precision  # "auto" is measured by train()/evaluate(); records say what ran
        self.sample_dir = run.sample_dir or str(self.store.path / "samples")
        # Pooled models follow ``stop-rule``; the local arm always counts each site (it stops on those alone, _local).
        every_site = run.stop_rule == "every-site" or kind == "local"
        self.best = BestTracker(self.store, run.select_metric, run.patience, every_site=every_site)
        self.stop_detail: dict[str, Any] | None = None  # why the run stopped before its last round, if it did
        self.resume = False

    def _evaluate(
        self, rnd: int, models: dict[str, torch.nn.Module | None]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Evaluate each site's model on its validation split.

        Returns the ``__global__`` summary record and each site's metrics (the local arm stops per site).
        """
        records = []
        for site, datasets in self.sites.items():
            logger.info("%s: round %d: evaluating %s", self.kind, rnd, site)  # progress while the table waits
            loader = make_loader(datasets["val"], self.run.batch_size, shuffle=False, seed=self.run.seed)
            result: EvalResult
            if site in self.self_supervised:
                result = evaluate_self_supervised(
                    models[site],
                    loader,
                    rho=self.run.ssdu_rho,
                    seed=self.run.seed,
                    reference=cast(ReferencedDataset, datasets["val"]).has_reference,
                    loss=self.run.loss,
                    max_slices=self.run.max_eval_slices,
                    num_samples=self.run.num_samples,
                )
            else:
                result = evaluate(
                    models[site],
                    loader,
                    loss=self.run.loss,
                    max_slices=self.run.max_eval_slices,
                    num_samples=self.run.num_samples,
                    device=self.device,
                    precision=self.precision,
                )
            if result.samples:
                save_samples(self.sample_dir, rnd, site, result.samples)
            records.append(
                site_record(
                    self.run.name, rnd, "evaluate", site, result.num_examples, result.metrics, **self._supervision(site)
                )
            )
        summary = global_record(self.run.name, rnd, "evaluate", records)
        self.store.append_metrics(records + [summary])
        return summary, {r["site"]: r["metrics"] for r in records}

    def _checkpoint(
        self,
        rnd: int,
        state: dict[str, Any],
        summary: dict[str, Any],
        optimisers: dict[str, torch.optim.Optimizer | None],
        per_site: dict[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Save round ``rnd`` (with the kept Adam states, so a resume continues exactly), update ``best.json``
        (``per_site``: each site's validation metrics, for ``stop-rule = every-site``); True when patience is
        exhausted (stop)."""
        kept = {name: opt.state_dict() for name, opt in optimisers.items() if opt is not None}
        self.store.save_checkpoint(rnd, state, self.run.to_flat(), extra={"optimisers": kept} if kept else None)
        self.best.update(rnd, summary["metrics"], per_site)
        return self.best.exhausted

    def _restore(
        self, models: dict[str, torch.nn.Module], optimisers: dict[str, torch.optim.Optimizer | None], prefixed: bool
    ) -> int:
        """Load the last complete round's checkpoint into ``models`` / ``optimisers``; the round to start from.

        ``prefixed``: the checkpoint holds several models as ``NAME/param`` (the local baseline).
        """
        latest = self.store.latest_checkpoint() if self.resume else None
        if latest is None:
            return 1
        done, payload = latest
        state = payload["state_dict"]
        for name, model in models.items():
            own = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")} if prefixed else state
            model.load_state_dict(own)
        for name, opt in optimisers.items():
            saved = payload.get("optimisers", {}).get(name)
            if opt is not None and saved is not None:
                opt.load_state_dict(saved)
        self.best.resume(done)
        logger.info("%s: resuming %s after round %d", self.kind, self.store.path, done)
        return done + 1

    def _supervision(self, site: str) -> dict[str, str]:
        """The record key that marks a self-supervised site (as federated runs record it)."""
        return {"supervision": "self"} if site in self.self_supervised else {}

    def _loss(self, rnd: int) -> SiteLoss:
        """Per-batch loss: SSDU for self-supervised sites' batches, the image loss for the others."""
        return SiteLoss(self.run.loss, self.run.ssdu_rho, self.run.ssdu_masks, seed=self.run.seed, epoch=rnd)

    def execute(self, resume: bool = False) -> RunDir:
        """Run the baseline to the end; the run directory holds its metrics and checkpoints.

        ``resume``: continue the interrupted run in the run directory after its last complete round.
        """
        self.resume = resume and self.kind != "zero-filled"  # round 0 only: nothing to continue
        if self.resume and self.store.config_path.is_file():
            stored = self.store.read_config().get("baseline")
            if stored != self.kind:
                raise ConfigError(
                    f"{self.store.config_path}: cannot resume a {self.kind} baseline: the run there is "
                    f"{'a ' + stored + ' baseline' if stored else 'not a baseline'}"
                )
        self.store.init({**self.run.to_flat(), "baseline": self.kind}, resume=self.resume)
        try:
            with ProcessTree():  # Ctrl-C / SIGTERM: data-loading workers stop with it
                if self.kind == "zero-filled":
                    self._evaluate(0, {site: None for site in self.sites})
                elif self.kind == "local":
                    self._local()
                else:
                    self._centralized(pooled=self.kind == "centralized")
        except KeyboardInterrupt:
            self.store.mark_interrupted("run the same command again: it resumes after this round")
            raise
        except BaseException as exc:
            self.store.set_status("failed", error=str(exc))
            raise
        self.store.set_status("finished", **(self.stop_detail or {}))
        return self.store

    def _new_model(self) -> torch.nn.Module:
        torch.manual_seed(self.run.seed)
        return build_model(self.run.model, **self.run.model_kwargs)

    def _optimiser(self, model: torch.nn.Module) -> torch.optim.Optimizer | None:
        """The Adam that persists across rounds with ``client-optimizer = keep``; None: a fresh one per round."""
        if self.run.client_optimizer != "keep":
            return None
        return torch.optim.Adam(model.parameters(), lr=self.run.learning_rate)

    def _local(self) -> None:
        """Each site trains its own model; with ``patience``, the run ends when *every* site has gone
        ``patience`` rounds without a better validation metric of its own.

        Each site's model is chosen at its own best round, so a site alone is served as if it had stopped on
        its own; training every site until the last one has stopped improving (not on the mean over sites,
        whose noise and averaging can stop a site still improving, or keep one alone) means no site's best
        round is its last, and each site's curve is a superset of the one it would have trained alone.
        ``best.json`` still follows the mean over sites, as in every run.
        """
        models = {site: self._new_model() for site in self.sites}
        optimisers = {site: self._optimiser(model) for site, model in models.items()}
        start = self._restore(models, optimisers, prefixed=True)  # a resume replays each site's patience
        if start == 1:
            self._evaluate(0, models)  # type: ignore[arg-type]
        for rnd in range(start, self.run.num_server_rounds + 1):
            if self.best.sites_exhausted:  # (a resumed run that had already stopped stays stopped)
                break
            records = []
            for site, datasets in self.sites.items():
                logger.info("%s: round %d/%d: training %s", self.kind, rnd, self.run.num_server_rounds, site)
                loader = make_loader(
                    datasets["train"],
                    self.run.batch_size,
                    shuffle=True,
                    seed=self.run.seed + rnd,
                    augment=self.run.augment,
                )
                res = train(
                    models[site],
                    loader,
                    epochs=self.run.local_epochs,
                    steps=self.run.local_steps,
                    lr=self.run.learning_rate,
                    loss=self.run.loss,
                    batch_loss=self._loss(rnd),
                    device=self.device,
                    precision=self.precision,
                    optimiser=optimisers[site],
                )
                records.append(
                    site_record(
                        self.run.name,
                        rnd,
                        "train",
                        site,
                        res.num_examples,
                        {"loss": res.loss, "steps": res.steps},
                        **self._supervision(site),
                        precision=res.precision,
                    )
                )
            self.store.append_metrics(records + [global_record(self.run.name, rnd, "train", records)])
            summary, per_site = self._evaluate(rnd, models)  # type: ignore[arg-type]
            state = {f"{site}/{k}": v for site, m in models.items() for k, v in cpu_state_dict(m).items()}
            self._checkpoint(rnd, state, summary, optimisers, per_site)
        if self.best.sites_exhausted:
            logger.info("%s: every site has gone %d round(s) without improving", self.kind, self.run.patience)
            self.stop_detail = {"early_stop": self._local_stop_detail()}

    def _local_stop_detail(self) -> str:
        """``every site stopped improving: ... (patience 6); site-a best round 12, ...`` for the run's status."""
        metric = self.run.select_metric
        best = ", ".join(f"{site} best round {w.best_round}" for site, w in self.best.sites.items())
        return f"every site stopped improving: no {metric} gain of its own (patience {self.run.patience}); {best}"

    def _centralized(self, pooled: bool) -> None:
        model = self._new_model()
        optimiser = self._optimiser(model)
        per_site_steps = [
            self.run.local_steps
            if self.run.local_steps
            else self.run.local_epochs * -(-len(d["train"]) // self.run.batch_size)
            for d in self.sites.values()
        ]
        start = self._restore({GLOBAL_SITE: model}, {GLOBAL_SITE: optimiser}, prefixed=False)
        if start == 1:
            self._evaluate(0, {site: model for site in self.sites})
        for rnd in range(start, self.run.num_server_rounds + 1):
            loader: PooledLoader | InterleavedLoader
            if pooled:
                loader = PooledLoader(
                    [d["train"] for d in self.sites.values()],
                    self.run.batch_size,
                    seed=self.run.seed + rnd,
                    augment=self.run.augment,
                )
            else:
                loader = InterleavedLoader(
                    [
                        make_loader(
                            d["train"],
                            self.run.batch_size,
                            shuffle=True,
                            seed=self.run.seed + rnd,
                            augment=self.run.augment,
                        )
                        for d in self.sites.values()
                    ]
                )
            logger.info(
                "%s: round %d/%d: training %d steps on all sites",
                self.kind,
                rnd,
                self.run.num_server_rounds,
                sum(per_site_steps),
            )
            res = train(
                model,
                loader,
                steps=sum(per_site_steps),
                lr=self.run.learning_rate,
                loss=self.run.loss,
                batch_loss=self._loss(rnd),
                device=self.device,
                precision=self.precision,
                optimiser=optimiser,
            )
            self.store.append_metrics(
                [
                    site_record(
                        self.run.name,
                        rnd,
                        "train",
                        GLOBAL_SITE,
                        res.num_examples,
                        {"loss": res.loss, "steps": res.steps},
                        precision=res.precision,
                    )
                ]
            )
            summary, per_site = self._evaluate(rnd, {site: model for site in self.sites})
            if self._checkpoint(rnd, cpu_state_dict(model), summary, {GLOBAL_SITE: optimiser}, per_site):
                logger.info("%s: stopping early after round %d", self.kind, rnd)
                self.stop_detail = self.best.stop_detail()
                return
