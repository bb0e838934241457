"""The run directory: config, append-only metrics, checkpoints and sample reconstructions.

Layout and record format are the contract in ``docs/ARCHITECTURE.md`` ("Run directory"). The
ServerApp and the baselines are the only writers; the viewers (table, plots, dashboard) read the
same directory while a run is still going, so every file that is rewritten goes through
:func:`atomic_write_bytes` (readers see the old or the new file, never a torn one) and
``metrics.jsonl`` is only ever appended to.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import samples as common_samples
from common.atomic import atomic_write, atomic_write_bytes
from common.errors import DataError, FedSenseError, OutputError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
BEST_FILE = "best.json"
# Everything a run writes into its directory (simulate adds the logs and, by default, site-state/):
# all that ``--overwrite`` removes before a run starts again; anything else there is left alone.
RUN_ENTRIES = (
    CONFIG_FILE,
    METRICS_FILE,
    BEST_FILE,
    CHECKPOINT_DIR,
    SAMPLES_DIR,
    "site-state",
    "flower.log",
    "superlink.log",
)
GLOBAL_SITE = "__global__"
PHASES = ("train", "evaluate", "finetune")  # finetune: the sites' personalised models after the last round
# interrupted: stopped by a signal, resumable; finished-without-sites: all rounds ran, but some site took no part
# in some of them (it failed, the federation went on without it): its model never saw that site's data.
STATUSES = ("running", "finished", "failed", "interrupted", "finished-without-sites")
REQUIRED_KEYS = ("run", "round", "phase", "site", "time", "num_examples", "metrics")
# Keys that init/set_status add to config.json; they are not part of a run's identity.
RUNTIME_KEYS = frozenset({"status", "status_time", "status_detail", "started_at"})
# Config keys that say how to start a run, not which run it is: restarting with another value
# is still the same run.
NON_IDENTITY_KEYS = RUNTIME_KEYS | {"resume", "tracking", "tracking-uri", "metrics-port"}
# What a run *is*: resuming continues a run directory only when none of these changed (a resume may
# add rounds or change timeouts, never the model, the data or how updates are combined).
RESUME_IDENTITY_KEYS = (
    "name",
    "model",
    "model-args",
    "sites",
    "site-caps",
    "strategy",
    "proximal-mu",
    "trim-beta",
    "loss",
    "learning-rate",
    "local-epochs",
    "local-steps",
    "batch-size",
    "seed",
    "fraction-train",
)

_CHECKPOINT_RE = re.compile(r"^round-(\d{4,})\.pt$")
_SAMPLE_ARRAYS = ("zero_filled", "recon", "target")


def validate_record(record: object) -> dict[str, Any]:
    """Check one metrics record against the contract and return it with metric values as floats.

    Raises ``FedSenseError`` with the reason; callers add where the record came from.
    """
    if not isinstance(record, Mapping):
        raise FedSenseError(f"a metrics record must be an object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise FedSenseError(f"metrics record misses key(s) {', '.join(missing)}")
    out = dict(record)
    if not isinstance(out["run"], str) or not out["run"]:
        raise FedSenseError("metrics record: 'run' must be a non-empty string")
    if not _is_int(out["round"]) or out["round"] < 0:
        raise FedSenseError(f"metrics record: 'round' must be an integer >= 0, got {out['round']!r}")
    if out["phase"] not in PHASES:
        raise FedSenseError(f"metrics record: 'phase' must be one of {PHASES}, got {out['phase']!r}")
    if not isinstance(out["site"], str) or not out["site"]:
        raise FedSenseError("metrics record: 'site' must be a non-empty string")
    if not _is_number(out["time"]) or not math.isfinite(out["time"]):
        raise FedSenseError(f"metrics record: 'time' must be a finite number, got {out['time']!r}")
    if not _is_int(out["num_examples"]) or out["num_examples"] < 0:
        raise FedSenseError(f"metrics record: 'num_examples' must be an integer >= 0, got {out['num_examples']!r}")
    if not isinstance(out["metrics"], Mapping):
        raise FedSenseError("metrics record: 'metrics' must be an object")
    metrics: dict[str, float | None] = {}
    for name, value in out["metrics"].items():
        if value is None:
            metrics[str(name)] = None
        elif _is_number(value) and math.isfinite(value):
            metrics[str(name)] = float(value)
        else:
            raise FedSenseError(f"metrics record: metric {name!r} must be a finite number or null, got {value!r}")
    out["metrics"] = metrics
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SiteSamples:
    """A few validation reconstructions of one site, float32 arrays of shape (k, h, w)."""

    zero_filled: np.ndarray
    recon: np.ndarray
    target: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray


@dataclass(frozen=True)
class Samples:
    """The sample reconstructions of one round, by site; ``path`` is that round's directory."""

    round: int
    sites: dict[str, SiteSamples]
    path: Path


