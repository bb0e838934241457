"""A poisonous HDF5 file costs seconds, not the round: a child process reads each file first, with a limit.

The crafted file is the one the fuzzer found: a zeroed global-heap object makes libhdf5 loop forever
reading the file's string attributes (uninterruptible from Python). Every test here would hang (or
hit its pytest-level timeout) if the reader opened the file in-process without the check.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import parse_site_config
from common.data import h5check
from common.data.dataset import SiteDataset
from common.errors import DataError
from test_readers import write_h5

SCANNER = {
    "field_strength_t": 3.0,
    "coils": 2,
    "matrix": [16, 16],
    "mask": "random",
    "acceleration": 2,
    "center_fraction": 0.2,
}
LIMIT = 3.0


def poisonous_h5(path: Path) -> Path:
    """A fastMRI-layout file whose first global-heap object (the string attributes) is zeroed."""
    write_h5(path, slices=2, coils=2, shape=(16, 16), recon=(8, 8), patient="bad")
    data = bytearray(path.read_bytes())
    heap = data.index(b"GCOL") + 16
    data[heap : heap + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


def site(tmp_path: Path, **extra: object):
    return parse_site_config(
        {
            "name": "h5",
            "dataset": "fastmri",
            "data_path": str(tmp_path),
            "scanner": SCANNER,
            "split": {"val_fraction": 0.0, "test_fraction": 0.0},
            "file_check_seconds": LIMIT,
            **extra,
        },
        "h5.toml",
    )


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSENSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setattr(h5check, "_memory", {})


def test_the_crafted_file_really_hangs_libhdf5(tmp_path: Path) -> None:
    """The premise: reading its attributes in a process of its own does not return (killed after 5 s)."""
    path = poisonous_h5(tmp_path / "heap.h5")
    probe = "import sys, h5py; f = h5py.File(sys.argv[1], 'r'); dict(f.attrs)"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, timeout=5, check=False)


def test_a_hanging_h5_is_a_data_error_naming_it_in_bounded_time(tmp_path: Path) -> None:
    bad = poisonous_h5(tmp_path / "bad.h5")
    write_h5(tmp_path / "good.h5", slices=2, coils=2, shape=(16, 16), recon=(8, 8), patient="good")
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        SiteDataset(site(tmp_path), "train")
    assert str(info.value).startswith(f"{bad}: reading it did not finish within {LIMIT:g} s")
    assert time.monotonic() - started < LIMIT + 20

    # skip_bad_files: the site comes up without it, and the verdict is cached (no second wait).
    started = time.monotonic()
    skipping = SiteDataset(site(tmp_path, skip_bad_files=True), "train")
    assert time.monotonic() - started < LIMIT
    assert [p for p, _ in skipping.skipped] == [bad]
    assert len(skipping) == 2 and all(skipping[i]["fname"] == "good.h5" for i in range(len(skipping)))


def test_verdicts_are_cached_per_file_version_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.h5"
    write_h5(good, slices=2, coils=2, shape=(16, 16), recon=(8, 8))
    assert h5check.check_files([good], timeout=LIMIT) == {good: None}
    monkeypatch.setattr(h5check, "_memory", {})  # a new process: only the disk cache remains
    spawned: list[object] = []
    real = h5check._run_children
    monkeypatch.setattr(h5check, "_run_children", lambda paths, timeout: spawned.append(paths) or real(paths, timeout))
    assert h5check.check_files([good], timeout=LIMIT) == {good: None} and spawned == []
    poisonous_h5(good)  # a new version of the file (size and mtime change) is checked again
    verdict = h5check.check_files([good], timeout=LIMIT)[good]
    assert verdict is not None and verdict.startswith(h5check.TIMED_OUT) and spawned == [[good]]
    # A time-out is not written to disk (an overloaded machine must not condemn a file for good):
    # the next process checks it again, the same process does not.
    assert h5check.check_files([good], timeout=LIMIT)[good] == verdict and len(spawned) == 1
    monkeypatch.setattr(h5check, "_memory", {})
    assert h5check.check_files([good], timeout=LIMIT)[good] == verdict and len(spawned) == 2


def test_good_files_after_a_hanging_one_are_still_checked(tmp_path: Path) -> None:
    """The hung child is killed and a fresh one goes on with the files after the bad one."""
    files = [tmp_path / "a.h5", poisonous_h5(tmp_path / "b.h5"), tmp_path / "c.h5"]
    for path in (files[0], files[2]):
        write_h5(path, slices=2, coils=2, shape=(16, 16), recon=(8, 8))
    verdicts = h5check.check_files(files, timeout=LIMIT)
    assert verdicts[files[0]] is None and verdicts[files[2]] is None
    assert "did not finish" in str(verdicts[files[1]])


@pytest.mark.slow
def test_a_site_with_a_hanging_file_replies_and_the_round_completes_with_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (simulated) federation: site-a holds the crafted file and keeps strict checking, so its
    ClientApp answers every request with an error reply within seconds, well before ``round-timeout``;
    each round completes with site-b and site-c."""
    from common.runconfig import RunConfig
    from conftest import write_small_sites
    from server.simulate import simulate
    from server.store import GLOBAL_SITE

    sites = write_small_sites(tmp_path / "sites", size=64, slices=2)
    poisonous_h5(tmp_path / "sites" / "data" / "site-a" / "zz-crafted.h5")
    sites[0].write_text(
        sites[0]
        .read_text(encoding="utf-8")
        .replace("max_slices_per_volume = 2", f"max_slices_per_volume = 2\nfile_check_seconds = {LIMIT}"),
        encoding="utf-8",
    )
    timeout = 45.0
    run = RunConfig.from_flat(
        {
            "name": "h5",
            "num-server-rounds": 1,
            "strategy": "fedavg",
            "model": "unet",
            "model-args": '{"chans": 8, "num_pool_layers": 2}',
            "local-epochs": 0,
            "local-steps": 1,
            "batch-size": 2,
            "max-eval-slices": 2,
            "min-train-nodes": 2,
            "min-evaluate-nodes": 2,
            "min-available-nodes": 3,
            "round-timeout": timeout,
            "sites": ",".join(map(str, sites)),
            "run-dir": str(tmp_path / "run"),
        }
    )
    store = simulate(run, timeout=900)
    summaries = [r for r in store.read_metrics() if r["site"] == GLOBAL_SITE]
    assert [(r["round"], r["phase"]) for r in summaries] == [(0, "evaluate"), (1, "train"), (1, "evaluate")]
    for summary in summaries:
        assert summary["sites"] == ["site-b", "site-c"], summary
        [rejected] = summary["rejected"]
        # An error reply, not silence: the site answered before round-timeout.
        assert rejected["reason"].startswith("error reply"), rejected
        assert summary["seconds"] < timeout, summary
