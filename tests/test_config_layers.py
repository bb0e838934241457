"""Run-config resolution: every key from every source, in one order; no silent clamps; errors name the source."""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any

import pytest

from common import config_layers as layers
from common.errors import ConfigError
from common.registry import LOSSES, MODELS, STRATEGIES, TRACKERS
from common.runconfig import RunConfig
from server.cli import _run_config, build_parser

#: The sources a test may set, lowest precedence first (defaults are RunConfig's own).
SETTABLE = layers.SOURCES[1:]
#: Settings a key's non-default values need (set in pyproject, under every source the test varies).
COMPANIONS = {"dp-target-epsilon": {"dp-noise-multiplier": 1.0}, "adaptive-local-steps": {"round-deadline": 60.0}}


def _valid(key: str, value: Any) -> bool:
    """Whether ``value`` alone, over the defaults, is a valid run config (so a variant is always usable)."""
    try:
        layers.validate({**COMPANIONS.get(key, {}), key: value})
    except ConfigError:
        return False
    return True


def _variants(key: str) -> list[Any]:
    """Valid values of ``key`` other than its default, as many as can be found up to one per source."""
    field = RunConfig.model_fields[key.replace("-", "_")]
    default = field.default
    if typing.get_origin(field.annotation) is typing.Literal:
        candidates: list[Any] = list(typing.get_args(field.annotation))
    elif isinstance(default, bool):
        candidates = [not default]
    elif isinstance(default, int):
        candidates = [default + i for i in range(1, 8)] + [default - i for i in range(1, 8)]
    elif isinstance(default, float):
        candidates = [default * (1 + s * i / 100) if default else i / 100 for s in (1, -1) for i in range(1, 8)]
    elif key == "site-caps":
        candidates = [f'{{"site-{i}": {i}}}' for i in range(1, 8)]
    elif key == "model-args":
        candidates = [f'{{"chans": {i}}}' for i in range(1, 8)]
    else:
        candidates = [*STRATEGIES, *MODELS, *LOSSES, *TRACKERS, *(f"{default}-{i}" for i in range(1, 8))]
    return [v for v in dict.fromkeys(candidates) if v != default and _valid(key, v)][: len(SETTABLE)]


@pytest.mark.parametrize("key", layers.run_config_keys())
def test_every_key_is_taken_from_the_highest_source_that_sets_it(key: str) -> None:
    variants = _variants(key)
    assert variants, f"{key}: no valid non-default value found"
    for top, source in enumerate(SETTABLE):
        values = {s: variants[i % len(variants)] for i, s in enumerate(SETTABLE[: top + 1])}
        given = {s: {key: v} for s, v in values.items() if s != layers.DERIVED}
        given[layers.PYPROJECT] = {**COMPANIONS.get(key, {}), **given[layers.PYPROJECT]}
        derive = (lambda _flat, v=values[layers.DERIVED]: {key: v}) if layers.DERIVED in values else None
        resolved = layers.resolve(given, derive=derive)
        assert resolved.origin[key] == source
        assert resolved.run.to_flat()[key] == values[source]
    assert layers.resolve({}).origin[key] == layers.DEFAULTS


def test_a_derived_value_follows_the_final_name_and_never_overrides_the_user() -> None:
    def derive(flat: Any) -> dict[str, Any]:
        return {"run-dir": f"runs/{flat['name']}"}

    named = layers.resolve({layers.PYPROJECT: {"run-dir": "runs/latest"}, layers.SET: {"name": "x"}}, derive=derive)
    assert named.run.run_dir == "runs/x" and named.origin["run-dir"] == layers.DERIVED
    kept = layers.resolve({layers.RUN_FILE: {"run-dir": "mine"}, layers.SET: {"name": "x"}}, derive=derive)
    assert kept.run.run_dir == "mine" and kept.origin["run-dir"] == layers.RUN_FILE


def test_node_minima_above_the_site_count_warn_when_defaulted_and_fail_when_chosen(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="common.config_layers"):
        run = layers.resolve({layers.PYPROJECT: {"min-train-nodes": 2}}, site_count=1).run
    assert run.min_train_nodes == 1 and "min-train-nodes lowered from 2 (pyproject)" in caplog.text
    for source in layers.USER_SOURCES:
        with pytest.raises(ConfigError, match=f"{source}: min-train-nodes: 3 is more than the run's 2 site"):
            layers.resolve({source: {"min-train-nodes": 3}}, site_count=2)


def test_errors_name_the_source_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--set: proximal-mu: "):
        layers.resolve({layers.PYPROJECT: {"proximal-mu": 0.1}, layers.SET: {"proximal-mu": -1}})
    run_file = tmp_path / "run.toml"
    run_file.write_text("learnig-rate = 0.1\n")
    with pytest.raises(ConfigError, match=f"run file {run_file} learnig-rate: no such run-config key; did you mean"):
        layers.read_run_file(run_file)
    run_file.write_text("learning-rate = [\n")
    with pytest.raises(ConfigError, match=f"run file {run_file}: not valid TOML"):
        layers.read_run_file(run_file)
    with pytest.raises(ConfigError, match=r"^simulate: name: "):
        layers.updated(RunConfig(), "simulate", name=3)


def _cli(argv: list[str]) -> RunConfig:
    """The run config ``fedsense`` resolves for ``argv`` (simulate or baseline), over pyproject's defaults."""
    from server.cli import _app_defaults, cmd_baseline, cmd_simulate

    args = build_parser().parse_args(argv)
    assert args.func in (cmd_simulate, cmd_baseline)
    if args.func is cmd_baseline:
        return _run_config(
            args, _app_defaults(), derive=lambda flat: {"run-dir": f"runs/{args.kind}", "name": args.kind}
        )
    return _run_config(args, _app_defaults(), derive=lambda flat: {"run-dir": f"runs/{flat['name']}"})


def test_the_command_line_takes_set_over_options_over_the_run_file(tmp_path: Path) -> None:
    run_file = tmp_path / "run.toml"
    run_file.write_text('seed = 5\nname = "from-file"\nlocal-steps = 3\n')
    sites = ["--sites", "a.toml", "b.toml"]
    run = _cli(["simulate", *sites, "--run-file", str(run_file), "--seed", "6"])
    assert (run.seed, run.name, run.local_steps, run.run_dir) == (6, "from-file", 3, "runs/from-file")
    # server/cli.py used to replace --set's run dir with runs/<name> and a baseline's --set name with its kind.
    run = _cli(["simulate", *sites, "--set", "run-dir=out/x", "--name", "n"])
    assert (run.run_dir, run.name) == ("out/x", "n")
    run = _cli(["baseline", "local", *sites, "--set", "name=mine", "--set", "seed=7", "--seed", "1"])
    assert (run.name, run.seed, run.run_dir) == ("mine", 7, "runs/local")
    with pytest.raises(ConfigError, match="--set: min-train-nodes: 3 is more than the run's 2 site"):
        _cli(["simulate", *sites, "--set", "min-train-nodes=3"])
