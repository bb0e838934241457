"""Where a run's settings come from, resolved in one fixed order, every result validated.

defaults (``RunConfig``'s fields) < ``pyproject.toml`` [tool.flwr.app.config] < values derived from the
run (``run-dir`` from its name, a baseline's name) < a run file (``--run-file``) < the command line's
options < ``--set``. A later source always wins; a key no source knows is refused naming the source;
a value lowered to fit the run (``min-*-nodes`` above the number of sites) is lowered only when no user
source chose it, with a warning naming the key, and refused when a user did.
"""

from __future__ import annotations

import difflib
import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.errors import ConfigError
from common.runconfig import RunConfig

logger = logging.getLogger(__name__)

DEFAULTS, PYPROJECT, DERIVED, RUN_FILE, COMMAND_LINE, SET = (
    "defaults",
    "pyproject",
    "derived",
    "run file",
    "command line",
    "--set",
)
#: Every source, lowest precedence first.
SOURCES = (DEFAULTS, PYPROJECT, DERIVED, RUN_FILE, COMMAND_LINE, SET)
#: Sources the user wrote for this run; what they set is never changed behind their back.
USER_SOURCES = (RUN_FILE, COMMAND_LINE, SET)
#: Keys that may not exceed the number of sites of a run.
NODE_MINIMA = ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes")


#: The run options of the command line (argparse dest) and the run-config key each sets.
OPTION_KEYS = (
    ("rounds", "num-server-rounds"),
    ("strategy", "strategy"),
    ("mu", "proximal-mu"),
    ("model", "model"),
    ("run_dir", "run-dir"),
    ("local_steps", "local-steps"),
    ("name", "name"),
    ("seed", "seed"),
    ("tracking", "tracking"),
    ("tracking_uri", "tracking-uri"),
)


def run_config_keys() -> list[str]:
    """Every run-config key, dashed as in TOML."""
    return [name.replace("_", "-") for name in RunConfig.model_fields]


@dataclass(frozen=True)
class Resolved:
    """A validated run config and, for every key, the source its value came from."""

    run: RunConfig
    origin: dict[str, str]


def check_keys(values: Mapping[str, Any], source: str) -> None:
    """Refuse a key that is no run-config key, naming ``source`` and the nearest keys (a typo, most likely)."""
    known = run_config_keys()
    for key in values:
        if key not in known:
            option = dict(OPTION_KEYS).get(key.replace("-", "_"))
            near = [option] if option else difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(near)}?" if near else "see [tool.flwr.app.config] in pyproject.toml"
            raise ConfigError(f"{source} {key}: no such run-config key; {hint}")


def read_run_file(path: Path) -> dict[str, Any]:
    """A TOML file of run-config keys (a flat table, dashed keys); errors name the file."""
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"run file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run file {path}: not valid TOML ({exc})") from None
    check_keys(values, f"run file {path}")
    return values


def resolve(
    layers: Mapping[str, Mapping[str, Any]],
    *,
    site_count: int | None = None,
    derive: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> Resolved:
    """The run config of ``layers`` (source -> dashed values; any of :data:`SOURCES` but defaults).

    ``derive`` maps the settings so far to the :data:`DERIVED` layer's values (e.g. ``run-dir`` from
    the resolved ``name``). ``site_count`` bounds the ``min-*-nodes`` keys.
    """
    unknown = [s for s in layers if s not in SOURCES or s == DEFAULTS]
    if unknown:
        raise ValueError(f"unknown config source(s) {unknown}; sources are {SOURCES[1:]}")
    for source, values in layers.items():
        check_keys(values, source)
    flat, origin = _stack(layers)
    if derive is not None:
        derived = derive(flat)
        check_keys(derived, DERIVED)
        flat, origin = _stack({**layers, DERIVED: derived})
    if site_count is not None:
        _fit_node_minima(flat, origin, site_count)
    return Resolved(validate(flat, origin), origin)


def _stack(layers: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The layers' values, later sources over earlier ones, and each key's source."""
    defaults = RunConfig().to_flat()
    flat, origin = dict(defaults), {key: DEFAULTS for key in defaults}
    for source in SOURCES:
        for key, value in layers.get(source, {}).items():
            flat[key], origin[key] = value, source
    return flat, origin


def _fit_node_minima(flat: dict[str, Any], origin: dict[str, str], site_count: int) -> None:
    for key in NODE_MINIMA:
        value = flat[key]
        if not isinstance(value, int) or value <= site_count:
            continue  # a non-integer is named by validation
        if origin[key] in USER_SOURCES:
            raise ConfigError(f"{origin[key]}: {key}: {value} is more than the run's {site_count} site(s)")
        logger.warning("%s lowered from %d (%s) to the run's %d site(s)", key, value, origin[key], site_count)
        flat[key], origin[key] = site_count, DERIVED


def validate(flat: Mapping[str, Any], origin: Mapping[str, str] | None = None) -> RunConfig:
    """``flat`` as a RunConfig; an error names the offending key and the source that set it."""
    try:
        return RunConfig(**{key.replace("-", "_"): value for key, value in flat.items()})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p).replace("_", "-") for p in first["loc"])
        source = (origin or {}).get(key, "run config")
        raise ConfigError(f"{source}: {key or '(config)'}: {first['msg'].removeprefix('Value error, ')}") from exc


def updated(run: RunConfig, source: str, **values: Any) -> RunConfig:
    """``run`` with ``values`` (underscored keys) replaced, validated like every other result."""
    flat = {**run.to_flat(), **{key.replace("_", "-"): value for key, value in values.items()}}
    return validate(flat, {key.replace("_", "-"): source for key in values})


def pyproject_values(project_dir: Path) -> dict[str, Any]:
    """The [tool.flwr.app.config] table of ``project_dir/pyproject.toml``."""
    with open(project_dir / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
