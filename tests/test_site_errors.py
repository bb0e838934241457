"""Site failures from flower.log on the screen, with the site's name (server/site_errors.py), and the
readiness test that refuses a NOT READY site before Flower starts (server/readiness.py via the CLI)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server import cli
from server.site_errors import finished_without, missed_phases, reporting_site_errors, site_of
from tests.conftest import ROOT, write_small_sites

# The lines Flower's Ray backend writes when a ClientApp raises (copied from a real flower.log).
RAY_PREFIX = "\x1b[36m(ClientAppActor pid=3614)\x1b[0m "


def test_a_logged_site_error_is_reported_once_with_the_site_name(tmp_path: Path) -> None:
    log = tmp_path / "flower.log"
    log.write_text(f"{RAY_PREFIX}common.errors.DataError: /old/run/site-x/f.h5: from an earlier run\n")
    places = {"site-a": [tmp_path / "a"], "site-b": [tmp_path / "data" / "site-b", tmp_path / "site-b.toml"]}
    bad = tmp_path / "data" / "site-b" / "s1" / "t1.nii.gz"
    reported: list[str] = []
    with reporting_site_errors(log, places, reported.append, interval=0.02) as seen:
        with open(log, "a") as stream:
            for _ in range(2):  # Flower retries: the same failure twice is reported once
                stream.write(
                    f'{RAY_PREFIX}    raise DataError(f"{{path}}: unreadable NIfTI data ({{exc}})") from exc\n'
                )
                stream.write(f"{RAY_PREFIX}common.errors.DataError: {bad}: unreadable NIfTI data (truncated)\n")
            # Ray's deduplicated copy of the same line: its colour codes and count are not part of the message.
            stream.write(
                f"{RAY_PREFIX}common.errors.DataError: {bad}: unreadable NIfTI data (truncated)"
                "\x1b[32m [repeated 2x across cluster]\x1b[0m\n"
            )
            # A settings error the ClientApp prefixed with its site config (client/site_errors.py).
            stream.write(
                f"{RAY_PREFIX}common.errors.ConfigError: {tmp_path / 'site-b.toml'}: mask: acceleration: "
                "R=6 not reachable\n"
            )
            stream.write(f"{RAY_PREFIX}common.errors.ConfigError: elsewhere: no site named")  # no newline yet
            stream.flush()
            deadline = time.monotonic() + 10
            while len(reported) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
    assert (
        reported
        == seen
        == [
            f"site site-b: {bad}: unreadable NIfTI data (truncated)",
            "site site-b: mask: acceleration: R=6 not reachable",
        ]
    )
    assert site_of(f"{tmp_path / 'site-b.toml'}: scanner.coils: required", places) == "site-b"
    assert site_of("/somewhere/else.h5: bad", places) is None


def test_simulate_refuses_a_site_with_a_corrupt_file_before_flower_starts(
    small_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = []
    for toml in small_sites:
        text = toml.read_text().replace(str(toml.parent / "data"), str(tmp_path / "data"))
        (tmp_path / toml.name).write_text(text)
        sites.append(tmp_path / toml.name)
    shutil.copytree(small_sites[0].parent / "data" / "site-b", tmp_path / "data" / "site-b")
    shutil.copytree(small_sites[0].parent / "data" / "site-a", tmp_path / "data" / "site-a")
    shutil.copytree(small_sites[0].parent / "data" / "site-c", tmp_path / "data" / "site-c")
    bad = sorted((tmp_path / "data" / "site-b").rglob("*.nii.gz"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    started = time.monotonic()
    code = cli.main(["simulate", "--sites", *map(str, sites), "--rounds", "1", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and time.monotonic() - started < 60
    assert f"site site-b ({tmp_path / 'site-b.toml'}) is NOT READY" in err and f"{bad}: unreadable NIfTI data" in err
    assert "site-a: READY" in out and "--skip-data-check" in err and "Traceback" not in out + err
    assert not (tmp_path / "run" / "flower.log").exists()  # refused before Flower was started


def test_a_site_error_without_the_site_config_gets_it_in_front(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from client.site_errors import site_named_errors_mod
    from common.errors import ConfigError, DataError

    toml = tmp_path / "site-b.toml"
    context = SimpleNamespace(node_config={"site-config": str(toml)}, run_config={})

    def failing(error: Exception):  # type: ignore[no-untyped-def]
        def call_next(msg, ctx):  # type: ignore[no-untyped-def]
            raise error

        return call_next

    with pytest.raises(ConfigError, match=rf"^{toml}: mask: acceleration: too high$") as info:
        site_named_errors_mod(None, context, failing(ConfigError("mask: acceleration: too high")))  # type: ignore[arg-type]
    import traceback

    logged = "".join(traceback.format_exception(info.value))
    # One error line in the site's log (no chained unnamed copy), with the frame that raised it.
    assert logged.count("ConfigError:") == 1 and "in call_next" in logged
    named = DataError(f"{toml}: scanner: bad")
    with pytest.raises(DataError) as again:
        site_named_errors_mod(None, context, failing(named))  # type: ignore[arg-type]
    assert again.value is named  # already names the site: untouched
    with pytest.raises(KeyError):  # not a FedSense error: a bug, passed on as it is
        site_named_errors_mod(None, context, failing(KeyError("x")))  # type: ignore[arg-type]
    unknown = SimpleNamespace(node_config={}, run_config={"sites": ""})
    with pytest.raises(ConfigError, match=r"^mask: x$"):
        site_named_errors_mod(None, unknown, failing(ConfigError("mask: x")))  # type: ignore[arg-type]


def _global(rnd: int, phase: str, sites: list[str], rejected: list[str]) -> dict:
    return {
        "round": rnd,
        "phase": phase,
        "site": "__global__",
        "sites": sites,
        "rejected": [{"site": r, "reason": "error reply: DataError at the site"} for r in rejected],
    }


def test_the_sites_a_finished_run_went_without_are_named_by_the_phases_they_missed() -> None:
    records = [
        _global(0, "evaluate", ["site-a", "site-b"], ["node-7"]),
        {"round": 1, "phase": "train", "site": "site-a", "rejected": [{"site": "x"}]},  # a site's own record
        _global(1, "train", ["site-a", "site-b"], ["node-7"]),
        _global(1, "evaluate", ["site-a", "site-b", "site-c"], []),
        # Two absent but one rejected (a sampled fraction): the rejected label, not a guess.
        _global(2, "train", ["site-a"], ["node-9"]),
    ]
    expected = ["site-a", "site-b", "site-c"]
    assert missed_phases(records, expected) == {"site-c": ["evaluate 0", "train 1"], "node-9": ["train 2"]}
    text = finished_without(records, expected, ["site site-c: /d/f.nii.gz: unreadable"])
    assert text is not None
    assert "site site-c took no part in 2 of 4 phases (evaluate 0, train 1)" in text
    assert "site node-9 took no part in 1 of 4 phases (train 2)" in text
    assert "site site-c: /d/f.nii.gz: unreadable" in text
    assert finished_without([_global(1, "train", expected, [])], expected, []) is None


def test_round_deadline_stragglers_are_not_sites_the_run_went_without() -> None:
    """A straggler the deadline left behind (and its discarded late reply) is the policy working: no exit 5."""
    expected = ["site-a", "site-b", "site-c"]
    straggler = {"site": "site-c", "reason": "straggler: no reply by round-deadline (1.5 s); a late reply is discarded"}
    busy = {"site": "site-c", "reason": "straggler: still training round 1; not sent this phase"}
    late = {"site": "site-c", "reason": "late: a straggler's reply to round 1, discarded"}
    records = [
        {**_global(1, "train", ["site-a", "site-b"], []), "rejected": [straggler]},
        {**_global(2, "train", ["site-a", "site-b"], []), "rejected": [busy]},
        {**_global(3, "train", ["site-a", "site-b", "site-c"], []), "rejected": [late]},
    ]
    assert missed_phases(records, expected) == {}
    assert finished_without(records, expected, []) is None
    # A failing site beside a straggler is still named, and only it.
    failing = {
        **_global(4, "train", ["site-a"], ["node-2"]),
        "rejected": [straggler, {"site": "node-2", "reason": "x"}],
    }
    assert missed_phases([*records, failing], expected) == {"site-b": ["train 4"]}


def _digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_site_failing_during_a_live_run_is_named_on_screen_and_the_run_exits_5(tmp_path: Path) -> None:
    """``--skip-data-check`` past a truncated file: the site reads it in the run, Flower carries on without
    it (min-train-nodes = 1), and the operator sees the site, the file and the reason while the run goes on,
    then a summary and exit 5 (README "Exit codes") instead of a clean 0."""
    sites = write_small_sites(tmp_path / "sites", ("site-a", "site-c"), size=32, slices=2)
    bad = sorted((tmp_path / "sites" / "data" / "site-c").glob("*.nii.gz"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    inputs = _digests(tmp_path / "sites")
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "simulate",
        "--sites",
        *map(str, sites),
        "--rounds",
        "1",
        "--model",
        "unet",
        "--set",
        'model-args={"chans": 4, "num_pool_layers": 1}',
        "--local-steps",
        "1",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        "batch-size=1",
        "--set",
        "max-eval-slices=2",
        "--set",
        "num-samples=0",
        "--set",
        "min-train-nodes=1",
        "--set",
        "min-evaluate-nodes=1",
        "--client-cpus",
        "1",
        "--skip-data-check",
    ]
    proc = subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=400)
    reason = f"site site-c: {bad}: unreadable NIfTI data"
    assert proc.returncode == 5, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    lines = out.splitlines()
    # On screen while the run went on: before the run's final table, not only in the summary after it.
    live = next(i for i, line in enumerate(lines) if line.startswith(reason))
    assert live < next(i for i, line in enumerate(lines) if line.startswith("metrics: "))
    assert "[repeated" not in out and "\x1b" not in lines[live]
    assert err.startswith("fedsense: error: the run finished, but not with every site")
    assert "site site-c took no part in 3 of 3 phases (evaluate 0, train 1, evaluate 1)" in err and reason in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "finished-without-sites", config["status"]
    assert config["status_detail"]["missed_sites"] == {"site-c": ["evaluate 0", "train 1", "evaluate 1"]}
    assert "status finished-without-sites" in out
    assert _digests(tmp_path / "sites") == inputs
