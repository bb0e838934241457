"""Demo data: written in the real formats, read back by the real readers, deterministic per seed."""

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from common.config import SiteConfig, parse_site_config
from common.data.demo import MARKER, default_site_files, generate_demo, main
from common.data.readers import open_reader, parse_ismrmrd_header
from common.errors import OutputError


def tiny_site(name: str, dataset: str, data_path: Path, **extra: object) -> SiteConfig:
    data = {
        "name": name,
        "dataset": dataset,
        "data_path": str(data_path),
        "scanner": {
            "field_strength_t": 3.0,
            "coils": 2,
            "matrix": [32, 32],
            "noise_std": 0.01,
            "mask": "equispaced",
            "acceleration": 4,
            "center_fraction": 0.08,
        },
        "demo": {"subjects": 2, "seed": 5},
    }
    data.update(extra)
    return parse_site_config(data, f"{name}.toml")


def tiny_sites(out: Path) -> list[SiteConfig]:
    return [
        tiny_site("h5site", "fastmri", out / "h5site", contrasts=["AXT2", "AXFLAIR"]),
        tiny_site("bratssite", "brats", out / "bratssite"),
        tiny_site("ixisite", "ixi", out / "ixisite", hospital="HH"),
    ]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo(out, size=32, subjects=3, seed=0, sites=tiny_sites(out))


