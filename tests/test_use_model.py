"""Using the federated model: export -> load, evaluate at a site, reconstruct real files, ONNX.

One short real training (the centralized baseline: one model over the three demo sites, in the run
directory format the federation writes) feeds every test; outputs are read back with h5py, nibabel and
pydicom and scored against the known fully sampled targets.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from client.evaluate import evaluate_sites, rows
from client.reconstruct import MaskSettings, Reconstructor, reconstruct_files, write_volume
from common.artifact import CARD_FILE, WEIGHTS_FILE, load_artifact
from common.coils import rss
from common.config import load_site_config
from common.data.loaders import load_site, make_loader
from common.errors import ConfigError, DataError, FedSenseError
from common.fft import center_crop, ifft2c_np
from common.masks import make_mask, seed_for
from common.metrics import psnr
from common.runconfig import RunConfig
from common.training import evaluate
from server import cli
from server.baseline import Baseline
from server.export import export_run

pytestmark = pytest.mark.slow

MASK = MaskSettings("equispaced", 4.0, 0.08, seed=5)


@pytest.fixture(scope="module")
def trained_run(small_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-round centralized run of a small U-Net over the three demo sites (checkpoints + metrics)."""
    run_dir = tmp_path_factory.mktemp("run") / "central"
    run = RunConfig.from_flat(
        {
            "name": "central",
            "num-server-rounds": 2,
            "model": "unet",
            "model-args": '{"chans": 8, "num_pool_layers": 2}',
            "local-steps": 5,
            "batch-size": 2,
            "learning-rate": 0.003,
            "sites": ",".join(map(str, small_sites)),
            "run-dir": str(run_dir),
            "num-samples": 0,
            "max-eval-slices": 6,
        }
    )
    Baseline("centralized", run).execute()
    return run_dir


