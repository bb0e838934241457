"""Bad data and bad config: the loaders raise the project's own errors (FedSenseError) and nothing else.

A seeded, bounded fuzzer feeds random and mutated .h5 / .nii.gz files and mutated site TOMLs to the
loaders a site runs at start-up (``load_site_config``, ``open_reader`` via ``SiteDataset``, slice
reads). Every outcome must be success or a ``FedSenseError``; with ``skip_bad_files`` and one good
file beside the bad one, the site must always come up. The fuzz runs in a child process with a
4 GiB address-space limit (a header that claims a huge volume must fail, not swap the machine) and a
per-case watchdog (a case that hangs is reported with its stack instead of hanging the suite).
Before it: regression tests for what the fuzzer found, and bad-input cases test_config.py and
test_readers.py do not cover.
"""

from __future__ import annotations

import faulthandler
import gzip
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from common.config import SiteConfig, load_site_config, parse_site_config
from common.data.dataset import SiteDataset
from common.data.h5check import check_files
from common.errors import ConfigError, DataError, FedSenseError
from test_readers import ras_volume, write_h5, write_nifti

ROOT = Path(__file__).resolve().parent.parent
SCANNER = {
    "field_strength_t": 3.0,
    "coils": 2,
    "matrix": [16, 16],
    "mask": "random",
    "acceleration": 2,
    "center_fraction": 0.2,
}
FUZZ_MEMORY = 4 << 30
CASE_SECONDS = 30
# Values a mutated TOML line may get: wrong types, out-of-range and non-finite numbers, odd strings.
TOML_VALUES = (
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "3.0",
    "1e-300",
    "1e300",
    "1e400",
    "-1e400",
    "nan",
    "inf",
    "-inf",
    "100000",
    "99999999999999999999",
    "true",
    '""',
    '"x"',
    '"~nouser_fedsense/data"',
    '"a\\u0000b"',
    '"../../etc"',
    '"random"',
    '"radial"',
    '"ixi"',
    '"brats"',
    '"fastmri"',
    '"Guys"',
    "1979-05-27",
    "[]",
    "[1]",
    "[64, 64]",
    "[16, 16, 16]",
    '[16, "a"]',
    "[100000, 100000]",
    "[2048, 16]",
    "{}",
    "{a = 1}",
    "[[1]]",
)
TOML_CHARS = " =[]{}\"'\n#.,-_0123456789abcxyzé\\\t"


def site_config(dataset: str, data_path: Path, **extra: object) -> SiteConfig:
    """A site over ``data_path`` with every subject in the training split."""
    return parse_site_config(
        {
            "name": "fuzz",
            "dataset": dataset,
            "data_path": str(data_path),
            "scanner": SCANNER,
            "split": {"val_fraction": 0.0, "test_fraction": 0.0},
            **extra,
        },
        "fuzz.toml",
    )


def read_all(dataset: SiteDataset) -> int:
    """Read every sample (what local training does); returns how many there were."""
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset)


# --------------------------------------------------------------------------- what the fuzzer found


def h5_header_is_a_datatype(path: Path) -> None:
    write_h5(path, slices=2, coils=2, shape=(16, 16), recon=(8, 8))
    with h5py.File(path, "r+") as f:
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = np.dtype("f4")  # a committed datatype where a dataset belongs