def test_fastmri_files(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    files = sorted((out / "h5site").glob("*.h5"))
    assert len(files) == 3 and summary["h5site"]["dataset"] == "fastmri"
    assert summary["h5site"]["folder"] == str(out / "h5site")
    with h5py.File(files[0], "r") as f:
        assert f["kspace"].shape == (12, 2, 32, 32) and f["kspace"].dtype == np.complex64
        assert f["reconstruction_rss"].shape == (12, 32, 32)
        assert f.attrs["max"] == pytest.approx(float(f["reconstruction_rss"][()].max()))
        assert f.attrs["acquisition"] in ("AXT2", "AXFLAIR") and len(f.attrs["patient_id"]) == 12
        geometry = parse_ismrmrd_header(f["ismrmrd_header"][()])
    assert geometry.encoded_size == geometry.recon_size == (32, 32, 1)
    assert geometry.field_strength_t == 3.0 and geometry.acquired_columns == (0, 32)
    assert sorted(summary["h5site"]["subjects"]) == open_reader(tiny_sites(out)[0]).subjects


def test_brats_and_ixi_files(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    folders = sorted(p.name for p in (out / "bratssite").iterdir() if p.is_dir())
    assert folders == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    names = sorted(p.name for p in (out / "bratssite" / folders[0]).iterdir())
    assert names == [f"BraTS20_Training_001_{c}.nii.gz" for c in ("flair", "seg", "t1", "t1ce", "t2")]
    img = nib.load(out / "bratssite" / folders[0] / names[0])
    assert img.shape == (32, 32, 16) and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")

    ixi = sorted(p.name for p in (out / "ixisite").glob("*.nii.gz"))
    assert len(ixi) == 9 and all("-HH-" in name for name in ixi)
    t1 = nib.load(next((out / "ixisite").glob("*-T1.nii.gz")))
    assert nib.aff2axcodes(t1.affine) == ("P", "S", "R")  # sagittal, as IXI T1 is stored

    for site in tiny_sites(out)[1:]:
        reader = open_reader(site)
        assert len(reader.subjects) == 3
        per_volume = {}
        for ex in reader.examples:
            per_volume[ex.path] = per_volume.get(ex.path, 0) + 1
        assert all(10 <= n <= 16 for n in per_volume.values())  # about 12 slices with anatomy


def test_contrasts_differ_as_in_mri(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    folder = out / "bratssite" / "BraTS20_Training_001"
    t1 = np.asarray(nib.load(folder / "BraTS20_Training_001_t1.nii.gz").dataobj, np.float32)
    flair = np.asarray(nib.load(folder / "BraTS20_Training_001_flair.nii.gz").dataobj, np.float32)
    brain = t1 > 0.1 * t1.max()
    assert brain.mean() > 0.1
    # FLAIR suppresses CSF, which is dark on T1 too; their ratio is far from constant across the brain.
    ratio = flair[brain] / t1[brain]
    assert ratio.std() / ratio.mean() > 0.1


def test_deterministic_for_a_seed(tmp_path: Path, demo: tuple[Path, dict]) -> None:
    out, summary = demo
    site = tiny_sites(tmp_path)[2]
    again = generate_demo(tmp_path, size=32, subjects=3, seed=0, sites=[site])
    assert again["ixisite"]["files"] == summary["ixisite"]["files"]
    name = again["ixisite"]["files"][0]
    first = np.asarray(nib.load(out / "ixisite" / name).dataobj)
    second = np.asarray(nib.load(tmp_path / "ixisite" / name).dataobj)
    np.testing.assert_array_equal(first, second)
    other = generate_demo(tmp_path / "other", size=32, subjects=3, seed=1, sites=[site])
    assert other["ixisite"]["files"] != summary["ixisite"]["files"]


def test_rerun_replaces_only_demo_folders(tmp_path: Path) -> None:
    site = tiny_site("ixisite", "ixi", tmp_path / "ixisite")
    generate_demo(tmp_path, size=32, subjects=1, sites=[site])
    with pytest.raises(OutputError, match="ixisite: holds earlier demo data; pass --overwrite"):
        generate_demo(tmp_path, size=32, subjects=1, sites=[site])
    generate_demo(tmp_path, size=32, subjects=1, sites=[site], overwrite=True)
    assert (tmp_path / "ixisite" / MARKER).exists() and len(list((tmp_path / "ixisite").glob("*.nii.gz"))) == 3
    precious = tmp_path / "real" / "ixisite"
    precious.mkdir(parents=True)
    (precious / "IXI002-Guys-0828-T1.nii.gz").write_bytes(b"real data")
    with pytest.raises(OutputError, match=f"^{precious}: exists and was not written by the demo generator"):
        generate_demo(tmp_path / "real", size=32, subjects=1, sites=[site])


def test_main_with_site_files(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(
        'name = "s"\ndataset = "brats"\ndata_path = "x"\ncontrasts = ["t1"]\n'
        '[scanner]\nfield_strength_t = 1.5\ncoils = 2\nmask = "random"\n'
        "acceleration = 4\ncenter_fraction = 0.08\n"
    )
    assert main(["--out", str(tmp_path / "out"), "--size", "32", "--subjects", "1", "--sites", str(toml)]) == 0
    assert len(list((tmp_path / "out" / "s").rglob("*.nii.gz"))) == 5  # four contrasts and the label map
    assert main(["--out", str(tmp_path / "out"), "--size", "8", "--sites", str(toml)]) == 2


def test_default_sites_are_the_shipped_ones() -> None:
    assert list(default_site_files()) == ["site-a.toml", "site-b.toml", "site-c.toml"]


def test_anatomy_keeps_the_template_texture_within_a_tissue() -> None:
    """Inside pure white matter, intensities vary with the real template (not one constant per tissue)."""
    from common.data.phantom import make_subject

    subject = make_subject(np.random.default_rng(0), 64, 4, slice_thickness_mm=6.0, z_start_mm=10.0)
    white = subject.tissues["wm"] > 0.95
    assert white.sum() > 200
    for contrast in ("T1", "T2", "FLAIR"):
        values = (subject.image(contrast) / subject.bias)[white]  # the smooth bias field removed
        relative = values / values.mean()
        assert relative.std() > 0.01, contrast
        assert len(np.unique(np.round(relative, 3))) > 50, contrast
    # T1 keeps the template's texture, T2 inverts it.
    t1, t2 = (subject.image(c) / subject.bias for c in ("T1", "T2"))
    assert np.corrcoef(t1[white], t2[white])[0, 1] < -0.5


def test_brats_label_map_marks_the_tumour_and_the_reader_ignores_it(demo: tuple[Path, dict]) -> None:
    """``_seg`` holds BraTS labels where the tumour is (T1CE-bright rim = 4); the reader serves only images."""
    out, _ = demo
    folder = out / "bratssite" / "BraTS20_Training_001"
    seg = np.asarray(nib.load(folder / "BraTS20_Training_001_seg.nii.gz").dataobj)
    t1ce = np.asarray(nib.load(folder / "BraTS20_Training_001_t1ce.nii.gz").dataobj).astype(float)
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
    if (seg == 4).any():
        assert t1ce[seg == 4].mean() > t1ce[(seg == 0) & (t1ce > 0)].mean()
    from common.data.readers import find_brats_files

    found = find_brats_files(out / "bratssite")
    assert len(found) == 12 and not any("seg" in f.path.name for f in found)  # 3 subjects x 4 contrasts
    assert len(open_reader(tiny_sites(out)[1]).subjects) == 3


def test_atrophy_enlarges_csf_and_labels_follow_tumour_fractions() -> None:
    """Same draws, atrophy 0 vs 1: more CSF, less grey matter; labels are the majority tumour class."""
    from dataclasses import replace

    from common.data.phantom import PATIENTS, make_subject

    young, old = (
        make_subject(
            np.random.default_rng(3),
            48,
            8,
            slice_thickness_mm=6.0,
            z_start_mm=0.0,
            lesion=True,
            variation=replace(PATIENTS, atrophy=(a, a), wmh_per_atrophy=0.0),
        )
        for a in (0.0, 1.0)
    )
    assert old.volume_ml("csf") > 1.2 * young.volume_ml("csf")
    assert old.volume_ml("gm") < young.volume_ml("gm")
    labels = old.labels()
    assert (labels[old.tissues["necrosis"] > 0.5] == 1).all()
    assert (labels[old.tissues["oedema"] > 0.5] == 2).all()
    tumour = old.tissues["necrosis"] + old.tissues["enhancing"] + old.tissues["oedema"]
    assert (labels[tumour < 0.5] == 0).all()


def test_patient_model_has_white_matter_lesions_bright_on_flair() -> None:
    from dataclasses import replace

    from common.data.phantom import PATIENTS, make_subject

    subject = make_subject(
        np.random.default_rng(1),
        64,
        8,
        slice_thickness_mm=6.0,
        z_start_mm=0.0,
        variation=replace(PATIENTS, atrophy=(1.0, 1.0)),
    )
    lesion, white = subject.tissues["wmh"] > 0.8, subject.tissues["wm"] > 0.9
    assert lesion.sum() > 3 and subject.volume_ml("wmh") > 0
    flair = subject.image("FLAIR") / subject.bias
    assert flair[lesion].mean() > 1.4 * flair[white].mean()
