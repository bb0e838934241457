"""``fedsense export`` on a federated run's directory: the card's provenance comes from the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.artifact import CARD_FILE, load_artifact
from common.errors import ConfigError, DataError, FedSenseError, OutputError
from common.models import build_model
from common.onnx_export import export_onnx
from server.export import export_run
from server.store import RunDir

ARGS = {"chans": 4, "num_pool_layers": 2}


def _federated_run(path: Path, **config: object) -> tuple[RunDir, dict[str, torch.Tensor]]:
    """Two rounds of a two-site run as the federation writes it: per-site train/evaluate records, checkpoints."""
    run = RunDir(path)
    run.init(
        {
            "name": "fed",
            "num-server-rounds": 2,
            "model": "unet",
            "model-args": json.dumps(ARGS),
            "sites": "",
            "strategy": "fedavg",
            **config,
        },
        resume=False,
    )
    torch.manual_seed(0)
    state = {}
    for rnd in (1, 2):
        model = build_model("unet", **ARGS)
        state[rnd] = model.state_dict()
        records = []
        for site, n in (("site-a", 12), ("site-b", 30)):
            records.append(
                {
                    "run": "fed",
                    "round": rnd,
                    "phase": "train",
                    "site": site,
                    "time": 1.0,
                    "num_examples": n,
                    "metrics": {"loss": 0.1},
                }
            )
            records.append(
                {
                    "run": "fed",
                    "round": rnd,
                    "phase": "evaluate",
                    "site": site,
                    "time": 1.0,
                    "num_examples": 4,
                    "metrics": {"psnr": 25.0 + rnd + (site == "site-b"), "ssim": 0.8},
                }
            )
        records.append(
            {
                "run": "fed",
                "round": rnd,
                "phase": "evaluate",
                "site": "__global__",
                "time": 1.0,
                "num_examples": 8,
                "metrics": {"psnr": 26.0 + rnd},
            }
        )
        run.append_metrics(records)
        run.save_checkpoint(rnd, state[rnd], {"name": "fed"})
    return run, state[1]


def test_card_holds_each_sites_examples_and_validation_at_the_round(tmp_path: Path) -> None:
    run, round1 = _federated_run(tmp_path / "run")
    card = export_run(run.path, tmp_path / "model", which="1")
    assert card.round == 1 and card.rounds_completed == 2 and card.rounds_planned == 2
    sites = {s.name: s for s in card.sites}
    assert sites["site-a"].num_examples == 12 and sites["site-b"].num_examples == 30
    assert sites["site-b"].validation["psnr"] == 27.0 and card.global_validation["psnr"] == 27.0
    loaded = load_artifact(tmp_path / "model")
    for key, value in round1.items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    with pytest.raises(OutputError, match="already exists and is not empty; pass --overwrite"):
        export_run(run.path, tmp_path / "model", which="last")
    assert export_run(run.path, tmp_path / "model", which="last", overwrite=True).round == 2
    assert load_artifact(tmp_path / "model").card.round == 2
    with pytest.raises(OutputError, match="contains the input"):
        export_run(run.path, tmp_path, which="last", overwrite=True)
    with pytest.raises(FedSenseError, match="no checkpoint for round 7"):
        export_run(run.path, tmp_path / "seven", which="7")
    assert not (tmp_path / "seven").exists()


def test_local_baseline_and_foreign_architecture_are_refused(tmp_path: Path) -> None:
    run, _ = _federated_run(tmp_path / "local", baseline="local")
    with pytest.raises(FedSenseError, match="one model per site"):
        export_run(run.path, tmp_path / "m1", which="last")
    config = json.loads(run.config_path.read_text())
    config.pop("baseline")
    config["model-args"] = json.dumps({"chans": 8, "num_pool_layers": 2})
    run.config_path.write_text(json.dumps(config))
    with pytest.raises(DataError, match="weights do not fit unet"):
        export_run(run.path, tmp_path / "m2", which="last")
    assert not (tmp_path / "m2").exists()


def test_card_must_be_valid(tmp_path: Path) -> None:
    run, _ = _federated_run(tmp_path / "run")
    export_run(run.path, tmp_path / "model", which="last")
    card = json.loads((tmp_path / "model" / CARD_FILE).read_text())
    card["weights"]["sha256"] = "xyz"
    (tmp_path / "model" / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(DataError, match=r"model-card.json: weights.sha256"):
        load_artifact(tmp_path / "model")


def test_onnx_refuses_models_with_complex_operations() -> None:
    for name in ("unrolled", "varnet"):
        with pytest.raises(ConfigError, match=r"cannot be exported.*exportable models: unet"):
            export_onnx(build_model(name))


def test_one_flipped_bit_in_the_weights_is_refused(tmp_path: Path) -> None:
    run, _ = _federated_run(tmp_path / "run")
    export_run(run.path, tmp_path / "model", which="last")
    weights = tmp_path / "model" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x10
    weights.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="does not match the model card"):
        load_artifact(tmp_path / "model")