def nifti_patched(offset: int, values: np.ndarray) -> Any:
    """A maker of a NIfTI whose header bytes at ``offset`` are overwritten with ``values``.

    nibabel refuses to write such headers itself, so the damage is done to a good file's bytes.
    """

    def make(path: Path) -> None:
        plain = path.with_name(path.name.removesuffix(".gz"))
        write_nifti(plain, ras_volume())
        header = bytearray(plain.read_bytes())
        raw = values.tobytes()
        header[offset : offset + len(raw)] = raw
        path.write_bytes(gzip.compress(bytes(header)))
        plain.unlink()

    return make


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (h5_header_is_a_datatype, "not a readable HDF5 file"),
        # NIfTI-1 header offsets: dim[3] at 46, datatype at 70, the sform rows (srow_x/y/z) at 280.
        (nifti_patched(70, np.array([6672], "<i2")), "unreadable NIfTI"),  # a datatype code nobody knows
        (nifti_patched(46, np.array([-5], "<i2")), "every dimension must be >= 1"),
        (nifti_patched(280, np.zeros(12, "<f4")), "no orientation to every axis"),  # a singular affine
        (nifti_patched(280, np.full(12, np.nan, "<f4")), "affine contains NaN or Inf"),
    ],
    ids=[
        "h5-header-is-a-datatype",
        "nifti-unknown-datatype",
        "nifti-negative-dim",
        "nifti-singular-affine",
        "nifti-nan-affine",
    ],
)
def test_files_that_used_to_crash_the_readers_are_named_data_errors(tmp_path: Path, make: Any, reason: str) -> None:
    """Each of these raised TypeError, HeaderDataError, LinAlgError or ValueError before the fix."""
    if make is h5_header_is_a_datatype:
        dataset, bad, good = "fastmri", tmp_path / "bad.h5", tmp_path / "good.h5"
        write_h5(good, slices=2, coils=2, shape=(16, 16), recon=(8, 8), patient="good")
    else:
        dataset, bad, good = "ixi", tmp_path / "IXI002-Guys-0002-T1.nii.gz", tmp_path / "IXI001-Guys-0001-T1.nii.gz"
        write_nifti(good, ras_volume())
    make(bad)
    with pytest.raises(DataError) as info:
        SiteDataset(site_config(dataset, tmp_path), "train")
    assert str(info.value).startswith(f"{bad}: ") and reason in str(info.value)
    skipping = SiteDataset(site_config(dataset, tmp_path, skip_bad_files=True), "train")
    assert [p for p, _ in skipping.skipped] == [bad] and read_all(skipping) > 0


@pytest.mark.parametrize("kind", ["h5", "nii"])
def test_a_file_that_vanishes_after_indexing_is_named_or_skipped(tmp_path: Path, kind: str) -> None:
    """A volume deleted (or its share unmounted) between start-up and the next round."""
    if kind == "h5":
        dataset, names = "fastmri", ["a.h5", "b.h5"]
        for i, name in enumerate(names):
            write_h5(tmp_path / name, slices=2, coils=2, shape=(16, 16), recon=(8, 8), patient=f"p{i}")
    else:
        dataset, names = "ixi", ["IXI001-Guys-0001-T1.nii.gz", "IXI002-Guys-0002-T1.nii.gz"]
        for name in names:
            write_nifti(tmp_path / name, ras_volume())
    strict = SiteDataset(site_config(dataset, tmp_path), "train")
    skipping = SiteDataset(site_config(dataset, tmp_path, skip_bad_files=True), "train")
    gone = tmp_path / names[0]
    gone.unlink()
    with pytest.raises(DataError, match=f"^{re.escape(str(gone))}: "):
        read_all(strict)
    assert read_all(skipping) == len(skipping) and [p for p, _ in skipping.skipped] == [gone]
    assert all(skipping[i]["fname"] == names[1] for i in range(len(skipping)))


BASE_TOML = """\
name = "fuzz"
dataset = "ixi"
data_path = "data"

[split]
val_fraction = 0.2
test_fraction = 0.2

[scanner]
field_strength_t = 3.0
coils = 4
matrix = [64, 64]
noise_std = 0.01
mask = "poisson"
acceleration = 4
center_fraction = 0.08

[demo]
subjects = 3
"""


