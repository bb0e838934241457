"""DICOM output: every written file passes dicom3tools' ``dciodvfy`` and reads back with the input's geometry.

The series come from real demo inputs (a fastMRI h5 with an ISMRMRD header, a BraTS NIfTI) through the
real ``reconstruct`` path (zero-filled, so no training is needed). Geometry is checked against what the
input itself says, computed independently: FOV / matrix and the slab thickness from the XML header, and
the NIfTI voxel grid's corners through nibabel's affine, compared with highdicom's volume affine.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from client.cli import main as client_main
from client.dicom import PatientIdPolicy, Pseudonymiser
from client.reconstruct import MaskSettings, Reconstructor, reconstruct_files
from common.artifact import LoadedModel, ModelCard
from common.config import load_site_config
from common.errors import ConfigError, DataError
from tests.conftest import write_small_sites

NS = {"ns": "http://www.ismrm.org/ISMRMRD"}
MASK = MaskSettings("equispaced", 4.0, 0.08)


def _card() -> ModelCard:
    return ModelCard(
        id="test-model-0001",
        created="2026-01-01T00:00:00Z",
        architecture={"name": "unet", "args": {}, "num_parameters": 0},
        run_name="t",
        run_config={},
        round=1,
        round_selection="last",
        rounds_completed=1,
        sites=[],
        versions={},
        weights={"sha256": "0" * 64},
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A fastMRI h5 and a BraTS NIfTI from the demo generator, and the BraTS site's config."""
    root = tmp_path_factory.mktemp("dicom-sites")
    paths = write_small_sites(root, ("site-a", "site-b"), size=64, slices=4)
    h5 = sorted((root / "data" / "site-a").glob("*.h5"))[0]
    nifti = sorted((root / "data" / "site-b").rglob("*flair*.nii.gz"))[0]
    return h5, nifti, paths[1]


def _reconstruct(
    inputs: list[Path], out: Path, site: Path | None = None, policy: PatientIdPolicy | None = None
) -> list[Path]:
    loaded = LoadedModel(torch.nn.Identity(), _card(), out)
    config = load_site_config(site) if site else None
    recon = Reconstructor(loaded, device=torch.device("cpu"), site=config, mask=MASK, zero_filled_only=True)
    return reconstruct_files(recon, inputs, out, "dicom", patient_ids=policy)


def _series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_every_written_file_passes_dciodvfy_with_header_geometry(demo: tuple[Path, Path, Path], tmp_path: Path) -> None:
    assert shutil.which("dciodvfy"), "dciodvfy not found: apt-get install dicom3tools (.ci/run does)"
    h5, nifti, site = demo
    fastmri_dir = _reconstruct([h5], tmp_path / "fastmri")[0]
    nifti_dir = _reconstruct([nifti], tmp_path / "nifti", site=site)[0]
    files = sorted(fastmri_dir.glob("*.dcm")) + sorted(nifti_dir.glob("*.dcm"))
    assert files
    for path in files:
        assert _dciodvfy_errors(path) == [], path

    # fastMRI: the header's reconstructed FOV / matrix, its slab thickness, its field strength.
    with h5py.File(h5, "r") as f:
        root = ET.fromstring(f["ismrmrd_header"][()])
        slices = f["kspace"].shape[0]
        patient = f.attrs["patient_id"]
    fov = [float(root.find(f"./ns:encoding/ns:reconSpace/ns:fieldOfView_mm/ns:{a}", NS).text) for a in "xyz"]
    matrix = [int(root.find(f"./ns:encoding/ns:reconSpace/ns:matrixSize/ns:{a}", NS).text) for a in "xyz"]
    field = float(root.find("./ns:acquisitionSystemInformation/ns:systemFieldStrength_T", NS).text)
    series = _series(fastmri_dir)
    assert len(series) == slices
    first = series[0]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([fov[0] / matrix[0], fov[1] / matrix[1]])
    assert float(first.SliceThickness) == pytest.approx(fov[2] / matrix[2])
    assert float(first.MagneticFieldStrength) == pytest.approx(field)
    assert (
        list(first.ImageType) == ["DERIVED", "SECONDARY", "OTHER"] and "test-model-0001" in first.DerivationDescription
    )
    for name in ("PatientBirthDate", "StudyID", "AccessionNumber", "EchoTime", "ReferringPhysicianName"):
        assert name in first, name
    normal = np.cross(
        np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    )
    along = [float(np.dot(np.array(d.ImagePositionPatient, float), normal)) for d in series]
    np.testing.assert_allclose(np.diff(along), fov[2] / matrix[2], rtol=1e-6)
    assert {d.PatientID for d in series} == {first.PatientID}
    assert h5.stem not in first.PatientID and str(patient) not in first.PatientID and first.PatientID.startswith("FS")

    volume = hd.get_volume_from_series(series)
    assert volume.spacing == pytest.approx((fov[2] / matrix[2], fov[0] / matrix[0], fov[1] / matrix[1]))

    # NIfTI: the voxel grid's corners in patient space (nibabel's affine, RAS -> LPS) are highdicom's corners.
    image = nib.load(nifti)
    dicom_volume = hd.get_volume_from_series(_series(nifti_dir))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])

    def corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        points = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in shape])]).T
        return np.array(sorted(map(tuple, np.round((affine @ points)[:3].T, 3))))

    np.testing.assert_allclose(
        corners(dicom_volume.affine, dicom_volume.spatial_shape),
        corners(lps @ image.affine, image.shape[:3]),
        atol=1e-2,
    )
    assert sorted(dicom_volume.spacing) == pytest.approx(sorted(float(z) for z in image.header.get_zooms()[:3]))
    assert float(_series(nifti_dir)[0].MagneticFieldStrength) == load_site_config(site).scanner.field_strength_t


