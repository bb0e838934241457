"""Readers: real formats round-trip, slices are read one at a time, bad files are named or skipped."""

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from common.coils import rss
from common.data.readers import (
    BratsReader,
    FastMRIReader,
    IXIReader,
    find_brats_files,
    find_fastmri_files,
    find_ixi_files,
    parse_brats_name,
    parse_ismrmrd_header,
    parse_ixi_name,
)
from common.errors import DataError
from common.fft import center_crop, ifft2c_np

NS = "http://www.ismrm.org/ISMRMRD"


def header(enc: tuple[int, int], recon: tuple[int, int], centre: int, maximum: int) -> bytes:
    return f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="{NS}">
 <acquisitionSystemInformation><systemFieldStrength_T>2.89</systemFieldStrength_T></acquisitionSystemInformation>
 <encoding>
  <encodedSpace><matrixSize><x>{enc[0]}</x><y>{enc[1]}</y><z>1</z></matrixSize></encodedSpace>
  <reconSpace><matrixSize><x>{recon[0]}</x><y>{recon[1]}</y><z>1</z></matrixSize></reconSpace>
  <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{maximum}</maximum>
   <center>{centre}</center></kspace_encoding_step_1></encodingLimits>
 </encoding>
</ismrmrdHeader>""".encode()


def write_h5(
    path: Path,
    slices: int = 4,
    coils: int | None = 3,
    shape: tuple[int, int] = (64, 48),
    recon: tuple[int, int] = (32, 32),
    patient: str = "p1",
    acquisition: str = "AXT2",
    seed: int = 0,
) -> np.ndarray:
    """A fastMRI-layout file with readout oversampling (H = 2 x recon) and a zero-padded phase range."""
    rng = np.random.default_rng(seed)
    lead = (slices,) if coils is None else (slices, coils)
    kspace = (rng.standard_normal((*lead, *shape)) + 1j * rng.standard_normal((*lead, *shape))).astype(np.complex64)
    with h5py.File(path, "w") as f:
        f["kspace"] = kspace
        if coils is not None:
            f["reconstruction_rss"] = center_crop(rss(ifft2c_np(kspace), dim=1), recon).astype(np.float32)
            f.attrs["max"] = float(f["reconstruction_rss"][()].max())
        f["ismrmrd_header"] = header(shape, recon, centre=shape[1] // 2 - 2, maximum=shape[1] - 9)
        f.attrs["acquisition"] = acquisition
        f.attrs["patient_id"] = patient
    return kspace


def ras_volume(shape: tuple[int, int, int] = (24, 20, 10), empty: int = 2, seed: int = 0) -> np.ndarray:
    """An asymmetric RAS volume whose first and last ``empty`` axial slices hold nothing."""
    rng = np.random.default_rng(seed)
    volume = np.zeros(shape, np.float32)
    volume[3:-3, 2:-5, empty:-empty] = rng.uniform(100, 1000, (shape[0] - 6, shape[1] - 7, shape[2] - 2 * empty))
    return volume


def write_nifti(path: Path, volume: np.ndarray, axcodes: tuple[str, str, str] = ("R", "A", "S")) -> Path:
    img = nib.Nifti1Image(volume, np.diag([1.5, 1.5, 4.0, 1.0]))
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(axcodes)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img.as_reoriented(transform), path)
    return path


def axial_display(volume: np.ndarray, k: int) -> np.ndarray:
    """Expected reader output for RAS slice k: anterior up, patient's right on the left."""
    return volume[:, :, k].T[::-1, ::-1]


# --------------------------------------------------------------------------- fastMRI


def test_fastmri_multicoil_round_trip(tmp_path: Path) -> None:
    kspace = write_h5(tmp_path / "file_brain_AXT2_1.h5")
    reader = FastMRIReader(tmp_path, find_fastmri_files(tmp_path))
    assert len(reader) == 4 and reader.subjects == ["p1"]
    assert {ex.contrast for ex in reader.examples} == {"AXT2"}
    data, meta = reader.read_slice(2)
    np.testing.assert_array_equal(data, kspace[2])
    assert data.dtype == np.complex64 and meta.kind == "kspace"
    assert meta.recon_size == (32, 32) and meta.target.shape == (32, 32)
    np.testing.assert_allclose(meta.target, center_crop(rss(ifft2c_np(kspace[2]), dim=0), (32, 32)), rtol=1e-5)
    assert meta.volume_max == pytest.approx(float(center_crop(rss(ifft2c_np(kspace), dim=1), (32, 32)).max()))
    # encodingLimits: centre 22, last line 39 -> lines [2, 42) were acquired, the rest is zero padding.
    assert meta.acquired_columns == (2, 42)