@pytest.fixture(scope="module")
def artifact(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert cli.main(["export", str(trained_run), "--round", "last", "--out", str(out)]) == 0
    return out


def test_export_round_trips_exact_weights_without_pickle(trained_run: Path, artifact: Path, monkeypatch) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "round-0002.pt", weights_only=True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_artifact(artifact)
    monkeypatch.undo()
    state = loaded.model.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(state[key], value), key
    card = json.loads((artifact / CARD_FILE).read_text())
    assert card["round"] == 2 and card["architecture"] == {
        "name": "unet",
        "args": {"chans": 8, "num_pool_layers": 2},
        "num_parameters": card["architecture"]["num_parameters"],
    }
    sites = {s["name"]: s for s in card["sites"]}
    assert set(sites) == {"site-a", "site-b", "site-c"}
    assert sites["site-a"]["acquisition"]["coils"] == 16 and sites["site-b"]["acquisition"]["mask"] == "random"
    # The centralized run records its pooled training only, so per-site example counts are unknown here.
    assert all(s["num_examples"] is None and s["validation"]["psnr"] > 0 for s in sites.values())
    assert card["versions"]["flwr"] and card["versions"]["fedsense"]
    import hashlib

    assert card["weights"]["sha256"] == hashlib.sha256((artifact / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_a_changed_byte_or_a_foreign_card_is_refused(trained_run: Path, artifact: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(artifact, tampered)
    blob = bytearray((tampered / WEIGHTS_FILE).read_bytes())
    blob[-5] ^= 0x01  # one bit of one weight
    (tampered / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"SHA-256 .* does not match"):
        load_artifact(tampered)

    other = tmp_path / "round1"
    export_run(trained_run, other, which="1")
    mixed = tmp_path / "mixed"
    shutil.copytree(artifact, mixed)
    shutil.copy(other / WEIGHTS_FILE, mixed / WEIGHTS_FILE)
    with pytest.raises(DataError, match="does not match the model card"):
        load_artifact(mixed)
    # A card edited to match the foreign weights' hash still names another model.
    card = json.loads((mixed / CARD_FILE).read_text())
    card["weights"]["sha256"] = json.loads((other / CARD_FILE).read_text())["weights"]["sha256"]
    (mixed / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(DataError, match="belong to model"):
        load_artifact(mixed)


def test_round_best_reads_best_json(trained_run: Path, tmp_path: Path) -> None:
    path = trained_run / "best.json"
    recorded = path.read_bytes() if path.exists() else None  # the baseline keeps its own best.json
    path.unlink(missing_ok=True)
    try:
        with pytest.raises(FedSenseError, match=r"run has no best\.json; use --round last\|N"):
            export_run(trained_run, tmp_path / "none", which="best")
        best = {"round": 1, "metric": "psnr", "value": 30.0, "checkpoint": "checkpoints/round-0001.pt"}
        path.write_text(json.dumps(best))
        card = export_run(trained_run, tmp_path / "best", which="best")
    finally:
        path.unlink(missing_ok=True)
        if recorded is not None:
            path.write_bytes(recorded)
    assert card.round == 1 and card.selection == best and card.round_selection == "best"


def test_evaluate_equals_training_evaluate(small_sites: list[Path], artifact: Path, capsys) -> None:
    site = small_sites[1]
    loaded = load_artifact(artifact)
    _, datasets = load_site(str(site))
    expected_model = evaluate(loaded.model, make_loader(datasets["test"], 2, shuffle=False, seed=0)).metrics
    expected_zf = evaluate(None, make_loader(datasets["test"], 2, shuffle=False, seed=0)).metrics

    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(artifact),
                "--sites",
                str(site),
                "--split",
                "test",
                "--batch-size",
                "2",
                "--format",
                "json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    table = {(r["site"], r["method"]): r for r in json.loads(capsys.readouterr().out)}
    for method, expected in (("model", expected_model), ("zero-filled", expected_zf)):
        for metric in ("psnr", "ssim", "nmse"):
            assert table[("site-b", method)][metric] == pytest.approx(expected[metric], rel=1e-6)
    gain = table[("site-b", "model")]["gain_psnr"]
    assert gain == pytest.approx(expected_model["psnr"] - expected_zf["psnr"], rel=1e-6)
    assert table[("all sites", "model")]["psnr"] == pytest.approx(expected_model["psnr"], rel=1e-6)


def test_evaluate_cs_baseline_scores_every_site(
    small_sites: list[Path], artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.evaluate as evaluate_module

    advanced: list[tuple[str, float]] = []  # (the bar's description, slices) per advance

    class Recording(evaluate_module.Progress):  # type: ignore[misc,name-defined]
        def advance(self, task, advance=1):  # type: ignore[no-untyped-def]
            advanced.append((self.tasks[0].description, advance))
            super().advance(task, advance)

    monkeypatch.setattr(evaluate_module, "Progress", Recording)
    loaded = load_artifact(artifact)
    scores = evaluate_sites(
        loaded.model, small_sites[2:], split="test", baselines=["zero-filled", "cs"], batch_size=4, max_slices=4
    )
    table = {(r["site"], r["method"]): r for r in rows(scores)}
    # Classical CS is a real baseline: better than zero-filled on this poisson-disc site.
    assert table[("site-c", "cs")]["psnr"] > table[("site-c", "zero-filled")]["psnr"]
    # The bar moves within a CS batch (after every FISTA iteration), by the batch's slices in all.
    cs = [amount for description, amount in advanced if description == "site-c · cs"]
    assert len(cs) == 50 and sum(cs) == pytest.approx(4.0)


def _fastmri_file(small_sites: list[Path]) -> Path:
    _, datasets = load_site(str(small_sites[0]))
    test_file = datasets["test"].reader.examples[datasets["test"].indices[0]].path
    return test_file


def test_reconstruct_fastmri_h5_beats_zero_filled_and_reads_back(
    small_sites: list[Path], artifact: Path, tmp_path: Path
) -> None:
    source = _fastmri_file(small_sites)
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "reconstruct",
                "--model",
                str(artifact),
                str(source),
                "--out",
                str(out),
                "--mask",
                "equispaced",
                "--acceleration",
                "4",
                "--center-fraction",
                "0.08",
                "--seed",
                "5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with h5py.File(source, "r") as f:
        kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
    with h5py.File(out / source.name, "r") as f:
        recon = f["reconstruction"][()]
    assert recon.shape == target.shape and recon.dtype == np.float32
    zero = []
    for k, slice_k in enumerate(kspace):  # the same per-slice masks, computed independently
        mask = make_mask("equispaced", slice_k.shape[-2:], 4.0, 0.08, seed_for(5, source.name, k)).mask
        zero.append(center_crop(rss(ifft2c_np(slice_k * mask), dim=0), target.shape[-2:]))
    gain = psnr(target, recon) - psnr(target, np.stack(zero))
    assert gain > 0.0, gain

    # The fastMRI test-set layout (undersampled k-space + its 'mask') gives the same reconstruction.
    masks = np.stack(
        [
            make_mask("equispaced", kspace.shape[-2:], 4.0, 0.08, seed_for(5, source.name, k)).mask
            for k in range(len(kspace))
        ]
    )
    assert np.all(masks == masks[:, :1, :])  # column masks
    undersampled = tmp_path / "in" / "same_mask_file.h5"
    undersampled.parent.mkdir()
    with h5py.File(undersampled, "w") as f:
        f["kspace"] = (kspace * masks[0]).astype(np.complex64)
        f["mask"] = masks[0, 0]
    with h5py.File(source, "r") as f, h5py.File(undersampled, "a") as g:
        g["ismrmrd_header"] = f["ismrmrd_header"][()]
    loaded = load_artifact(artifact)
    written = reconstruct_files(
        Reconstructor(loaded, device=torch.device("cpu")), [undersampled], tmp_path / "out2", "h5"
    )
    with h5py.File(written[0], "r") as f:
        first = f["reconstruction"][0]
    slice0 = MaskSettings("equispaced", 4.0, 0.08, seed=5)
    same = reconstruct_files(
        Reconstructor(loaded, device=torch.device("cpu"), mask=slice0), [source], tmp_path / "o3", "h5"
    )
    with h5py.File(same[0], "r") as f:
        reference = f["reconstruction"][0]
    if np.array_equal(
        masks[0], make_mask("equispaced", kspace.shape[-2:], 4.0, 0.08, seed_for(5, source.name, 0)).mask
    ):
        np.testing.assert_allclose(first, reference, rtol=1e-4, atol=1e-6 * reference.max())

    dicom_dir = reconstruct_files(
        Reconstructor(loaded, device=torch.device("cpu"), mask=MASK), [source], tmp_path / "dcm", "dicom"
    )[0]
    files = sorted(dicom_dir.glob("*.dcm"))
    assert len(files) == len(kspace)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and loaded.card.id in ds.SeriesDescription
    pixels = ds.pixel_array * float(ds.RescaleSlope)
    np.testing.assert_allclose(pixels, np.maximum(recon[0], 0), atol=float(ds.RescaleSlope))


def test_reconstruct_nifti_keeps_geometry_and_beats_zero_filled(
    small_sites: list[Path], artifact: Path, tmp_path: Path
) -> None:
    site = load_site_config(small_sites[1])
    _, datasets = load_site(str(small_sites[1]))
    source = datasets["test"].reader.examples[datasets["test"].indices[0]].path
    loaded = load_artifact(artifact)
    reconstructor = Reconstructor(loaded, device=torch.device("cpu"), site=site)
    volume = reconstructor.volume(source, reconstructor.check(source))
    written = [write_volume(volume, tmp_path, "nifti", loaded.card)]
    zero = reconstruct_files(
        Reconstructor(loaded, device=torch.device("cpu"), site=site, zero_filled_only=True),
        [source],
        tmp_path / "zero",
        None,
    )
    original = nib.load(source)
    recon, zf = nib.load(written[0]), nib.load(zero[0])
    assert recon.shape == original.shape and np.allclose(recon.affine, original.affine)
    assert recon.header.get_zooms() == original.header.get_zooms()
    target = np.asarray(original.dataobj, dtype=np.float32)
    gain = psnr(target, recon.get_fdata(dtype=np.float32)) - psnr(target, zf.get_fdata(dtype=np.float32))
    assert gain > 0.5, gain

    series = write_volume(volume, tmp_path, "dicom", loaded.card)
    files = sorted(series.glob("*.dcm"), key=lambda p: pydicom.dcmread(p).InstanceNumber)
    assert len(files) == original.shape[2]
    first, second = (pydicom.dcmread(p) for p in files[:2])
    spacing = np.linalg.norm(np.subtract(second.ImagePositionPatient, first.ImagePositionPatient))
    assert spacing == pytest.approx(float(original.header.get_zooms()[2]), rel=1e-3)


def test_reconstruct_refuses_bad_inputs_and_writes_nothing(
    small_sites: list[Path], artifact: Path, tmp_path: Path
) -> None:
    source = _fastmri_file(small_sites)
    with h5py.File(source, "r") as f:
        kspace, header = f["kspace"][()], f["ismrmrd_header"][()]
    cases = {}
    cases["no_kspace.h5"] = {"reconstruction_rss": np.zeros((2, 8, 8), np.float32)}
    cases["two_coils.h5"] = {"kspace": kspace[:, :2]}
    nan = kspace.copy()
    nan[1, 0, 3, 3] = np.nan
    cases["nan.h5"] = {"kspace": nan}
    for name, datasets in cases.items():
        with h5py.File(tmp_path / name, "w") as f:
            for key, value in datasets.items():
                f[key] = value
            f["ismrmrd_header"] = header
    loaded = load_artifact(artifact)
    out = tmp_path / "out"
    recon = Reconstructor(loaded, device=torch.device("cpu"), mask=MASK)
    for name, message in (
        ("no_kspace.h5", "missing dataset 'kspace'"),
        ("two_coils.h5", "has 2 coil"),
        ("nan.h5", "NaN"),
    ):
        with pytest.raises(DataError, match=message) as info:
            reconstruct_files(recon, [tmp_path / name], out, "h5")
        assert str(tmp_path / name) in str(info.value)
    untrained = Reconstructor(loaded, device=torch.device("cpu"), mask=MaskSettings("radial", 8.0, 0.08))
    with pytest.raises(DataError, match="not a mask model"):
        reconstruct_files(untrained, [source], out, "h5")
    with pytest.raises(ConfigError, match="needs --site-config"):
        reconstruct_files(recon, [load_site(str(small_sites[1]))[1]["test"].reader.examples[0].path], out, None)
    leftovers = list(out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


def test_onnx_export_matches_pytorch(
    artifact: Path, small_sites: list[Path], trained_run: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    out = tmp_path / "with-onnx"
    site = str(small_sites[1])  # the first simulated site (8 coils, 64²) sets the export shape
    assert (
        cli.main(["export", str(trained_run), "--round", "last", "--out", str(out), "--onnx", "--site-config", site])
        == 0
    )
    card = json.loads((out / CARD_FILE).read_text())
    loaded = load_artifact(out)
    _, datasets = load_site(site)
    sample = datasets["val"][0]
    shape = tuple(card["onnx"]["input_shape"])
    assert shape[1:4] == tuple(sample["masked_kspace"].shape)
    session = ort.InferenceSession(str(out / "model.onnx"))
    kspace = torch.view_as_real(sample["masked_kspace"][None]).numpy()
    onnx_out = session.run(None, {"kspace": kspace})[0]
    with torch.no_grad():
        expected = loaded.model(sample["masked_kspace"][None], sample["mask"][None], sample["sens_maps"][None]).numpy()
    assert np.max(np.abs(onnx_out - expected)) < 1e-3 * max(1.0, float(np.abs(expected).max()))
