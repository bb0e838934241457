"""SiteDataset: the ARCHITECTURE.md sample dict, subject-level splits, deterministic masks, bad files."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.coils import rss
from common.config import SiteConfig, parse_site_config
from common.data.dataset import SiteDataset, build_site_datasets
from common.data.demo import generate_demo
from common.data.splits import split_subjects
from common.errors import DataError
from common.fft import ifft2c
from common.masks import make_mask, seed_for

KEYS = {
    "masked_kspace",
    "mask",
    "sens_maps",
    "target",
    "scale",
    "max_value",
    "fname",
    "subject",
    "site",
    "slice_idx",
}


def site(name: str, dataset: str, data_path: Path, **extra: object) -> SiteConfig:
    data = {
        "name": name,
        "dataset": dataset,
        "data_path": str(data_path),
        "seed": 9,
        "split": {"seed": 3, "val_fraction": 0.25, "test_fraction": 0.25},
        "scanner": {
            "field_strength_t": 3.0,
            "coils": 3,
            "matrix": [32, 32],
            "noise_std": 0.02,
            "mask": "random",
            "acceleration": 4,
            "center_fraction": 0.1,
        },
        "max_slices_per_volume": 4,
    }
    data.update(extra)
    return parse_site_config(data, f"{name}.toml")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteConfig]:
    out = tmp_path_factory.mktemp("data")
    configs = {
        "fastmri": site("a", "fastmri", out / "a"),
        "brats": site("b", "brats", out / "b", contrasts=["flair", "t2"]),
        "ixi": site(
            "c",
            "ixi",
            out / "c",
            scanner={
                "field_strength_t": 1.5,
                "coils": 2,
                "matrix": [40, 32],
                "noise_std": 0.0,
                "mask": "poisson",
                "acceleration": 3,
                "center_fraction": 0.1,
            },
        ),
    }
    generate_demo(out, size=32, subjects=4, seed=0, sites=list(configs.values()))
    return configs


@pytest.mark.parametrize("kind", ["fastmri", "brats", "ixi"])
def test_sample_matches_the_contract(sites: dict[str, SiteConfig], kind: str) -> None:
    config = sites[kind]
    datasets = build_site_datasets(config)
    sample = datasets["train"][0]
    assert set(sample) == KEYS
    coils, (height, width) = config.scanner.coils, config.scanner.matrix
    assert sample["masked_kspace"].shape == sample["sens_maps"].shape == (coils, height, width)
    assert sample["masked_kspace"].dtype == sample["sens_maps"].dtype == torch.complex64
    assert sample["mask"].shape == (1, height, width) and sample["mask"].dtype == torch.float32
    assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    assert sample["target"].shape == (height, width) and sample["target"].dtype == torch.float32
    assert isinstance(sample["scale"], float) and isinstance(sample["max_value"], float)
    assert "/" not in sample["fname"] and sample["site"] == config.name and isinstance(sample["slice_idx"], int)
    # Unsampled k-space is zero, and the scale makes the zero-filled RSS image peak at exactly 1.
    assert torch.all(sample["masked_kspace"][:, sample["mask"][0] == 0] == 0)
    zero_filled = rss(ifft2c(sample["masked_kspace"]), dim=0)
    assert float(zero_filled.max()) == pytest.approx(1.0, rel=1e-4)
    assert float(sample["target"].max()) <= sample["max_value"] * 1.05
    assert torch.allclose(rss(sample["sens_maps"], dim=0), torch.ones(height, width), atol=1e-3)


def test_mask_is_deterministic_per_file_and_slice(sites: dict[str, SiteConfig]) -> None:
    config = sites["brats"]
    dataset = SiteDataset(config, "train")
    first, again = dataset[1], dataset[1]
    assert torch.equal(first["mask"], again["mask"]) and torch.equal(first["masked_kspace"], again["masked_kspace"])
    expected = make_mask("random", (32, 32), 4, 0.1, seed_for(9, first["fname"], first["slice_idx"])).mask
    np.testing.assert_array_equal(first["mask"][0].numpy(), expected)
    masks = {tuple(dataset[i]["mask"][0, 0].tolist()) for i in range(len(dataset))}
    assert len(masks) > 1  # slices get different random masks


def test_splits_are_by_subject(sites: dict[str, SiteConfig]) -> None:
    for config in sites.values():
        datasets = build_site_datasets(config)
        subjects = {split: {ds.reader.examples[i].subject for i in ds.indices} for split, ds in datasets.items()}
        assert all(subjects.values()), subjects  # 4 subjects: every split non-empty
        assert not subjects["train"] & subjects["val"]
        assert not subjects["train"] & subjects["test"]
        assert not subjects["val"] & subjects["test"]
        assert set().union(*subjects.values()) == set(datasets["train"].reader.subjects)
        assert sum(len(ds) for ds in datasets.values()) == len(datasets["train"].reader)


@pytest.mark.parametrize("count", [3, 4, 5, 10, 37])
def test_split_subjects_properties(count: int) -> None:
    subjects = [f"sub-{i:03d}" for i in range(count)]
    parts = split_subjects(subjects, seed=0, val_fraction=0.2, test_fraction=0.1)
    assert all(parts.values())
    assert sorted(s for part in parts.values() for s in part) == subjects
    assert parts == split_subjects(reversed(subjects), seed=0, val_fraction=0.2, test_fraction=0.1)
    if count >= 10:
        assert parts != split_subjects(subjects, seed=1, val_fraction=0.2, test_fraction=0.1)
        assert len(parts["val"]) == round(count * 0.2) and len(parts["test"]) == round(count * 0.1)


def test_split_small_and_zero_fraction_sites() -> None:
    assert split_subjects(["a"], 0, 0.2, 0.2) == {"train": ["a"], "val": [], "test": []}
    assert split_subjects(["a", "b"], 0, 0.2, 0.2)["train"] == ["a", "b"]
    assert split_subjects(["a", "b", "c", "d"], 0, 0.0, 0.5)["val"] == []


def test_default_collate_batches(sites: dict[str, SiteConfig]) -> None:
    batch = next(iter(DataLoader(SiteDataset(sites["ixi"], "train"), batch_size=2)))
    assert batch["masked_kspace"].shape == (2, 2, 40, 32) and batch["mask"].shape == (2, 1, 40, 32)
    assert batch["target"].shape == (2, 40, 32) and len(batch["fname"]) == 2


def write_oversampled_h5(path: Path, patient: str, nan_slice: int | None = None) -> None:
    """fastMRI-like: readout oversampled 2x, recon 32x32, phase lines outside [4, 44) zero-padded."""
    rng = np.random.default_rng(len(patient))
    image = np.zeros((3, 64, 48), np.complex64)
    image[:, 20:44, 12:36] = rng.uniform(0.5, 1.0, (3, 24, 24)) * np.exp(1j * rng.uniform(0, 1, (3, 24, 24)))
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    kspace = np.repeat(kspace[:, np.newaxis], 2, axis=1).astype(np.complex64)
    kspace[..., :4] = 0
    kspace[..., 44:] = 0
    if nan_slice is not None:
        kspace[nan_slice, 0, 0, 0] = np.nan
    header = (
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        "<encodedSpace><matrixSize><x>64</x><y>48</y><z>1</z></matrixSize></encodedSpace>"
        "<reconSpace><matrixSize><x>32</x><y>32</y><z>1</z></matrixSize></reconSpace>"
        "<encodingLimits><kspace_encoding_step_1><maximum>39</maximum><center>20</center>"
        "</kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>"
    )
    with h5py.File(path, "w") as f:
        f["kspace"] = kspace
        f["ismrmrd_header"] = header
        f.attrs["patient_id"] = patient
        f.attrs["acquisition"] = "CORPD_FBK"


def test_fastmri_crop_padding_and_fallback_target(tmp_path: Path) -> None:
    for i in range(3):
        write_oversampled_h5(tmp_path / f"f{i}.h5", patient=f"p{i}")
    config = site("knee", "fastmri", tmp_path, max_slices_per_volume=None)
    sample = SiteDataset(config, "train")[0]
    assert sample["masked_kspace"].shape == (2, 64, 48)
    assert sample["target"].shape == (32, 32)  # RSS of the IFFT, centre-cropped to the recon matrix
    mask = sample["mask"][0, 0]
    assert mask[:4].sum() == 0 and mask[44:].sum() == 0  # zero-padded lines never count as sampled
    assert sample["max_value"] == pytest.approx(float(sample["target"].max()))  # no 'max' attribute


def test_bad_files_strict_and_skipped(tmp_path: Path) -> None:
    for i in range(3):
        write_oversampled_h5(tmp_path / f"f{i}.h5", patient=f"p{i}", nan_slice=1 if i == 0 else None)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    strict = site("s", "fastmri", tmp_path, split={"val_fraction": 0.0, "test_fraction": 0.0})
    with pytest.raises(DataError, match=f"^{tmp_path / 'broken.h5'}: "):
        build_site_datasets(strict)

    skipping = site("s", "fastmri", tmp_path, skip_bad_files=True, split={"val_fraction": 0.0, "test_fraction": 0.0})
    dataset = build_site_datasets(skipping)["train"]
    assert [p.name for p, _ in dataset.skipped] == ["broken.h5"]
    samples = [dataset[i] for i in range(len(dataset))]  # f0.h5 slice 1 holds NaN: f0 is dropped from then on
    assert samples[0]["fname"] == "f0.h5" and all(s["fname"] != "f0.h5" for s in samples[1:])
    assert [p.name for p, _ in dataset.skipped] == ["broken.h5", "f0.h5"]
    assert "slice 1: k-space contains NaN" in dataset.skipped[1][1]

    (tmp_path / "broken.h5").unlink()
    dataset = SiteDataset(strict, "train")
    nan_index = next(
        i
        for i, j in enumerate(dataset.indices)
        if dataset.reader.examples[j].path.name == "f0.h5" and dataset.reader.examples[j].slice_idx == 1
    )
    with pytest.raises(DataError, match=f"^{tmp_path / 'f0.h5'}: slice 1: k-space contains NaN"):
        dataset[nan_index]


def test_empty_and_missing_data_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^{tmp_path}: no IXI NIfTI files found"):
        build_site_datasets(site("e", "ixi", tmp_path))
    with pytest.raises(DataError, match=f"^{tmp_path / 'nope'}: data directory does not exist"):
        build_site_datasets(site("e", "ixi", tmp_path / "nope"))