@pytest.mark.parametrize(
    ("old", "new", "field", "reason"),
    [
        ("coils = 4", "coils = 129", "scanner.coils", "must be <= 128"),
        ("matrix = [64, 64]", "matrix = [64, 100000]", "scanner.matrix.1", "must be <= 1024"),
        ("matrix = [64, 64]", "matrix = [64]", "scanner.matrix.1", "required field is missing"),
        ("noise_std = 0.01", "noise_std = inf", "scanner.noise_std", "finite number"),
        ("noise_std = 0.01", "noise_std = nan", "scanner.noise_std", "finite number"),
        ("acceleration = 4", "acceleration = nan", "scanner.acceleration", "finite number"),
        ("coils = 4", 'coils = "four"', "scanner.coils", "valid integer"),
        ('data_path = "data"', 'data_path = "~nouser_fedsense/data"', "data_path", "cannot expand"),
        ('data_path = "data"', "data_path = 3", "data_path", "path"),
        ('name = "fuzz"', 'name = ""', "name", "at least 1 character"),
        ("test_fraction = 0.2", "test_fraction = 1.0", "split.test_fraction", "must be < 1"),
        ("subjects = 3", "subjects = 0", "demo.subjects", "must be >= 1"),
        ('dataset = "ixi"', 'dataset = "ixi"\nmax_slices_per_volume = 0', "max_slices_per_volume", "must be >= 1"),
        ('dataset = "ixi"', 'dataset = "ixi"\nskip_bad_files = "yes please"', "skip_bad_files", "valid boolean"),
        ("[split]\n", "split = 3\n[unused]\n", "split", "valid dictionary"),
    ],
)
def test_more_bad_site_config_values_name_file_and_field(
    tmp_path: Path, old: str, new: str, field: str, reason: str
) -> None:
    assert old in BASE_TOML
    path = tmp_path / "site.toml"
    path.write_text(BASE_TOML.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    line = next((x for x in str(info.value).splitlines() if x.startswith(f"{path}: {field}: ")), str(info.value))
    assert line.startswith(f"{path}: {field}: ") and reason in line, line


def test_a_site_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(BASE_TOML.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"site\.toml: <file>: cannot read"):
        load_site_config(path)


# --------------------------------------------------------------------------- the fuzzer


def mutate(rng: np.random.Generator, valid: bytes) -> bytes:
    """One random corruption of ``valid``: noise, flipped bytes, truncation, a wiped run, or a foreign tail."""
    data = bytearray(valid)
    kind = int(rng.integers(5))
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 2048)))
    if kind == 1:
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return bytes(data)
    if kind == 2:
        return bytes(data[: int(rng.integers(len(data)))])
    start = int(rng.integers(len(data)))
    if kind == 3:
        stop = min(len(data), start + int(rng.integers(1, 64)))
        data[start:stop] = bytes([int(rng.choice([0, 255]))]) * (stop - start)
        return bytes(data)
    return bytes(data[:start]) + rng.bytes(int(rng.integers(1, 256)))


def mutate_toml(rng: np.random.Generator, text: str) -> bytes:
    """One to three edits of a site TOML: a value swapped, a line dropped or repeated, characters garbled."""
    lines = text.splitlines()
    for _ in range(int(rng.integers(1, 4))):
        i, edit = int(rng.integers(len(lines))), int(rng.choice(4, p=[0.55, 0.15, 0.15, 0.15]))
        if edit == 0 and "=" in lines[i]:
            lines[i] = f"{lines[i].split('=')[0]}= {TOML_VALUES[int(rng.integers(len(TOML_VALUES)))]}"
        elif edit == 1:
            del lines[i]
        elif edit == 2:
            lines.insert(i, lines[int(rng.integers(len(lines)))])
        else:
            chars = list(lines[i])
            for _ in range(int(rng.integers(1, 4))):
                j, c = int(rng.integers(len(chars) + 1)), TOML_CHARS[int(rng.integers(len(TOML_CHARS)))]
                if chars and j < len(chars) and rng.random() < 0.5:
                    chars[j] = c
                else:
                    chars.insert(j, c)
            lines[i] = "".join(chars)
    data = "\n".join(lines).encode()
    return data[: int(rng.integers(len(data)))] + b"\xff\xfe" if rng.random() < 0.05 else data