def test_fastmri_singlecoil_without_reconstruction(tmp_path: Path) -> None:
    kspace = write_h5(tmp_path / "sc.h5", coils=None)
    reader = FastMRIReader(tmp_path, find_fastmri_files(tmp_path))
    data, meta = reader.read_slice(0)
    assert data.shape == (1, 64, 48)
    np.testing.assert_array_equal(data[0], kspace[0])
    assert meta.target is None and meta.volume_max is None and meta.recon_size == (32, 32)


def test_fastmri_contrast_filter(tmp_path: Path) -> None:
    write_h5(tmp_path / "a.h5", acquisition="AXT2", patient="p1")
    write_h5(tmp_path / "b.h5", acquisition="AXFLAIR", patient="p2")
    reader = FastMRIReader(tmp_path, find_fastmri_files(tmp_path), contrasts=["axflair"])
    assert reader.subjects == ["p2"]


def test_ismrmrd_header_parsing() -> None:
    geometry = parse_ismrmrd_header(header((640, 368), (320, 320), centre=184, maximum=367))
    assert geometry.encoded_size == (640, 368, 1) and geometry.recon_size == (320, 320, 1)
    assert geometry.acquired_columns == (0, 368) and geometry.field_strength_t == pytest.approx(2.89)


def test_h5_reads_only_the_requested_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_h5(tmp_path / "a.h5", slices=6)
    reader = FastMRIReader(tmp_path, find_fastmri_files(tmp_path))
    requests: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def recording(self: h5py.Dataset, key: object) -> object:
        requests.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    reader.read_slice(3)
    assert sorted(requests) == [("/kspace", 3), ("/reconstruction_rss", 3)]


# --------------------------------------------------------------------------- NIfTI


def test_file_name_parsing() -> None:
    assert parse_brats_name("BraTS20_Training_001_t1ce.nii.gz") == ("BraTS20_Training_001", "t1ce")
    assert parse_brats_name("BraTS20_Validation_012_flair.nii") == ("BraTS20_Validation_012", "flair")
    assert parse_brats_name("BraTS2021_00000_t2.nii.gz") == ("BraTS2021_00000", "t2")
    assert parse_brats_name("BraTS-GLI-00000-001-t2f.nii.gz") == ("BraTS-GLI-00000", "flair")
    assert parse_brats_name("BraTS-MEN-00012-000-t1c.nii.gz") == ("BraTS-MEN-00012", "t1ce")
    assert parse_brats_name("BraTS20_Training_001_seg.nii.gz") is None
    assert parse_brats_name("BraTS-GLI-00000-000-seg.nii.gz") is None
    assert parse_ixi_name("IXI002-Guys-0828-T1.nii.gz") == ("IXI002", "Guys", "T1")
    assert parse_ixi_name("IXI012-HH-1211-PD.nii.gz") == ("IXI012", "HH", "PD")
    assert parse_ixi_name("IXI002-Guys-0828-MRA.nii.gz") is None


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R"), ("A", "I", "L")])
def test_nifti_any_orientation_reads_the_same_axial_slice(tmp_path: Path, axcodes: tuple[str, str, str]) -> None:
    volume = ras_volume()
    write_nifti(tmp_path / "s1" / "BraTS20_Training_001_t1.nii.gz", volume, axcodes)
    reader = BratsReader(tmp_path, find_brats_files(tmp_path))
    slices = {ex.slice_idx for ex in reader.examples}
    nz = volume.shape[2]
    assert len(slices) == nz - 4  # the two empty slices at each end are skipped
    for i, example in enumerate(reader.examples):
        image, meta = reader.read_slice(i)
        k = example.slice_idx if "I" not in axcodes else nz - 1 - example.slice_idx
        np.testing.assert_allclose(image, axial_display(volume, k), rtol=1e-6)
        assert meta.kind == "image" and meta.volume_max == pytest.approx(float(volume.max()))


def test_nifti_reads_only_one_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_nifti(tmp_path / "IXI002-Guys-0828-T2.nii.gz", ras_volume(), ("P", "S", "R"))
    reader = IXIReader(tmp_path, find_ixi_files(tmp_path))
    requests: list[object] = []
    original = nib.arrayproxy.ArrayProxy.__getitem__

    def recording(self: nib.arrayproxy.ArrayProxy, slicer: object) -> np.ndarray:
        requests.append(slicer)
        return original(self, slicer)

    def whole_volume(self: nib.arrayproxy.ArrayProxy, *args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the whole volume was read")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__", recording)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", whole_volume)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", whole_volume)
    example = reader.examples[1]
    reader.read_slice(1)
    assert requests == [(slice(None), example.slice_idx, slice(None))]  # axial axis is 1 in PSR order


