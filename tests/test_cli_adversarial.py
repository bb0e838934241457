"""Every ``fedsense`` command, run with the mistakes users make: one line naming the bad thing, a non-zero
exit code, no traceback, and every input file byte-identical afterwards.

Commands run in this process (``server.cli.main``, the real argument parsing and error boundary; an
exception escaping the boundary fails the test), except where only a real process shows the behaviour:
a closed pipe, a file-size limit, and permissions: root passes every permission check, so those commands
run as root without capabilities (``setpriv --bounding-set=-all``), for which file modes count again.
One tiny centralized run and its exported model are the inputs.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.command import EXIT_BROKEN_PIPE, EXIT_OS, EXIT_OUTPUT, EXIT_USAGE
from common.runconfig import RunConfig
from server import cli
from server.baseline import Baseline

FEDSENSE = Path(sys.executable).parent / "fedsense"
MASK = ["--mask", "equispaced", "--acceleration", "4", "--center-fraction", "0.08"]


def _hashes(*roots: Path) -> dict[Path, str]:
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def world(small_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The inputs: three demo sites, a 1-round centralized run of a tiny U-Net, and its exported model."""
    base = tmp_path_factory.mktemp("adversarial")
    run_dir = base / "run"
    Baseline(
        "centralized",
        RunConfig.from_flat(
            {
                "name": "central",
                "num-server-rounds": 1,
                "model": "unet",
                "model-args": '{"chans": 4, "num_pool_layers": 2}',
                "local-steps": 1,
                "batch-size": 2,
                "sites": ",".join(map(str, small_sites)),
                "run-dir": str(run_dir),
                "num-samples": 0,
                "max-eval-slices": 1,
            }
        ),
    ).execute()
    model = base / "model"
    assert cli.main(["export", str(run_dir), "--round", "last", "--out", str(model)]) == 0
    return {
        "run": run_dir,
        "model": model,
        "sites": small_sites[0].parent,
        "h5": next((small_sites[0].parent / "data" / "site-a").glob("*.h5")),
    }


@pytest.fixture(autouse=True)
def inputs_unchanged(world: dict[str, Path]) -> Iterator[None]:
    """After every test, every input file still exists with the same bytes."""
    before = _hashes(world["sites"], world["run"], world["model"])
    yield
    after = _hashes(world["sites"], world["run"], world["model"])
    assert {p: after.get(p) for p in before} == before