def fuzz_files(kind: str, seed: int, count: int, workdir: Path) -> Counter[str]:
    """``count`` cases of a good file beside a mutated one, read strictly and with skip_bad_files."""
    if kind == "h5":
        dataset, good_name, bad_name, valid_path = "fastmri", "good.h5", "bad.h5", workdir / "valid.h5"
        write_h5(valid_path, slices=2, coils=2, shape=(16, 16), recon=(8, 8))
        write_h5(workdir / good_name, slices=2, coils=2, shape=(16, 16), recon=(8, 8), patient="good")
    else:
        dataset, valid_path = "ixi", workdir / "valid.nii.gz"
        good_name, bad_name = "IXI001-Guys-0001-T1.nii.gz", "IXI002-Guys-0002-T1.nii.gz"
        write_nifti(valid_path, ras_volume((12, 12, 6), empty=1))
        write_nifti(workdir / good_name, ras_volume((12, 12, 6), empty=1))
    valid, good = valid_path.read_bytes(), (workdir / good_name).read_bytes()
    outcomes: Counter[str] = Counter()
    cases = []
    for case in range(count):
        rng = np.random.default_rng([seed, case])
        if kind == "nii" and rng.random() < 0.7:  # mostly corrupt the volume, not the gzip stream
            data = gzip.compress(mutate(rng, gzip.decompress(valid)))
        else:
            data = mutate(rng, valid)
        directory = workdir / f"case-{case}"
        directory.mkdir()
        (directory / good_name).write_bytes(good)
        (directory / bad_name).write_bytes(data)
        cases.append((case, data, directory))
    if kind == "h5":
        # Every case's files through one checking child (a fresh one after a file that hangs or crashes it), as
        # a site with many files gets them checked; each case's reader then takes its verdicts from the cache.
        # One child per case would spend ~0.2 s per case starting Python and h5py.
        check_files(sorted(workdir.glob("case-*/*.h5")))
    for case, data, directory in cases:
        with CaseGuard(kind, case, data, workdir):
            try:
                read_all(SiteDataset(site_config(dataset, directory), "train"))
                outcomes["strict: read"] += 1
            except FedSenseError as exc:
                outcomes[f"strict: {type(exc).__name__}"] += 1
            skipping = SiteDataset(site_config(dataset, directory, skip_bad_files=True), "train")
            assert read_all(skipping) > 0, "a good file is left, so the site must come up"
            outcomes[f"skip: {len(skipping.skipped)} skipped"] += 1
        shutil.rmtree(directory)
    return outcomes


def fuzz_toml(seed: int, count: int, workdir: Path, base: Path) -> Counter[str]:
    """``count`` mutations of a real site TOML: loaded (then its data read) or refused with ConfigError."""
    text = base.read_text(encoding="utf-8")
    outcomes: Counter[str] = Counter()
    for case in range(count):
        data = mutate_toml(np.random.default_rng([seed, case]), text)
        path = workdir / f"case-{case}.toml"
        path.write_bytes(data)
        with CaseGuard("toml", case, data, workdir):
            try:
                config = load_site_config(path)
                dataset = SiteDataset(config, "train")
                if len(dataset):
                    dataset[0]
                outcomes["loaded and read"] += 1
            except FedSenseError as exc:
                outcomes[type(exc).__name__] += 1
    return outcomes


class CaseGuard:
    """Per fuzz case: a stack dump and exit if it hangs; the case's input kept if it fails or hangs."""

    def __init__(self, kind: str, case: int, data: bytes, workdir: Path) -> None:
        self.keep = workdir / f"failing-{kind}-{case}.bin"
        self.data = data

    def __enter__(self) -> None:
        self.keep.write_bytes(self.data)  # removed again unless the case fails (or never returns)
        faulthandler.dump_traceback_later(CASE_SECONDS, exit=True)

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        faulthandler.cancel_dump_traceback_later()
        if kind is None:
            self.keep.unlink()