def test_patient_id_policies_never_write_the_input_name() -> None:
    salt = b"0123456789abcdef-site-secret"
    hashed = Pseudonymiser(PatientIdPolicy(mode="salted-hash", salt=salt))
    again = Pseudonymiser(PatientIdPolicy(mode="salted-hash", salt=salt))
    other = Pseudonymiser(PatientIdPolicy(mode="salted-hash", salt=b"another-secret-of-16+"))
    assert hashed("patient-7") == again("patient-7") != other("patient-7")
    assert hashed("patient-7") != hashed("patient-8") and "patient" not in hashed("patient-7")
    assert len(hashed("patient-7")) <= 64
    random = Pseudonymiser(PatientIdPolicy())
    assert random("a") == random("a") != random("b")
    assert random("a") != Pseudonymiser(PatientIdPolicy())("a")
    assert Pseudonymiser(PatientIdPolicy.from_options("PACS-123", None))("x") == "PACS-123"


def test_patient_id_options_are_validated_naming_the_option(tmp_path: Path) -> None:
    short = tmp_path / "salt"
    short.write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"salt: --pseudonym-salt-file: .*at least 16 bytes"):
        PatientIdPolicy.from_options(None, short)
    with pytest.raises(ConfigError, match=r"--pseudonym-salt-file: cannot read"):
        PatientIdPolicy.from_options(None, tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"--patient-id: must be 1-64 printable"):
        PatientIdPolicy.from_options("a\\b", None)
    with pytest.raises(ConfigError, match="at most one"):
        PatientIdPolicy.from_options("x", short)
    long_salt = tmp_path / "salt2"
    long_salt.write_bytes(b"0123456789abcdef\n")
    assert PatientIdPolicy.from_options(None, long_salt).mode == "salted-hash"


@pytest.mark.slow
def test_salted_pseudonym_is_stable_and_header_without_geometry_is_refused(
    demo: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    h5 = demo[0]
    salt = tmp_path / "salt"
    salt.write_bytes(b"a-site-secret-of-enough-bytes")
    policy = PatientIdPolicy.from_options(None, salt)
    first = _series(_reconstruct([h5], tmp_path / "one", policy=policy)[0])[0].PatientID
    second = _series(_reconstruct([h5], tmp_path / "two", policy=policy)[0])[0].PatientID
    assert first == second and first.startswith("FS")

    bare = tmp_path / "bare.h5"
    with h5py.File(h5, "r") as f, h5py.File(bare, "w") as g:
        g["kspace"] = f["kspace"][()]
        root = ET.fromstring(f["ismrmrd_header"][()])
    recon_space = root.find("./ns:encoding/ns:reconSpace", NS)
    recon_space.remove(recon_space.find("./ns:fieldOfView_mm", NS))
    with h5py.File(bare, "a") as g:
        g["ismrmrd_header"] = ET.tostring(root)
    with pytest.raises(DataError, match=r"bare.h5: ismrmrd_header: encoding/reconSpace"):
        _reconstruct([bare], tmp_path / "three")
    assert not (tmp_path / "three" / "bare").exists()


def test_cli_checks_patient_options_before_anything_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    salt = tmp_path / "salt"
    salt.write_bytes(b"0123456789abcdef")
    code = client_main(
        [
            "reconstruct",
            "--model",
            str(tmp_path / "no-model"),
            str(tmp_path / "x.h5"),
            "--out",
            str(tmp_path / "o"),
            "--patient-id",
            "P1",
            "--pseudonym-salt-file",
            str(salt),
        ]
    )
    assert code == 2 and "--patient-id, --pseudonym-salt-file: give at most one" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