def fedsense(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Run ``fedsense ARGV`` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage errors, --help, --version
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def refused(result: tuple[int, str, str], code: int, *names: object) -> None:
    rc, out, err = result
    assert rc == code, (rc, out, err)
    for name in names:
        assert str(name) in err, (name, err)


def test_reconstruct_never_writes_over_inputs_or_old_outputs(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5, model = world["h5"], world["model"]
    base = ["reconstruct", "--model", model, h5, *MASK]
    refused(fedsense(capsys, *base, "--out", h5.parent), EXIT_OUTPUT, f"{h5.parent} contains the input {h5}")
    refused(fedsense(capsys, *base, "--out", h5), EXIT_OUTPUT, f"{h5} is the input")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.link(h5, linked / h5.name)  # the same file under another folder: found by inode, not by name
    refused(
        fedsense(capsys, "reconstruct", "--model", model, linked / h5.name, *MASK, "--out", h5.parent),
        EXIT_OUTPUT,
        f"{h5} is the input {linked / h5.name}",
    )
    (tmp_path / "afile").write_text("mine")
    refused(fedsense(capsys, *base, "--out", tmp_path / "afile"), EXIT_OUTPUT, "afile is an existing file")
    assert (tmp_path / "afile").read_text() == "mine"
    refused(
        fedsense(capsys, "reconstruct", "--model", model, h5, h5, *MASK, "--out", tmp_path / "o"),
        EXIT_OUTPUT,
        f"would write {tmp_path / 'o' / h5.name}",
    )
    missing = tmp_path / "nope.h5"
    refused(
        fedsense(capsys, "reconstruct", "--model", model, missing, *MASK, "--out", tmp_path / "o"), EXIT_USAGE, missing
    )
    refused(
        fedsense(capsys, "reconstruct", "--model", tmp_path / "nomodel", h5, "--out", tmp_path / "o"),
        EXIT_USAGE,
        tmp_path / "nomodel",
    )
    refused(
        fedsense(capsys, *base, "--acceleration", "-4", "--out", tmp_path / "o"),
        EXIT_USAGE,
        "--acceleration: must be > 0",
    )
    assert fedsense(capsys, *base, "--out", tmp_path / "o")[0] == 0
    first = (tmp_path / "o" / h5.name).read_bytes()
    refused(
        fedsense(capsys, *base, "--out", tmp_path / "o"),
        EXIT_OUTPUT,
        f"{tmp_path / 'o' / h5.name} already exists; pass --overwrite",
    )
    assert (tmp_path / "o" / h5.name).read_bytes() == first
    assert fedsense(capsys, *base, "--out", tmp_path / "o", "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [h5.name]  # no temp file left behind


def test_export_plot_and_demo_refuse_to_replace(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = world["run"]
    refused(fedsense(capsys, "export", run, "--out", run / "model"), EXIT_OUTPUT, "is inside the input folder")
    refused(
        fedsense(capsys, "export", run, "--out", world["model"]),
        EXIT_OUTPUT,
        f"{world['model']} already exists and is not empty; pass --overwrite",
    )
    refused(fedsense(capsys, "export", run, "--round", "7", "--out", tmp_path / "m"), EXIT_USAGE, "round 7")
    assert not (tmp_path / "m").exists()
    refused(fedsense(capsys, "metrics", "plot", run, "--out", run), EXIT_OUTPUT, f"{run} is the input")
    assert fedsense(capsys, "metrics", "plot", run, "--out", tmp_path / "plots")[0] == 0
    refused(fedsense(capsys, "metrics", "plot", run, "--out", tmp_path / "plots"), EXIT_OUTPUT, "--overwrite")
    site = world["sites"] / "site-a.toml"
    demo = ["data", "demo", "--size", "16", "--subjects", "1", "--site-config", site]
    refused(
        fedsense(capsys, *demo, "--out", world["sites"] / "data"),
        EXIT_OUTPUT,
        f"{world['sites'] / 'data' / 'site-a'}: holds earlier demo data; pass --overwrite",
    )
    refused(fedsense(capsys, *demo, "--out", site), EXIT_OUTPUT, "is an existing file")
    refused(
        fedsense(capsys, *demo[:-1], tmp_path / "missing.toml", "--out", tmp_path / "d"),
        EXIT_USAGE,
        tmp_path / "missing.toml",
    )


def _stats(root: Path) -> dict[Path, tuple[int, int, str]]:
    """Every file under ``root``: inode, mtime and content hash (a rewrite with the same bytes shows too)."""
    return {
        p: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_demo_checks_every_output_before_it_writes_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example sites' configs and data folders are all checked first: a refusal changes nothing in --out."""
    demo = ["data", "demo", "--size", "16", "--subjects", "1"]
    out = tmp_path / "demo"
    assert fedsense(capsys, *demo, "--out", out)[0] == 0
    before = _stats(out)
    refused(
        fedsense(capsys, *demo, "--out", out),
        EXIT_OUTPUT,
        f"{out / 'site-a.toml'}: holds an earlier demo site config; pass --overwrite",
    )
    assert _stats(out) == before  # the configs were rewritten before the data folders were refused
    foreign = tmp_path / "foreign"
    (foreign / "site-c").mkdir(parents=True)
    (foreign / "site-c" / "scan.nii.gz").write_bytes(b"a hospital's scan")
    (foreign / "site-b.toml").write_text("mine")
    for argv in ([*demo, "--out", foreign], [*demo, "--out", foreign, "--overwrite"]):
        refused(
            fedsense(capsys, *argv),
            EXIT_OUTPUT,
            f"{foreign / 'site-b.toml'}: exists and was not written by the demo generator",
        )
    (foreign / "site-b.toml").unlink()
    refused(
        fedsense(capsys, *demo, "--out", foreign, "--overwrite"),
        EXIT_OUTPUT,
        f"{foreign / 'site-c'}: exists and was not written by the demo generator",
    )
    assert sorted(p.relative_to(foreign).as_posix() for p in foreign.rglob("*")) == ["site-c", "site-c/scan.nii.gz"]
    assert (foreign / "site-c" / "scan.nii.gz").read_bytes() == b"a hospital's scan"
    assert fedsense(capsys, *demo, "--out", out, "--overwrite")[0] == 0


def test_export_refuses_its_output_before_loading_the_model(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import export

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded although --out was refused")

    monkeypatch.setattr(export, "select_round", must_not_load)
    (tmp_path / "afile").write_text("mine")
    refused(
        fedsense(capsys, "export", world["run"], "--out", tmp_path / "afile"),
        EXIT_OUTPUT,
        f"{tmp_path / 'afile'} is an existing file",
    )
    refused(
        fedsense(capsys, "export", world["run"], "--out", world["model"]),
        EXIT_OUTPUT,
        f"{world['model']} already exists and is not empty; pass --overwrite",
    )
    assert (tmp_path / "afile").read_text() == "mine"


def test_bad_numbers_typos_and_missing_arguments_are_one_line(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = sorted(map(str, world["sites"].glob("*.toml")))
    refused(
        fedsense(capsys, "evaluate", "--model", world["model"], "--sites", *sites, "--batch-size", "0"),
        EXIT_USAGE,
        "--batch-size: must be >= 1, got 0",
    )
    refused(
        fedsense(capsys, "evaluate", "--model", world["model"], "--sites", *sites, "--max-slices", "-1"),
        EXIT_USAGE,
        "--max-slices: must be >= 0, got -1",
    )
    refused(
        fedsense(
            capsys,
            "data",
            "partition",
            "--dataset",
            "ixi",
            "--root",
            tmp_path,
            "--by",
            "hospital",
            "--out",
            tmp_path / "p",
            "--max-slices",
            "-1",
        ),
        EXIT_USAGE,
        "--max-slices: must be >= 1",
    )
    refused(fedsense(capsys, "simulate", "--sites", *sites, "--rounds", "0"), EXIT_USAGE, "--rounds: must be >= 1")
    refused(fedsense(capsys, "simulate", "--sites", *sites, "--rounds", "two"), EXIT_USAGE, "expected an integer")
    refused(
        fedsense(capsys, "simulate", "--sites", *sites, "--set", "learnig-rate=0.1"),
        EXIT_USAGE,
        "--set learnig-rate: no such run-config key; did you mean learning-rate",
    )
    refused(fedsense(capsys, "simulate", "--sites", *sites, "--set", "learning-rate=-1"), EXIT_USAGE, "learning-rate")
    refused(
        fedsense(capsys, "simulate", "--sites", tmp_path / "ghost.toml", "--run-dir", tmp_path / "r"),
        EXIT_USAGE,
        tmp_path / "ghost.toml",
    )
    refused(fedsense(capsys, "export", world["run"]), EXIT_USAGE, "--out")
    refused(
        fedsense(capsys, "export", world["run"], "--out", tmp_path / "m1", "--out", tmp_path / "m2"),
        EXIT_USAGE,
        "--out given twice",
    )
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    refused(
        fedsense(capsys, "evaluate", "--model", world["model"], "--sites", sites[0], sites[0]),
        EXIT_USAGE,
        f"{sites[0]}: name: 'site-a' is also the name of {sites[0]}",
    )
    refused(fedsense(capsys, "reconstruct", "--model", world["model"]), EXIT_USAGE, "inputs")
    refused(fedsense(capsys, "data", "check", tmp_path / "ghost.toml"), EXIT_USAGE, tmp_path / "ghost.toml")
    refused(fedsense(capsys, "dashboard", world["run"], "--port", "70000"), EXIT_USAGE, "--port: must be <= 65535")
    refused(
        fedsense(capsys, "simulate", "--sites", *sites, "--set", "rounds=3"),
        EXIT_USAGE,
        "--set rounds: no such run-config key; did you mean num-server-rounds?",
    )
    code, out, err = fedsense(capsys, "simulate", "--rounds", "2")  # --sites missing: argparse's own error
    assert code == EXIT_USAGE and out == "", (code, out, err)
    assert err.splitlines() == [
        "fedsense simulate: error: the following arguments are required: --sites (see `fedsense simulate --help`)"
    ]
    simulate_help = " ".join(fedsense(capsys, "simulate", "--help")[1].split())
    assert "(default: 3, run-config key num-server-rounds)" in simulate_help  # pyproject's, not argparse's None
    assert "(default: fedprox, run-config key strategy)" in simulate_help
    assert "(default: 0, run-config key seed)" in " ".join(fedsense(capsys, "baseline", "--help")[1].split())
    assert fedsense(capsys, "--version")[1].startswith("fedsense ")
    assert "--batch-size BATCH_SIZE (default: 4)" in " ".join(fedsense(capsys, "evaluate", "--help")[1].split())
    assert "(>= 16) (default: 128)" in " ".join(fedsense(capsys, "data", "demo", "--help")[1].split())


def test_viewers_refuse_what_is_not_a_run(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(fedsense(capsys, "metrics", "show", world["sites"]), EXIT_USAGE, f"{world['sites']}: not a run directory")
    refused(fedsense(capsys, "metrics", "show", tmp_path / "ghost"), EXIT_USAGE, tmp_path / "ghost")
    refused(fedsense(capsys, "dashboard", tmp_path / "ghost"), EXIT_USAGE, f"{tmp_path / 'ghost'}: no such run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused(
            fedsense(capsys, "dashboard", world["run"], "--port", port), EXIT_USAGE, f"--port {port}: already in use"
        )
    shown = fedsense(capsys, "metrics", "show", world["run"])[1]
    assert "rounds evaluated 1/1" in shown and "fedsense export" in shown


def test_a_baseline_into_an_existing_run_is_refused_before_it_trains(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sites = sorted(map(str, world["sites"].glob("*.toml")))
    code, out, err = fedsense(capsys, "baseline", "local", "--sites", *sites, "--run-dir", world["run"])
    refused((code, out, err), EXIT_OUTPUT, f"--run-dir: {world['run']} holds an earlier run; pass --overwrite")
    assert "round" not in out  # nothing of the old run printed as if it were this one's
    refused(
        fedsense(capsys, "baseline", "local", "--sites", *sites, "--run-dir", world["sites"] / "data"),
        EXIT_OUTPUT,
        "contains the input",
    )


def test_simulate_into_a_finished_baseline_is_refused_as_baseline_refuses_it(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an attempt to resume the baseline as a federated run (``cannot resume: … differs in …``), whether the
    sites are given as the baseline had them (absolute) or relative to the current directory."""
    monkeypatch.chdir(world["sites"])
    absolute = sorted(map(str, world["sites"].glob("*.toml")))
    for sites in (absolute, [Path(site).name for site in absolute]):
        code, out, err = fedsense(capsys, "simulate", "--sites", *sites, "--rounds", "1", "--run-dir", world["run"])
        refused(
            (code, out, err),
            EXIT_OUTPUT,
            f"--run-dir: {world['run']} holds an earlier run; pass --overwrite to replace it, or choose another "
            "--run-dir (a centralized baseline, finished)",
        )
        assert "cannot resume" not in err and "READY" not in out  # refused before any site's data is read


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def _run_with_4_kib_files(*argv: object) -> subprocess.CompletedProcess[str]:
    """``fedsense ARGV`` in a real process that may write no file beyond 4 KiB (a full disk, to a writer)."""
    return subprocess.run(
        [str(FEDSENSE), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=_limit_file_size,
        timeout=300,
        check=False,
    )


def test_full_disk_and_closed_pipe_in_real_processes(world: dict[str, Path], tmp_path: Path) -> None:
    """A file-size limit (what a full disk looks like to a writer) and ``| head``: real processes only."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = _run_with_4_kib_files("reconstruct", "--model", world["model"], world["h5"], *MASK, "--out", tmp_path / "o")
    assert proc.returncode == EXIT_OS, proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert not [p for p in (tmp_path / "o").iterdir()]  # the partial file was removed, nothing half-written
    show = subprocess.Popen(
        [str(FEDSENSE), "metrics", "show", str(world["run"]), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert show.stdout is not None and show.stderr is not None
    show.stdout.close()  # the reader is gone before the table is written, as with a quick `| head`
    err = show.stderr.read().decode()
    assert show.wait(timeout=120) == EXIT_BROKEN_PIPE and err == "", err
    # The rich table too (rich's own broken-pipe handling exits 1).
    table = subprocess.run(
        f"{FEDSENSE} metrics show {world['run']} | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert table.returncode == EXIT_BROKEN_PIPE and table.stderr == "", (table.returncode, table.stderr)
    # --debug after the subcommand (where users add it when an error says "rerun with --debug").
    debug = subprocess.run(
        [str(FEDSENSE), "metrics", "show", str(tmp_path / "ghost"), "--debug"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert debug.returncode == EXIT_USAGE and "Traceback" in debug.stderr and "ghost" in debug.stderr, debug.stderr


def _as_unprivileged() -> list[str]:
    """The command prefix under which file permissions apply: none for a user, capability-free root for root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): permissions cannot be enforced")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def test_unreadable_inputs_and_read_only_outputs_are_one_line(world: dict[str, Path], tmp_path: Path) -> None:
    """An input the user may not read and an output folder they may not write: exit 4, the path named, no
    traceback, nothing written, the inputs untouched."""
    prefix = _as_unprivileged()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    locked = tmp_path / "locked.h5"
    shutil.copy(world["h5"], locked)
    locked.chmod(0)
    toml = tmp_path / "site-a.toml"
    shutil.copy(world["sites"] / "site-a.toml", toml)
    toml.chmod(0)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    before = _hashes(tmp_path)

    def run(*argv: object) -> tuple[int, str]:
        proc = subprocess.run(
            [*prefix, str(FEDSENSE), *map(str, argv)], capture_output=True, text=True, env=env, timeout=300, check=False
        )
        assert "Traceback" not in proc.stdout + proc.stderr
        return proc.returncode, proc.stderr

    try:
        model = ["reconstruct", "--model", world["model"], *MASK]
        for argv, path in [
            ([*model, locked, "--out", tmp_path / "out"], locked),
            ([*model, world["h5"], "--out", read_only], read_only),
            ([*model, world["h5"], "--out", read_only / "new"], read_only / "new"),
            (["metrics", "plot", world["run"], "--out", read_only / "plots"], read_only / "plots"),
            (["data", "demo", "--size", "16", "--subjects", "1", "--out", read_only / "demo"], read_only / "demo"),
            (["export", world["run"], "--round", "last", "--out", read_only / "model"], read_only / "model"),
            (["data", "check", toml], toml),
        ]:
            code, err = run(*argv)
            errors = [line for line in err.splitlines() if line.startswith("fedsense: error: ")]
            assert code == EXIT_OS and len(errors) == 1 and f"{path}: Permission denied" in errors[0], (argv, code, err)
        assert list(read_only.iterdir()) == [] and not (tmp_path / "out").exists()
    finally:
        locked.chmod(0o644)
        toml.chmod(0o644)
        read_only.chmod(0o755)
    assert _hashes(tmp_path) == before


def test_verdict_client_and_operator_name_the_wrong_file(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = sorted(world["sites"].glob("*.toml"))[0]
    refused(fedsense(capsys, "verdict", tmp_path / "ghost", "--local", world["run"]), EXIT_USAGE, tmp_path / "ghost")
    refused(
        fedsense(capsys, "verdict", world["run"], "--local", world["run"]),
        EXIT_USAGE,
        f"{world['run']}: not a local baseline run",
    )
    # A site config where the CA certificate belongs; a data file where the SuperNode key belongs.
    client = ("client", "--superlink", "127.0.0.1:9", "--site-config", site)
    refused(
        fedsense(capsys, *client, "--root-cert", site, "--auth-key", world["h5"]),
        EXIT_USAGE,
        f"{site}: --root-cert: not a PEM certificate",
    )
    assert fedsense(capsys, "pki", "--out", tmp_path / "pki", "--site", "site-a", "--operator", "alice")[0] == 0
    refused(
        fedsense(capsys, *client, "--root-cert", tmp_path / "pki" / "ca.crt", "--auth-key", world["h5"]),
        EXIT_USAGE,
        f"{world['h5']}: --auth-key: not an OpenSSH private key",
    )
    operator = ("operator", "--front-door", "127.0.0.1:9", "--cert", tmp_path / "pki" / "operators" / "alice.crt")
    refused(
        fedsense(capsys, *operator, "--root-cert", tmp_path / "pki" / "ca.key", "--", "flwr", "ls"),
        EXIT_USAGE,
        f"{tmp_path / 'pki' / 'ca.key'}: --root-cert: not a PEM certificate",
    )


def test_pki_refuses_a_folder_of_other_files_and_names_a_foreign_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan.h5").write_bytes(b"raw k-space")
    refused(fedsense(capsys, "pki", "--out", data), EXIT_OUTPUT, f"--out {data}: holds other files (scan.h5)")
    assert sorted(p.name for p in data.iterdir()) == ["scan.h5"] and (data / "scan.h5").read_bytes() == b"raw k-space"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ca.key").write_text("not a key\n")
    refused(fedsense(capsys, "pki", "--out", foreign), EXIT_USAGE, f"{foreign / 'ca.key'}: not an unencrypted PEM")
    assert sorted(p.name for p in foreign.iterdir()) == ["ca.key"]
    # Its own folder, again: completed idempotently (a second site added), nothing refused.
    own = tmp_path / "pki"
    assert fedsense(capsys, "pki", "--out", own, "--site", "site-a")[0] == 0
    before = (own / "ca.key").read_bytes()
    assert fedsense(capsys, "pki", "--out", own, "--site", "site-b")[0] == 0
    assert (own / "ca.key").read_bytes() == before and (own / "sites" / "site-b.pub").exists()


def _demo_of_one_subject(capsys: pytest.CaptureFixture[str], out: Path) -> Path:
    """The example sites with one subject each: all of it in the train split, val and test empty."""
    assert fedsense(capsys, "data", "demo", "--size", "16", "--subjects", "1", "--out", out)[0] == 0
    return out / "site-a.toml"


def test_an_empty_split_names_the_site_and_a_site_not_ready_starts_no_baseline(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty split was an internal error (exit 70) naming no site; a baseline left a failed run behind."""
    from common.data.loaders import load_site, make_loader
    from common.errors import DataError
    from common.ssdu import heldout_loss

    site = _demo_of_one_subject(capsys, tmp_path / "demo")
    data = tmp_path / "demo" / "site-a"
    refused(
        fedsense(capsys, "evaluate", "--model", world["model"], "--sites", site),
        EXIT_USAGE,
        f"{data.resolve()}: site site-a: the test split is empty (0 subject(s))",
        "add subjects",
    )
    run = tmp_path / "run"
    code, out, err = fedsense(capsys, "baseline", "zero-filled", "--sites", site, "--run-dir", run)
    refused((code, out, err), EXIT_USAGE, f"site site-a ({site}) is NOT READY", "--skip-data-check")
    assert not run.exists()  # refused before the run directory was made: the same command works once fixed
    refused(
        fedsense(capsys, "baseline", "zero-filled", "--sites", site, "--run-dir", run, "--skip-data-check"),
        EXIT_USAGE,
        "site site-a: the val split is empty",
    )
    # --overwrite over an earlier run: a site that is not ready refuses the command before the old run is removed.
    earlier = tmp_path / "earlier"
    ready = sorted(world["sites"].glob("*.toml"))[0]
    assert fedsense(capsys, "baseline", "zero-filled", "--sites", ready, "--run-dir", earlier)[0] == 0
    kept = {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()}
    refused(
        fedsense(capsys, "baseline", "zero-filled", "--sites", site, "--run-dir", earlier, "--overwrite"),
        EXIT_USAGE,
        f"site site-a ({site}) is NOT READY",
    )
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == kept
    _, datasets = load_site(str(site))  # the self-supervised validation of a site says the same
    with pytest.raises(DataError, match="site site-a: the val split is empty"):
        heldout_loss(None, make_loader(datasets["val"], 2, shuffle=False, seed=0), rho=0.4, seed=0)


def test_a_demo_that_fails_part_way_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in the last site (the first two written, the configs not yet) removes all this run made."""
    import errno

    from common.data import demo

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(demo, "write_ixi", disk_full)
    out = tmp_path / "demo"
    out.mkdir()
    refused(
        fedsense(capsys, "data", "demo", "--size", "16", "--subjects", "1", "--out", out),
        EXIT_OS,
        f"{out / 'site-c'}: No space left on device",
    )
    assert list(out.iterdir()) == []  # no site folder, temporary folder or site config
    monkeypatch.undo()
    assert fedsense(capsys, "data", "demo", "--size", "16", "--subjects", "1", "--out", out)[0] == 0


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(world: dict[str, Path], tmp_path: Path) -> None:
    """``write()`` on a full disk names no file (h5py's error is a multi-line dump): the user's path is named."""

    def limited(*argv: object) -> list[str]:
        proc = _run_with_4_kib_files(*argv)
        assert proc.returncode == EXIT_OS and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if not line[:4].isdigit()]  # not the log lines
        assert len(errors) == 1 and errors[0].startswith("fedsense: error: "), proc.stderr
        return errors

    demo = tmp_path / "demo"
    assert f"{demo / 'site-a'}: File too large" in limited("data", "demo", "--size", "16", "--out", demo)[0]
    assert not demo.exists()  # no site config nor folder: the same command runs again without --overwrite
    model = tmp_path / "model"
    assert f"{model}: File too large" in limited("export", world["run"], "--round", "last", "--out", model)[0]
    assert not model.exists() and [p.name for p in tmp_path.iterdir()] == []
    plots = tmp_path / "plots"
    error = limited("metrics", "plot", world["run"], "--out", plots)[0]
    assert f"{plots}{os.sep}" in error and ".png: File too large" in error, error
    assert not [p for p in plots.iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_run_dir_or_partition_out_names_the_users_folder(world: dict[str, Path], tmp_path: Path) -> None:
    """Permission is the file system saying no (exit 4); the fix named must help, and the path the user gave."""
    prefix = _as_unprivileged()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)

    def run(*argv: object) -> str:
        proc = subprocess.run(
            [*prefix, str(FEDSENSE), *map(str, argv)], capture_output=True, text=True, env=env, timeout=300, check=False
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("fedsense: error: ")]
        assert proc.returncode == EXIT_OS and len(errors) == 1, proc.stderr
        return errors[0]

    try:
        site = world["sites"] / "site-a.toml"
        error = run("baseline", "zero-filled", "--sites", site, "--run-dir", read_only / "run")
        assert f"({read_only} is owned by uid {os.getuid()}" in error and f"`chmod u+w {read_only}`" in error, error
        assert "chown" not in error  # the folder is this user's own already
        partition = ["data", "partition", "--dataset", "ixi", "--root", world["sites"] / "data" / "site-c"]
        error = run(*partition, "--by", "hospital", "--out", read_only / "p")
        assert f"{read_only / 'p'}: Permission denied" in error and ".partial" not in error, error
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)
