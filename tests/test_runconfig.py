"""The typed run config: pyproject defaults validate, and bad values name their key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.runconfig import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_are_a_valid_run_config() -> None:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        flat = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    run = RunConfig.from_flat(flat)
    assert run.to_flat()["num-server-rounds"] == flat["num-server-rounds"]
    assert set(flat) <= set(run.to_flat())


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("num-server-rounds", 0, "num-server-rounds"),
        ("strategy", "fedsgd", "strategy"),
        ("proximal-mu", -1.0, "proximal-mu"),
        ("learning-rate", 0, "learning-rate"),
        ("no-such-key", 1, "no-such-key"),
        ("model-args", "{not json", "model-args"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        RunConfig.from_flat({key: value}, source="pyproject.toml")
    assert str(info.value).startswith("pyproject.toml: ")


def test_sites_and_model_args_are_parsed() -> None:
    run = RunConfig.from_flat({"sites": "a.toml, b.toml,", "model-args": '{"chans": 8}'})
    assert run.site_list == ["a.toml", "b.toml"] and run.model_kwargs == {"chans": 8}


def test_pyproject_table_and_runconfig_defaults_agree() -> None:
    """One set of defaults: every RunConfig field is in pyproject's table with the same value.

    The one exception is ``sites``: pyproject lists the demo sites so that ``flwr run .`` works as is,
    while a RunConfig built in code has none until it is given some.
    """
    with open(ROOT / "pyproject.toml", "rb") as fh:
        flat = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    defaults = {name.replace("_", "-"): field.default for name, field in RunConfig.model_fields.items()}
    assert set(defaults) == set(flat)
    differing = {k: (defaults[k], flat[k]) for k in defaults if defaults[k] != flat[k]}
    assert set(differing) == {"sites"}, differing
