"""Site failures from flower.log on the screen, with the site's name (server/site_errors.py), and the
readiness test that refuses a NOT READY site before Flower starts (server/readiness.py via the CLI)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from server import cli
from server.site_errors import reporting_site_errors, site_of

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
                stream.write(f"{RAY_PREFIX}    raise DataError(f\"{{path}}: unreadable NIfTI data ({{exc}})\") from exc\n")
                stream.write(f"{RAY_PREFIX}common.errors.DataError: {bad}: unreadable NIfTI data (truncated)\n")
            stream.write(f"{RAY_PREFIX}common.errors.ConfigError: elsewhere: no site named")  # no newline yet
            stream.flush()
            deadline = time.monotonic() + 10
            while not reported and time.monotonic() < deadline:
                time.sleep(0.02)
    assert reported == seen == [f"site site-b: {bad}: unreadable NIfTI data (truncated)"]
    assert site_of(f"{tmp_path / 'site-b.toml'}: scanner.coils: required", places) == "site-b"
    assert site_of("/somewhere/else.h5: bad", places) is None


def test_simulate_refuses_a_site_with_a_corrupt_file_before_flower_starts(
        small_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