def test_ixi_hospital_and_contrast_filters(tmp_path: Path) -> None:
    for name in (
        "IXI002-Guys-0828-T1",
        "IXI002-Guys-0828-PD",
        "IXI012-HH-1211-T1",
        "IXI013-IOP-0001-T1",
        "IXI002-Guys-0828-MRA",
    ):
        write_nifti(tmp_path / f"{name}.nii.gz", ras_volume())
    guys = find_ixi_files(tmp_path, contrasts=["T1"], hospital="Guys")
    assert [f.path.name for f in guys] == ["IXI002-Guys-0828-T1.nii.gz"]
    assert {f.subject for f in find_ixi_files(tmp_path)} == {"IXI002", "IXI012", "IXI013"}
    assert len(find_ixi_files(tmp_path)) == 4  # MRA is not a T1/T2/PD volume


def test_max_slices_keeps_central_slices(tmp_path: Path) -> None:
    write_nifti(tmp_path / "IXI002-Guys-0828-T1.nii.gz", ras_volume((24, 20, 14)))
    reader = IXIReader(tmp_path, find_ixi_files(tmp_path), max_slices_per_volume=4)
    assert [ex.slice_idx for ex in reader.examples] == [5, 6, 7, 8]


# --------------------------------------------------------------------------- bad input


def corrupt_h5(path: Path) -> None:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)


def truncated_h5(path: Path) -> None:
    write_h5(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def missing_kspace(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["reconstruction_rss"] = np.zeros((2, 8, 8), np.float32)


def wrong_ndim(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["kspace"] = np.zeros((8, 8), np.complex64)


def real_kspace(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["kspace"] = np.zeros((2, 2, 8, 8), np.float32)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (corrupt_h5, "not a readable HDF5 file"),
        (truncated_h5, "not a readable HDF5 file"),
        (missing_kspace, "missing dataset 'kspace'"),
        (wrong_ndim, "2 dimensions"),
        (real_kspace, "expected complex"),
    ],
)
def test_bad_h5_names_the_file_and_skip_mode_counts_it(tmp_path: Path, make, reason: str) -> None:
    write_h5(tmp_path / "good.h5")
    bad = tmp_path / "bad.h5"
    make(bad)
    with pytest.raises(DataError) as info:
        FastMRIReader(tmp_path, find_fastmri_files(tmp_path))
    assert str(info.value).startswith(f"{bad}: ") and reason in str(info.value)
    reader = FastMRIReader(tmp_path, find_fastmri_files(tmp_path), skip_bad_files=True)
    assert [p for p, _ in reader.skipped] == [bad]
    assert {ex.path for ex in reader.examples} == {tmp_path / "good.h5"}


def test_nan_in_kspace_is_a_data_error_at_read_time(tmp_path: Path) -> None:
    kspace = write_h5(tmp_path / "nan.h5")
    with h5py.File(tmp_path / "nan.h5", "r+") as f:
        kspace[1, 0, 5, 5] = np.nan
        f["kspace"][1] = kspace[1]
    reader = FastMRIReader(tmp_path, find_fastmri_files(tmp_path))
    reader.read_slice(0)
    with pytest.raises(DataError, match=r"nan\.h5: slice 1: k-space contains NaN"):
        reader.read_slice(1)


def garbage_nifti(path: Path) -> None:
    path.write_bytes(b"this is not a NIfTI file at all" * 20)


def truncated_nifti(path: Path) -> None:
    write_nifti(path, ras_volume())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def four_d_nifti(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 3), np.float32), np.eye(4)), path)


def nan_nifti(path: Path) -> None:
    volume = ras_volume()
    volume[10, 10, 4] = np.nan
    write_nifti(path, volume)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (garbage_nifti, "unreadable NIfTI"),
        (truncated_nifti, "unreadable NIfTI data"),
        (four_d_nifti, "expected a 3-D volume"),
        (nan_nifti, "NaN or Inf"),
    ],
)
def test_bad_nifti_names_the_file_and_skip_mode_counts_it(tmp_path: Path, make, reason: str) -> None:
    write_nifti(tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz", ras_volume())
    bad = tmp_path / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    bad.parent.mkdir()
    make(bad)
    with pytest.raises(DataError) as info:
        BratsReader(tmp_path, find_brats_files(tmp_path))
    assert str(info.value).startswith(f"{bad}: ") and reason in str(info.value)
    reader = BratsReader(tmp_path, find_brats_files(tmp_path), skip_bad_files=True)
    assert [p for p, _ in reader.skipped] == [bad]
    assert reader.subjects == ["BraTS20_Training_001"]


def test_empty_directory_and_all_bad(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^{tmp_path}: no BraTS NIfTI files found"):
        BratsReader(tmp_path, find_brats_files(tmp_path))
    corrupt_h5(tmp_path / "x.h5")
    with pytest.raises(DataError, match=f"^{tmp_path}: no usable slices in 1 fastMRI HDF5 file.*1 skipped"):
        FastMRIReader(tmp_path, find_fastmri_files(tmp_path), skip_bad_files=True)