def run_fuzz(kind: str, seed: int, count: int, workdir: Path) -> Counter[str]:
    """Run one fuzz campaign in a child process (memory-capped, watchdogged); its outcome counts."""
    workdir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, __file__, kind, str(seed), str(count), str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    kept = sorted(p.name for p in workdir.glob("failing-*.bin"))
    assert done.returncode == 0, f"{kind} fuzz failed on {kept} (inputs kept in {workdir}):\n{done.stderr[-6000:]}"
    return Counter(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "seed", "count"), [("h5", 20251126, 400), ("nii", 20251126, 400)])
def test_fuzzed_data_files_give_data_errors_or_are_skipped(tmp_path: Path, kind: str, seed: int, count: int) -> None:
    outcomes = run_fuzz(kind, seed, count, tmp_path)
    print(kind, dict(outcomes))
    assert sum(n for k, n in outcomes.items() if k.startswith("strict")) == count
    assert outcomes["strict: DataError"] > count // 3  # the fuzzer does reach the error paths...
    assert sum(n for k, n in outcomes.items() if k.startswith("skip: 1")) > count // 3  # ...and skip mode


@pytest.mark.slow
def test_fuzzed_site_configs_give_config_errors_or_load(tmp_path: Path) -> None:
    outcomes = run_fuzz("toml", 20251126, 1000, tmp_path)
    print(dict(outcomes))
    assert sum(outcomes.values()) == 1000 and outcomes["ConfigError"] > 300 and outcomes["loaded and read"] > 20


def test_an_h5_with_a_zeroed_global_heap_object_fails_in_bounded_time(tmp_path: Path) -> None:
    """libhdf5 loops forever reading a string attribute whose global-heap object has size 0. The reader
    reads every file once in a child process with a time limit (common.data.h5check), so the file is a
    DataError naming it within seconds, and skip_bad_files leaves it out."""
    path = tmp_path / "heap.h5"
    write_h5(path, slices=2, coils=2, shape=(16, 16), recon=(8, 8))
    data = bytearray(path.read_bytes())
    heap = data.index(b"GCOL") + 16  # first object of the global heap collection (the string attributes)
    data[heap : heap + 64] = bytes(64)
    path.write_bytes(bytes(data))
    write_h5(tmp_path / "good.h5", slices=2, coils=2, shape=(16, 16), recon=(8, 8), patient="good")
    started = time.monotonic()
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: reading it did not finish within 2 s"):
        SiteDataset(site_config("fastmri", tmp_path, file_check_seconds=2), "train")
    skipping = SiteDataset(site_config("fastmri", tmp_path, skip_bad_files=True, file_check_seconds=2), "train")
    assert [p for p, _ in skipping.skipped] == [path] and read_all(skipping) > 0
    assert time.monotonic() - started < 30


def _child(kind: str, seed: int, count: int, workdir: Path) -> None:
    """The fuzz process: any exception escapes with its traceback on stderr and exit status 1."""
    resource.setrlimit(resource.RLIMIT_AS, (FUZZ_MEMORY, FUZZ_MEMORY))
    if kind == "toml":
        base = workdir / "base.toml"
        write_site_for_toml_fuzz(workdir, base)
        outcomes = fuzz_toml(seed, count, workdir, base)
    else:
        outcomes = fuzz_files(kind, seed, count, workdir)
    print(json.dumps(outcomes))


def write_site_for_toml_fuzz(workdir: Path, base: Path) -> None:
    """A small IXI site (two volumes) and its TOML, the starting point of every TOML mutation."""
    data = workdir / "data"
    for name in ("IXI001-Guys-0001-T1.nii.gz", "IXI002-Guys-0002-T1.nii.gz", "IXI003-Guys-0003-T1.nii.gz"):
        write_nifti(data / name, ras_volume((16, 16, 6), empty=1))
    base.write_text(
        BASE_TOML.replace('data_path = "data"', f'data_path = "{data}"').replace("[64, 64]", "[16, 16]"),
        encoding="utf-8",
    )


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