def weighted_mean(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Example-weighted mean of each metric over site records (the ``__global__`` row's values).

    A metric only some sites report is averaged over those sites alone.
    """
    out: dict[str, float] = {}
    for name in sorted({k for r in records for k in r["metrics"]}):
        having = [r for r in records if r["metrics"].get(name) is not None]
        weight = sum(r["num_examples"] for r in having)
        if weight:
            out[name] = sum(r["metrics"][name] * r["num_examples"] for r in having) / weight
    return out


def site_record(
    run: str, rnd: int, phase: str, site: str, num_examples: int, metrics: Mapping[str, float], **extra: Any
) -> dict[str, Any]:
    """One site's metrics.jsonl record of one phase of one round (the contract of ``validate_record``)."""
    return {
        "run": run,
        "round": rnd,
        "phase": phase,
        "site": site,
        "time": time.time(),
        "num_examples": num_examples,
        "metrics": dict(metrics),
        **extra,
    }


def global_record(
    run: str, rnd: int, phase: str, site_records: Sequence[Mapping[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The ``__global__`` record of a phase: the example-weighted mean of ``site_records`` and who took part."""
    return site_record(
        run,
        rnd,
        phase,
        GLOBAL_SITE,
        sum(r["num_examples"] for r in site_records),
        weighted_mean(site_records),
        sites=sorted(r["site"] for r in site_records),
        **extra,
    )


class RunDir:
    """One run directory. Writers: the ServerApp/baselines (one process); readers: any number."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_DIR
        self.samples_dir = self.path / SAMPLES_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # config.json -------------------------------------------------------------------------------

    def init(self, config: Mapping[str, Any], resume: bool) -> None:
        """Create the directory and write ``config.json`` with status "running".

        Without ``resume``, an existing config.json of a *different* run (a key outside
        :data:`NON_IDENTITY_KEYS` differs) is an error, so that a typo in ``run-dir`` cannot mix two runs' metrics. The
        same config may be started again; its old metrics records are then superseded by the
        new ones for readers that dedupe (see :meth:`read_metrics`).
        """
        reserved = RUNTIME_KEYS.intersection(config)
        if reserved:
            raise FedSenseError(f"{self.config_path}: config must not contain the runtime key(s) {sorted(reserved)}")
        # Round-trip through JSON so the comparison sees what the file would hold (tuples → lists),
        # and an unserialisable config fails before anything touches the disk.
        new = json.loads(_to_json(config, self.config_path))
        self.check_identity(new, resume)
        self.check_writable()
        now = time.time()
        new.update(status="running", status_time=now, started_at=now)
        atomic_write_bytes(self.config_path, _to_json(new, self.config_path).encode())

    def check_identity(self, config: Mapping[str, Any], resume: bool) -> None:
        """Refuse to start ``config`` in a directory that holds another run, naming the keys that differ.

        Without ``resume`` every key outside :data:`NON_IDENTITY_KEYS` must match (so a typo in
        ``run-dir`` cannot mix two runs' metrics); with ``resume`` the keys of
        :data:`RESUME_IDENTITY_KEYS` must, since the run continues from the old checkpoints.
        """
        if not self.config_path.exists():
            return
        stored = self.read_config()
        new = json.loads(_to_json(config, self.config_path))
        if resume:
            # A key the stored run predates (a newer FedSense added it) cannot be compared.
            keys = set(RESUME_IDENTITY_KEYS) & stored.keys()
        else:
            keys = (stored.keys() | new.keys()) - NON_IDENTITY_KEYS
        changed = sorted(k for k in keys if _identity_value(k, stored.get(k)) != _identity_value(k, new.get(k)))
        if not changed:
            if not resume:
                logger.warning("%s: restarting the same run config without resume", self.path)
            return
        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        if resume:
            raise FedSenseError(
                f"{self.config_path}: cannot resume: the run in this directory differs in {', '.join(changed)} "
                f"({detail}); choose another run directory (run-dir) or set resume=false with a new one"
            )
        raise FedSenseError(
            f"{self.config_path}: holds a different run (differs in {', '.join(changed)}); "
            "choose another run directory or resume"
        )

    def check_fresh(self, resume: bool, overwrite: bool, continuable: bool = False) -> bool:
        """Refuse to start a new run over an earlier one unless it is resumed or ``overwrite`` is given.

        Returns whether an earlier run is to be replaced (``overwrite``): nothing is removed here, so a
        command that still refuses (a site not ready) loses nothing; it calls :meth:`remove_earlier_run`
        once the run is sure to start.
        ``continuable``: the refused command would continue the earlier run with ``resume=true``; only then
        does the refusal suggest it (a finished run, or one of another kind, cannot be continued).
        """
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--run-dir: {self.path} is an existing file, not a folder")
        if resume or not self.config_path.exists():
            return False
        if not overwrite:
            continue_it = "--set resume=true to continue it, " if continuable else ""
            raise OutputError(
                f"--run-dir: {self.path} holds an earlier run; pass --overwrite to replace it, {continue_it}"
                f"or choose another --run-dir{self._what_run()}"
            )
        return True

    def remove_earlier_run(self) -> None:
        """Remove the earlier run's own files (:data:`RUN_ENTRIES`; anything else in the folder stays)."""
        for name in RUN_ENTRIES:
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def _what_run(self) -> str:
        """`` (a centralized baseline, finished)``: which run a refusal is about; empty where config.json is unreadable
        (the refusal itself still holds)."""
        try:
            config = self.read_config()
        except FedSenseError:
            return ""
        kind = f"a {config['baseline']} baseline" if config.get("baseline") else "a federated run"
        return f" ({kind}, {config.get('status', 'status unknown')})"

    def check_writable(self) -> None:
        """Create the directory and prove this process can write in it, or say how to fix it.

        Called before a run starts, so that a run directory created by another user (``make demo``
        run as one user, the container's ServerApp as another) fails at once with the fix, not
        after Flower has started.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
            for sub in (self.config_path, self.metrics_path, self.checkpoint_dir):
                if sub.exists() and not os.access(sub, os.W_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(sub))
        except OSError as exc:
            raise self._not_writable(exc) from exc

    def _not_writable(self, exc: OSError) -> OSError:
        """:meth:`check_writable`'s refusal: still an OSError (the file system said no, exit 4), naming the folder
        or file that refused and a fix that helps there: a chown where another user owns it, a chmod where its
        mode forbids writing; else (a read-only file system, a file in the way) only another run directory."""
        failed = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes)) else self.path
        blocker = next((p for p in (failed, *failed.parents) if p.exists()), None)
        uid, gid = os.getuid(), os.getgid()
        fix = ""
        if blocker is not None and exc.errno in (errno.EACCES, errno.EPERM):
            inside = blocker == self.path or self.path in blocker.parents  # then fix the whole run directory
            if blocker.stat().st_uid != uid:
                fix = f"`sudo chown {'-R ' if inside else ''}{uid}:{gid} {self.path if inside else blocker}`, or "
            else:
                fix = f"`chmod {'-R ' if inside else ''}u+w {self.path if inside else blocker}`, or "
        return OSError(
            exc.errno,
            f"{self.path}: run directory is not writable by uid {uid} ({_owner_of(failed)}): "
            f"{exc.strerror or exc}. Fix: {fix}choose another run directory (--run-dir / run-dir)",
        )

    def set_status(self, status: str, **extra: Any) -> None:
        """Record the run's status; ``extra`` (e.g. ``error=...``) goes under ``status_detail``.

        Extras are nested so they can never shadow a config key.
        """
        if status not in STATUSES:
            raise FedSenseError(f"{self.config_path}: status must be one of {STATUSES}, got {status!r}")
        config = self.read_config()
        config.update(status=status, status_time=time.time(), status_detail=extra)
        atomic_write_bytes(self.config_path, _to_json(config, self.config_path).encode())

    def mark_interrupted(self, resume_hint: str) -> int | None:
        """Record a run stopped by Ctrl-C / SIGTERM with the last round a resume continues from (None: no run yet).

        Called once every process of the run has stopped, so no writer can overwrite it afterwards.
        """
        if not self.config_path.is_file():
            return None
        latest = self.latest_checkpoint()
        last = latest[0] if latest is not None else 0
        self.set_status("interrupted", last_complete_round=last, resume=resume_hint)
        return last

    def mark_finished_without(self, missed: Mapping[str, Sequence[str]]) -> None:
        """Record that a finished run went on without sites: ``missed`` is site -> the phases it missed
        (e.g. ``{"site-c": ["train 1", "evaluate 1"]}``), kept beside the finished run's own detail.

        Only a ``finished`` run can be so marked: a failed or interrupted one says more already.
        """
        config = self.read_config()
        if config.get("status") != "finished":
            raise FedSenseError(
                f"{self.config_path}: status is {config.get('status')!r}; only a finished run can be "
                "marked finished-without-sites"
            )
        detail = dict(config.get("status_detail") or {})
        self.set_status(
            "finished-without-sites",
            **detail,
            missed_sites={site: list(phases) for site, phases in sorted(missed.items())},
        )

    def read_config(self) -> dict[str, Any]:
        """The run config with its ``status``; ``FedSenseError`` if missing or unreadable."""
        try:
            config = _read_json(self.config_path)
        except FileNotFoundError:
            raise FedSenseError(f"{self.config_path}: not found (not a FedSense run directory?)") from None
        if not isinstance(config, dict):
            raise FedSenseError(f"{self.config_path}: must hold a JSON object")
        return config

    # metrics.jsonl -----------------------------------------------------------------------------

    def append_metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Validate ``records`` and append them as JSON lines in one fsync'ed write.

        All records are validated before anything is written, so a bad batch leaves the file
        untouched. A partial last line left by a crashed writer is cut off first (with a
        warning); otherwise it would become a corrupt middle line.
        """
        lines = []
        for index, record in enumerate(records):
            try:
                valid = validate_record(record)
            except FedSenseError as exc:
                raise FedSenseError(f"{self.metrics_path}: record {index}: {exc}") from None
            lines.append(json.dumps(valid, allow_nan=False, separators=(",", ":")) + "\n")
        if not lines:
            return
        data = "".join(lines).encode()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.metrics_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._cut_partial_tail(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _cut_partial_tail(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        keep = size
        while keep > 0:
            start = max(0, keep - 65536)
            chunk = os.pread(fd, keep - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        logger.warning(
            "%s: dropping a partial last line (%d bytes) left by an interrupted writer",
            self.metrics_path,
            size - keep,
        )
        os.ftruncate(fd, keep)

    def read_metrics(self, dedupe: bool = False) -> list[dict[str, Any]]:
        """All metrics records in file order; ``[]`` before the run wrote any.

        A last line without its newline that does not parse is a record still being written and
        is skipped. Any other bad line raises ``FedSenseError`` naming the file and line number.

        With ``dedupe`` only the LAST record per ``(round, phase, site)`` is kept, at the position
        of that last record: a resumed or restarted run re-appends the rounds it redoes, and the
        newest values win.
        """
        try:
            raw = self.metrics_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise FedSenseError(f"{self.metrics_path}: cannot read: {exc}") from exc
        lines = raw.split(b"\n")
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            is_partial_tail = number == len(lines)  # no newline after it yet
            try:
                record = validate_record(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, FedSenseError) as exc:
                if is_partial_tail:
                    logger.debug("%s:%d: skipping a line still being written", self.metrics_path, number)
                    continue
                raise FedSenseError(f"{self.metrics_path}:{number}: invalid metrics line: {exc}") from None
            records.append(record)
        if dedupe:
            last = {(r["round"], r["phase"], r["site"]): i for i, r in enumerate(records)}
            records = [records[i] for i in sorted(last.values())]
        return records

    def completed_rounds(self) -> set[int]:
        """Rounds that are complete, i.e. have a ``__global__`` evaluate record."""
        return {r["round"] for r in self.read_metrics() if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"}

    # checkpoints -------------------------------------------------------------------------------

    def checkpoint_path(self, round: int) -> Path:
        """Where the checkpoint of ``round`` lives."""
        return self.checkpoint_dir / f"round-{round:04d}.pt"

    def save_checkpoint(
        self,
        round: int,
        state_dict: Mapping[str, Any],
        config: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Atomically write ``{"round", "state_dict", "config"}`` for ``round``; returns its path.

        ``extra`` adds keys the run needs to resume exactly (e.g. ``"server_optimizer"``).
        """
        import torch  # imported here so the viewers, which never touch checkpoints, start fast

        if not _is_int(round) or round < 0:
            raise FedSenseError(f"{self.checkpoint_dir}: round must be an integer >= 0, got {round!r}")
        payload = {**(extra or {}), "round": round, "state_dict": dict(state_dict), "config": dict(config)}
        path = self.checkpoint_path(round)
        atomic_write(path, lambda stream: torch.save(payload, stream))
        return path

    def load_checkpoint(self, round: int) -> dict[str, Any]:
        """The checkpoint payload of ``round``; an error naming the file (and the rounds there are) if it is not one."""
        import torch  # see save_checkpoint

        path = self.checkpoint_path(round)
        if not path.is_file():
            have = (
                sorted(p.name for p in self.checkpoint_dir.glob("round-*.pt")) if self.checkpoint_dir.is_dir() else []
            )
            raise FedSenseError(f"{path}: no checkpoint for round {round} (have: {', '.join(have) or 'none'})")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt files
            raise DataError(f"{path}: unreadable checkpoint: {exc}") from exc
        if (
            not isinstance(payload, dict)
            or payload.get("round") != round
            or not isinstance(payload.get("state_dict"), dict)
        ):
            raise DataError(f"{path}: not a round-{round} checkpoint with a state_dict")
        return payload

    def latest_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """The highest-round checkpoint that loads, as ``(round, payload)``; ``None`` if none does.

        Temp files of interrupted writes are ignored; a checkpoint that fails to load is skipped
        with a warning so a resume falls back to the previous round instead of failing.
        """
        import torch  # see save_checkpoint

        for round, path in _numbered_files(self.checkpoint_dir, _CHECKPOINT_RE):
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for truncated/corrupt files
                logger.warning("%s: skipping unreadable checkpoint: %s", path, exc)
                continue
            if not isinstance(payload, dict) or payload.get("round") != round or "state_dict" not in payload:
                logger.warning("%s: skipping checkpoint without a matching round and state_dict", path)
                continue
            return round, payload
        return None

    # best.json ---------------------------------------------------------------------------------

    @property
    def best_path(self) -> Path:
        """Where the best round so far is recorded (see :mod:`server.best`)."""
        return self.path / BEST_FILE

    def write_best(self, round: int, metric: str, value: float) -> dict[str, Any]:
        """Atomically record ``round`` as the best one by ``metric``; returns what was written.

        The checkpoint it names must already exist, so a reader never follows a dangling pointer.
        """
        checkpoint = self.checkpoint_path(round)
        if not checkpoint.is_file():
            raise FedSenseError(f"{self.best_path}: round {round} has no checkpoint ({checkpoint})")
        if not math.isfinite(value):
            raise FedSenseError(f"{self.best_path}: {metric} of round {round} is not finite ({value})")
        best = {
            "round": round,
            "metric": metric,
            "value": float(value),
            "checkpoint": checkpoint.relative_to(self.path).as_posix(),
        }
        atomic_write_bytes(self.best_path, (json.dumps(best, indent=2, allow_nan=False) + "\n").encode())
        return best

    def best(self) -> dict[str, Any] | None:
        """The run's best round ``{"round", "metric", "value", "checkpoint"}``; ``None`` before any.

        An unreadable or malformed file raises ``FedSenseError`` naming it.
        """
        try:
            best = _read_json(self.best_path)
        except FileNotFoundError:
            return None
        if (
            not isinstance(best, dict)
            or not _is_int(best.get("round"))
            or not isinstance(best.get("metric"), str)
            or not _is_number(best.get("value"))
            or not isinstance(best.get("checkpoint"), str)
        ):
            raise FedSenseError(f"{self.best_path}: needs round (int), metric (str), value (number), checkpoint (str)")
        return best

    # samples -----------------------------------------------------------------------------------

    def sample_source(self) -> Path:
        """Where the run's sample reconstructions live: config ``sample-dir``, else ``samples/``.

        Sites write their samples (``common.samples``) to a site-local ``sample-dir`` so patient
        images never leave the site; a simulation or baseline points it into the run directory.
        """
        if self.config_path.exists():
            configured = self.read_config().get("sample-dir")
            if configured:
                return Path(configured)
        return self.samples_dir

    def latest_samples(self) -> Samples | None:
        """The newest round's samples of every site that saved some; ``None`` before any.

        Temp files of interrupted writes are ignored; an unreadable sample file raises
        ``DataError`` naming it.
        """
        source = self.sample_source()
        found = common_samples.latest_samples(source)
        if found is None:
            return None
        round, by_site = found
        sites = {}
        for site, arrays in by_site.items():
            missing = [k for k in (*_SAMPLE_ARRAYS, "psnr", "ssim") if k not in arrays]
            if missing:
                raise DataError(f"{source / f'round-{round:04d}' / site}.npz: misses {', '.join(missing)}")
            sites[site] = SiteSamples(**{k: arrays[k] for k in (*_SAMPLE_ARRAYS, "psnr", "ssim")})
        return Samples(round=round, sites=sites, path=source / f"round-{round:04d}")


def _identity_value(key: str, value: Any) -> Any:
    """``value`` as a run's identity compares it: site configs by resolved path, so that ``demo/a.toml`` and
    ``/data/demo/a.toml`` are the same site (a baseline records the paths as given, simulate resolves them)."""
    if key == "sites" and isinstance(value, str):
        return [str(Path(site.strip()).resolve()) for site in value.split(",") if site.strip()]
    return value


def _numbered_files(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """``(round, path)`` of the files in ``directory`` matching ``pattern``, highest round first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _owner_of(path: Path) -> str:
    """``owner uid N, mode 0755`` of the nearest existing ``path`` or parent, for error messages."""
    for candidate in (path, *path.parents):
        try:
            info = candidate.stat()
        except OSError:
            continue
        return f"{candidate} is owned by uid {info.st_uid}, mode {info.st_mode & 0o7777:04o}"
    return "owner unknown"


def _to_json(config: Mapping[str, Any], path: Path) -> str:
    try:
        return json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise FedSenseError(f"{path}: config is not JSON-serialisable: {exc}") from exc


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; ``FileNotFoundError`` passes through, other failures name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FedSenseError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FedSenseError(f"{path}: invalid JSON: {exc}") from exc
