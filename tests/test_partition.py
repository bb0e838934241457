"""``fedsense data partition`` on demo files laid out like the public datasets (real formats and headers)."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.config import load_site_config
from common.data.partition import (
    PartitionSpec,
    cap_subjects,
    dirichlet_assignment,
    partition_dataset,
    random_assignment,
)
from common.data.scanner_header import HeaderError, nominal_field, parse_scanner_header
from common.errors import ConfigError, DataError, OutputError
from public_layout import FASTMRI_SCANNERS, set_scanner, write_public_layout
from server.cli import main as cli_main


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("public")
    return root, write_public_layout(root, size=32, subjects=3)


def _spec(root: Path, dataset: str, by: str, out: Path, **kw: object) -> PartitionSpec:
    return PartitionSpec(dataset=dataset, root=root / dataset, by=by, out=out, **kw)  # type: ignore[arg-type]


def _subjects_of(out: Path, name: str) -> set[str]:
    """Subjects in a written site folder, read back through the site's own TOML and the real reader."""
    from common.data.readers import open_reader

    return set(open_reader(load_site_config(out / f"{name}.toml")).subjects)


def test_ixi_by_hospital_links_each_hospitals_subjects(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    result = partition_dataset(_spec(root, "ixi", "hospital", tmp_path / "sites"))
    out = result.out
    assert sorted(p.name for p in result.site_tomls) == ["ixi-guys.toml", "ixi-hh.toml", "ixi-iop.toml"]
    for hospital, subjects in layout["ixi"].items():
        name = f"ixi-{hospital.lower()}"
        config = load_site_config(out / f"{name}.toml")
        assert config.hospital == hospital and config.data_path == (out / name).resolve()
        assert config.scanner.field_strength_t == (3.0 if hospital == "HH" else 1.5)  # IXI's documented scanners
        assert _subjects_of(out, name) == set(subjects)
        for linked in (out / name).rglob("*.nii.gz"):
            original = root / "ixi" / linked.relative_to(out / name)
            assert os.path.samefile(linked, original) and not linked.is_symlink()  # a hard link, not a copy
    summary = json.loads((out / "partition.json").read_text())
    assert summary["links"] == {"hard": 27}
    assert {s["name"]: (s["subjects"], s["files"]) for s in summary["sites"]} == {
        "ixi-guys": (3, 9),
        "ixi-hh": (3, 9),
        "ixi-iop": (3, 9),
    }
    assert summary["sites"][0]["contrasts"] == {"PD": 3, "T1": 3, "T2": 3}


def test_fastmri_partitions_follow_the_ismrmrd_header(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    by_scanner = partition_dataset(_spec(root, "fastmri", "scanner", tmp_path / "scanner")).out
    for scanner, files in layout["fastmri"].items():
        name = f"fastmri-siemens-{scanner}"
        assert sorted(p.name for p in (by_scanner / name).rglob("*.h5")) == sorted(files)
        config = load_site_config(by_scanner / f"{name}.toml")
        expected = FASTMRI_SCANNERS[scanner]
        with h5py.File(by_scanner / name / "multicoil_train" / files[0]) as f:
            kspace_shape = f["kspace"].shape
        assert config.scanner.coils == expected["coils"] == kspace_shape[1]
        assert config.scanner.matrix == kspace_shape[-2:]
        assert config.scanner.field_strength_t == nominal_field(expected["field_strength_t"])
        assert set(config.contrasts) == set(expected["contrasts"])
    by_field = partition_dataset(_spec(root, "fastmri", "field-strength", tmp_path / "field")).out
    assert sorted(p.name for p in by_field.glob("*.toml")) == ["fastmri-1.5t.toml", "fastmri-3t.toml"]
    by_contrast = partition_dataset(_spec(root, "fastmri", "contrast", tmp_path / "contrast")).out
    counts = {s["name"]: s["files"] for s in json.loads((by_contrast / "partition.json").read_text())["sites"]}
    assert counts == {"fastmri-axflair": 1, "fastmri-axt1": 3, "fastmri-axt2": 2}


def test_fastmri_scanner_key_is_read_from_the_header_not_the_name(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    moved = tmp_path / "fastmri"
    shutil.copytree(root / "fastmri", moved)
    victim = moved / "multicoil_train" / layout["fastmri"]["aera"][0]
    set_scanner(victim, "SIEMENS", "Prisma_fit", field_t=2.89362)
    out = partition_dataset(PartitionSpec(dataset="fastmri", root=moved, by="scanner", out=tmp_path / "s")).out
    assert [p.name for p in (out / "fastmri-siemens-prisma_fit").rglob("*.h5")] == [victim.name]
    field = partition_dataset(PartitionSpec(dataset="fastmri", root=moved, by="field-strength", out=tmp_path / "f")).out
    assert victim.name in {p.name for p in (field / "fastmri-3t").rglob("*.h5")}


def test_brats_by_institution_from_a_fets_partition_csv(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    subjects = layout["brats"]
    plan = {s: ("1" if i % 3 == 0 else "2") for i, s in enumerate(subjects)}
    csv = tmp_path / "partitioning_1.csv"
    csv.write_text("Subject_ID,Partition_ID\n" + "".join(f"{s},{p}\n" for s, p in plan.items()))
    out = partition_dataset(_spec(root, "brats", "institution", tmp_path / "sites", partition_csv=csv)).out
    for partition in ("1", "2"):
        assert _subjects_of(out, f"brats-inst-{partition}") == {s for s, p in plan.items() if p == partition}
        assert len(list((out / f"brats-inst-{partition}").rglob("*.nii.gz"))) == 4 * list(plan.values()).count(
            partition
        )


def test_brats_random_sites_keep_each_subjects_contrasts_together(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    out = partition_dataset(_spec(root, "brats", "random", tmp_path / "sites", sites=2, seed=3)).out
    halves = [_subjects_of(out, f"brats-random-{i}") for i in range(2)]
    assert halves[0] | halves[1] == set(layout["brats"]) and not halves[0] & halves[1]
    assert [len(h) for h in halves] == [3, 3]
    for i in range(2):
        per_subject = Counter(p.parent.name for p in (out / f"brats-random-{i}").rglob("*.nii.gz"))
        assert set(per_subject.values()) == {4}


def test_max_subjects_copy_and_symlink_modes(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = public
    out = partition_dataset(_spec(root, "ixi", "hospital", tmp_path / "copy", max_subjects=2, link="copy")).out
    summary = json.loads((out / "partition.json").read_text())
    assert [s["subjects"] for s in summary["sites"]] == [2, 2, 2] and summary["links"] == {"copy": 18}
    assert len(summary["unassigned_subjects"]) == 3
    copied = next((out / "ixi-hh").rglob("*.nii.gz"))
    assert not os.path.samefile(copied, root / "ixi" / copied.relative_to(out / "ixi-hh"))
    out = partition_dataset(_spec(root, "ixi", "hospital", tmp_path / "sym", link="symlink")).out
    linked = next((out / "ixi-hh").rglob("*.nii.gz"))
    assert linked.is_symlink() and linked.resolve() == (root / "ixi" / linked.relative_to(out / "ixi-hh")).resolve()


def test_dirichlet_is_reproducible_and_subject_level(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    runs = [
        partition_dataset(_spec(root, "ixi", "dirichlet", tmp_path / f"d{i}", sites=2, alpha=0.5, seed=seed))
        for i, seed in enumerate((7, 7))
    ]
    first, second = ({s["name"]: _subjects_of(r.out, s["name"]) for s in r.summary["sites"]} for r in runs)
    assert first == second
    every = {s for subjects in layout["ixi"].values() for s in subjects}
    assert set().union(*first.values()) == every and sum(len(s) for s in first.values()) == len(every)


def test_dirichlet_assignment_properties() -> None:
    labels = {f"s{i:03d}": "abc"[i % 3] for i in range(300)}
    once = dirichlet_assignment(labels, sites=4, alpha=0.3, seed=11)
    shuffled = dict(random.Random(0).sample(sorted(labels.items()), len(labels)))
    assert dirichlet_assignment(shuffled, sites=4, alpha=0.3, seed=11) == once  # input order is irrelevant
    assert dirichlet_assignment(labels, sites=4, alpha=0.3, seed=12) != once
    assert sorted(once) == sorted(labels) and set(once.values()) == {0, 1, 2, 3}

    def skew(alpha: float) -> float:
        """Mean over seeds and labels of the largest site's share of that label's subjects."""
        shares = []
        for seed in range(20):
            got = dirichlet_assignment(labels, sites=4, alpha=alpha, seed=seed)
            for label in "abc":
                counts = Counter(site for s, site in got.items() if labels[s] == label)
                shares.append(max(counts.values()) / 100)
        return float(np.mean(shares))

    assert skew(0.1) > 0.6 > 0.3 > skew(1000.0) >= 0.25  # 1/4 is a perfectly even split over 4 sites
    even = dirichlet_assignment(labels, sites=4, alpha=1e6, seed=0)
    for label in "abc":
        counts = Counter(site for s, site in even.items() if labels[s] == label)
        assert all(abs(n - 25) <= 1 for n in counts.values())


def test_random_assignment_and_cap_are_seeded_and_order_free() -> None:
    subjects = [f"BraTS2021_{i:05d}" for i in range(10)]
    split = random_assignment(subjects, 3, seed=1)
    assert split == random_assignment(list(reversed(subjects)), 3, seed=1)
    assert sorted(Counter(split.values()).values()) == [3, 3, 4]
    assert cap_subjects(subjects, 4, seed=2) == cap_subjects(reversed(subjects), 4, seed=2)
    assert len(cap_subjects(subjects, 4, seed=2)) == 4 and cap_subjects(subjects, None, 2) == sorted(subjects)


# --------------------------------------------------------------------------- bad inputs


def test_wrong_dataset_for_the_folder_says_what_the_folder_holds(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = public
    with pytest.raises(DataError, match=r"no brats files found .* 27 ixi file\(s\): is --dataset right\?"):
        partition_dataset(PartitionSpec(dataset="brats", root=root / "ixi", by="random", out=tmp_path / "o", sites=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no ixi files found"):
        partition_dataset(PartitionSpec(dataset="ixi", root=tmp_path / "empty", by="hospital", out=tmp_path / "o"))
    with pytest.raises(ConfigError, match="--by: ixi can be partitioned by hospital, random, dirichlet, got 'scanner'"):
        partition_dataset(_spec(root, "ixi", "scanner", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_csv_naming_missing_subjects_or_lacking_columns_is_refused(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    csv = tmp_path / "p.csv"
    csv.write_text("Subject_ID,Partition_ID\n" + "".join(f"{s},1\n" for s in layout["brats"]) + "FeTS2022_01337,2\n")
    with pytest.raises(
        DataError, match=r"p.csv: 1 of 7 subjects in the CSV are not in the dataset \(first: FeTS2022_01337\)"
    ):
        partition_dataset(_spec(root, "brats", "institution", tmp_path / "o", partition_csv=csv))
    csv.write_text("subject,site\nBraTS20_Training_001,1\n")
    with pytest.raises(ConfigError, match=r"p.csv: header: missing column\(s\) \['subject_id', 'partition_id'\]"):
        partition_dataset(_spec(root, "brats", "institution", tmp_path / "o", partition_csv=csv))
    with pytest.raises(ConfigError, match="--partition-csv: required with --by institution"):
        partition_dataset(_spec(root, "brats", "institution", tmp_path / "o"))


def test_empty_partitions_are_refused(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = public
    with pytest.raises(ConfigError, match="--sites: 7 sites need at least 7 subjects, the dataset has 6"):
        partition_dataset(_spec(root, "brats", "dirichlet", tmp_path / "o", sites=7, alpha=1.0))
    with pytest.raises(DataError, match=r"some of the 6 sites stay empty with alpha=0.01"):
        partition_dataset(_spec(root, "brats", "dirichlet", tmp_path / "o", sites=6, alpha=0.01))
    with pytest.raises(ConfigError, match=r"--sites: must lie in \[1, 6\]"):
        partition_dataset(_spec(root, "brats", "random", tmp_path / "o", sites=9))


def test_output_is_never_written_over_foreign_data_or_into_the_dataset(
    public: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = public
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="mine: exists and was not written by fedsense data partition"):
        partition_dataset(_spec(root, "ixi", "hospital", foreign))
    assert (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(OutputError, match="is inside the input folder"):
        partition_dataset(_spec(root, "ixi", "hospital", root / "ixi" / "sites"))
    with pytest.raises(OutputError, match="contains the input"):
        partition_dataset(PartitionSpec(dataset="ixi", root=root / "ixi", by="hospital", out=root))
    out = tmp_path / "sites"
    first = partition_dataset(_spec(root, "ixi", "hospital", out))
    (out / "my-notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="holds an earlier partition; pass --overwrite"):
        partition_dataset(_spec(root, "ixi", "random", out, sites=2))
    edited = first.site_tomls[0]
    original = edited.read_text()
    edited.write_text(original + "# my edit\n")
    with pytest.raises(OutputError, match=f"{edited.name}: edited since fedsense data partition wrote it"):
        partition_dataset(_spec(root, "ixi", "random", out, sites=2, overwrite=True))
    edited.write_text(original)
    partition_dataset(_spec(root, "ixi", "random", out, sites=2, overwrite=True))  # only its own files go
    assert sorted(p.name for p in out.glob("*.toml")) == ["ixi-random-0.toml", "ixi-random-1.toml"]
    assert (out / "my-notes.txt").read_text() == "keep"
    assert not any((out / name).exists() for name in ("ixi-hh", "ixi-guys", "ixi-iop"))


def test_cli_prints_the_summary_table(
    public: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = public
    code = cli_main(
        [
            "data",
            "partition",
            "--dataset",
            "fastmri",
            "--root",
            str(root / "fastmri"),
            "--by",
            "field-strength",
            "--out",
            str(tmp_path / "o"),
            "--profile",
            "1.5t-8ch",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "fastmri-1.5t" in printed and "fastmri-3t" in printed and "AXT1:3" in printed
    assert load_site_config(tmp_path / "o" / "fastmri-3t.toml").scanner.mask == "random"  # sampling from the profile
    assert (
        cli_main(
            [
                "data",
                "partition",
                "--dataset",
                "ixi",
                "--root",
                str(root / "ixi"),
                "--by",
                "scanner",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )


# --------------------------------------------------------------------------- ISMRMRD header


NS = 'xmlns="http://www.ismrm.org/ISMRMRD"'
MATRIX = "<encoding><encodedSpace><matrixSize><x>640</x><y>372</y><z>1</z></matrixSize></encodedSpace></encoding>"


def test_header_reader_takes_what_it_needs_and_names_what_is_wrong() -> None:
    header = parse_scanner_header(
        f"<ismrmrdHeader {NS}><acquisitionSystemInformation><systemVendor>SIEMENS</systemVendor>"
        "<systemModel>Skyra</systemModel><systemFieldStrength_T>2.89362</systemFieldStrength_T>"
        f"<receiverChannels>16</receiverChannels><vendorExtra>1</vendorExtra></acquisitionSystemInformation>{MATRIX}"
        "</ismrmrdHeader>"
    )
    assert (header.scanner, header.field_strength_t, header.receiver_channels, header.encoded_matrix) == (
        "SIEMENS Skyra",
        2.89362,
        16,
        (640, 372),
    )
    assert nominal_field(2.89362) == 3.0 and nominal_field(1.494) == 1.5 and nominal_field(2.2) == 2.2
    with pytest.raises(HeaderError, match="encoding/encodedSpace/matrixSize/x: required element is missing"):
        parse_scanner_header(f"<ismrmrdHeader {NS}></ismrmrdHeader>")
    with pytest.raises(HeaderError, match=r"systemFieldStrength_T: expected float, got 'x'"):
        parse_scanner_header(
            f"<ismrmrdHeader {NS}><acquisitionSystemInformation><systemFieldStrength_T>x"
            f"</systemFieldStrength_T></acquisitionSystemInformation>{MATRIX}</ismrmrdHeader>"
        )
    with pytest.raises(HeaderError, match="DOCTYPE"):
        parse_scanner_header(f'<!DOCTYPE x [<!ENTITY a "aaaa">]><ismrmrdHeader {NS}>{MATRIX}</ismrmrdHeader>')
    with pytest.raises(HeaderError, match="root element"):
        parse_scanner_header(f"<ismrmrdHeader>{MATRIX}</ismrmrdHeader>")


def test_unreadable_fastmri_files_are_listed_not_fatal(public: tuple[Path, dict], tmp_path: Path) -> None:
    root, layout = public
    moved = tmp_path / "fastmri"
    shutil.copytree(root / "fastmri", moved)
    bad = moved / "multicoil_train" / layout["fastmri"]["skyra"][0]
    bad.write_bytes(bad.read_bytes()[:1000])
    result = partition_dataset(PartitionSpec(dataset="fastmri", root=moved, by="scanner", out=tmp_path / "o"))
    assert [s["file"] for s in result.summary["skipped"]] == [f"multicoil_train/{bad.name}"]
    assert "not a readable HDF5 file" in result.summary["skipped"][0]["reason"]
    assert sum(s["files"] for s in result.summary["sites"]) == 5


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_partition_then_check_then_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The three commands of README "Your own data", through the real CLI and a real Flower run."""
    from server.store import GLOBAL_SITE, RunDir

    layout = write_public_layout(tmp_path / "public", size=64, subjects=3, datasets=("ixi",))
    out = tmp_path / "sites"
    assert (
        cli_main(
            [
                "data",
                "partition",
                "--dataset",
                "ixi",
                "--root",
                str(tmp_path / "public" / "ixi"),
                "--by",
                "hospital",
                "--contrasts",
                "T2",
                "--max-slices",
                "3",
                "--profile",
                "3t-4ch",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tomls = sorted(str(p) for p in out.glob("*.toml"))
    for toml in tomls:
        assert cli_main(["data", "check", toml]) == 0
    run_dir = tmp_path / "run"
    assert (
        cli_main(
            [
                "simulate",
                "--sites",
                *tomls,
                "--rounds",
                "1",
                "--local-steps",
                "2",
                "--run-dir",
                str(run_dir),
                "--set",
                'model-args={"chans": 8, "num_pool_layers": 2}',
                "--set",
                "batch-size=2",
                "--timeout",
                "600",
            ]
        )
        == 0
    )
    store = RunDir(run_dir)
    assert store.read_config()["status"] == "finished"
    evaluated = {r["site"] for r in store.read_metrics() if r["round"] == 1 and r["phase"] == "evaluate"}
    assert evaluated == {f"ixi-{h.lower()}" for h in layout["ixi"]} | {GLOBAL_SITE}


def test_fets_release_names_and_partition_csv(public: tuple[Path, dict], tmp_path: Path) -> None:
    """FeTS 2022 names its scans FeTS2022_NNNNN_<contrast>.nii.gz; its partition CSV uses those ids."""
    root, layout = public
    fets = tmp_path / "FeTS2022"
    ids = {}
    for k, subject in enumerate(layout["brats"]):
        ids[subject] = f"FeTS2022_{k:05d}"
        for scan in (root / "brats" / subject).glob("*.nii.gz"):
            target = fets / ids[subject] / scan.name.replace(subject, ids[subject])
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(scan, target)
    csv = tmp_path / "partitioning_2.csv"
    csv.write_text("Subject_ID,Partition_ID\n" + "".join(f"{fid},{k % 2 + 1}\n" for k, fid in enumerate(ids.values())))
    out = partition_dataset(
        PartitionSpec(dataset="brats", root=fets, by="institution", out=tmp_path / "o", partition_csv=csv)
    ).out
    assert _subjects_of(out, "brats-inst-1") == {fid for k, fid in enumerate(ids.values()) if k % 2 == 0}
    assert _subjects_of(out, "brats-inst-2") == {fid for k, fid in enumerate(ids.values()) if k % 2 == 1}
