"""The exported model artifact: safetensors weights plus a JSON model card that says where they came from.

A hospital that applies a federated model must know exactly which federation, rounds, sites and settings
produced it, and loading it must never execute code. So the artifact is a folder of plain data:

    model.safetensors   the weights (safetensors: a JSON header and raw tensor bytes, no pickle)
    model-card.json     :class:`ModelCard`: architecture and its arguments, run config, training sites
                        with their example counts and validation metrics at the exported round, the
                        acquisitions (masks, accelerations, matrix sizes, coils) it was trained on,
                        FedSense / Flower / torch versions, and the SHA-256 of ``model.safetensors``
    model.onnx          optional, the network for other runtimes (see :mod:`common.onnx_export`)

:func:`load_artifact` checks the SHA-256 and that the weights name the same card before it builds the
model, and refuses a tampered or mismatched file with a :class:`DataError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import atomic_dir
from common.errors import DataError, OutputError
from common.models import build_model, count_parameters
from common.outputs import check_new_folder

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model-card.json"
ONNX_FILE = "model.onnx"
ARTIFACT_FILES = frozenset({WEIGHTS_FILE, CARD_FILE, ONNX_FILE})
# safetensors metadata key tying the weights to their card (a card copied next to other weights is refused).
CARD_ID_KEY = "fedsense-card-id"


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Card):
    """What :func:`common.models.build_model` needs to rebuild the network."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    num_parameters: int = Field(ge=0)


class Acquisition(_Card):
    """One training site's acquisition, from its site config (what the model has seen)."""

    dataset: str
    mask: str | None = None  # Cartesian sites; radial / spiral sites have a trajectory instead
    acceleration: float
    center_fraction: float | None = None
    trajectory: str = "cartesian"
    coils: int
    matrix: tuple[int, int] | None = None  # simulated (NIfTI) sites; fastMRI data keeps its stored size
    field_strength_t: float | None = None
    noise_std: float | None = None


class SiteEntry(_Card):
    """A training site: its training-example count and validation metrics at the exported round."""

    name: str
    num_examples: int | None = None
    validation: dict[str, float | None] = Field(default_factory=dict)
    acquisition: Acquisition | None = None


class WeightsInfo(_Card):
    file: str = WEIGHTS_FILE
    format: Literal["safetensors"] = "safetensors"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: str = "float32"


class OnnxInfo(_Card):
    file: str = ONNX_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    input_shape: tuple[int, ...]
    inputs: list[str]
    max_abs_error: float
    tolerance: float


class ModelCard(_Card):
    """Provenance of an exported model; ``id`` names it in DICOM series and output files."""

    format: int = ARTIFACT_FORMAT
    id: str
    created: str
    architecture: Architecture
    run_name: str
    run_config: dict[str, Any]
    round: int = Field(ge=0)
    round_selection: str
    selection: dict[str, Any] | None = None  # the run's best.json when the round was chosen as best
    rounds_completed: int = Field(ge=0)
    rounds_planned: int | None = None
    sites: list[SiteEntry]
    global_validation: dict[str, float | None] = Field(default_factory=dict)
    versions: dict[str, str | None]
    weights: WeightsInfo
    onnx: OnnxInfo | None = None

    def acquisitions(self) -> list[Acquisition]:
        """The acquisitions of the sites the model was trained on (those whose config was known)."""
        return [s.acquisition for s in self.sites if s.acquisition is not None]


@dataclass(frozen=True)
class LoadedModel:
    """A verified model ready to run, with the card it was checked against."""

    model: torch.nn.Module
    card: ModelCard
    path: Path


def package_versions() -> dict[str, str | None]:
    """FedSense, Flower and torch versions (Flower read from its metadata: ``common`` never imports flwr)."""
    versions: dict[str, str | None] = {}
    for name in ("fedsense", "flwr"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    return versions


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_bytes(state_dict: dict[str, torch.Tensor], card_id: str) -> bytes:
    """The safetensors serialisation of CPU-contiguous weights, tagged with the card id."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return save(tensors, metadata={CARD_ID_KEY: card_id})


def card_id(run_name: str, round: int, state_dict: dict[str, torch.Tensor]) -> str:
    """``<run>-r<round>-<12 hex of the weights' digest>``: readable and unique per weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().to("cpu").contiguous().numpy().tobytes())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_name) or "run"
    return f"{safe}-r{round:04d}-{digest.hexdigest()[:12]}"


def write_artifact(
    out_dir: Path,
    state_dict: dict[str, torch.Tensor],
    card_fields: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """Write weights + card (+ ``extra_files``) into ``out_dir`` all at once or not at all.

    ``card_fields`` are the :class:`ModelCard` fields other than ``id``, ``created``, ``versions`` and
    ``weights``, which are filled in here. Everything is written to a hidden sibling folder that is
    renamed onto ``out_dir`` at the end, so a crash never leaves an artifact without its card; an existing
    non-empty ``out_dir`` is refused rather than mixed with, unless ``overwrite`` and it is an earlier
    artifact (nothing in it but artifact files): then it is replaced whole.
    """
    out_dir = Path(out_dir)
    check_new_folder(out_dir, overwrite)
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ARTIFACT_FILES)
        if foreign:
            raise OutputError(
                f"--out: {out_dir} holds files that are not an exported model ({', '.join(foreign[:3])}); "
                "not replacing it, choose a new folder"
            )
    identifier = card_id(str(card_fields.get("run_name", "run")), int(card_fields["round"]), state_dict)
    blob = weights_bytes(state_dict, identifier)
    card = ModelCard(
        id=identifier,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions=package_versions(),
        weights=WeightsInfo(sha256=hashlib.sha256(blob).hexdigest()),
        **card_fields,
    )
    with atomic_dir(out_dir, replace=overwrite) as tmp:  # absent, empty, or an earlier artifact (checked above)
        (tmp / WEIGHTS_FILE).write_bytes(blob)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return card


def read_card(path: Path) -> ModelCard:
    """The model card of an artifact folder (or the card file itself); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such model folder (export one with `fedsense export`)")
    card_path = path / CARD_FILE if path.is_dir() else path
    try:
        text = card_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{card_path}: no model card (export a model with `fedsense export`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{card_path}: cannot read the model card: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{card_path}: model card is not valid JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("format") not in (None, ARTIFACT_FORMAT):
        raise DataError(f"{card_path}: format: artifact format {raw.get('format')!r} is not {ARTIFACT_FORMAT}")
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<card>"
        raise DataError(f"{card_path}: {loc}: {first['msg']}") from exc


def load_weights(folder: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The weights after checking their SHA-256 and card id against ``card`` (parsed by safetensors: no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = folder / card.weights.file
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the weights: {exc}") from exc
    actual = hashlib.sha256(blob).hexdigest()
    if actual != card.weights.sha256:
        raise DataError(
            f"{path}: SHA-256 {actual[:16]}... does not match the model card's {card.weights.sha256[:16]}...: "
            "the weights were changed or belong to another model; refusing to load them"
        )
    try:
        tensors = load(blob)
        # The header is JSON (8-byte little-endian length first); its __metadata__ holds the card id.
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a valid safetensors file: {exc}") from exc
    if meta.get(CARD_ID_KEY) != card.id:
        raise DataError(f"{path}: weights belong to model {meta.get(CARD_ID_KEY)!r}, not to the card's {card.id!r}")
    return tensors


def load_artifact(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> LoadedModel:
    """Read, verify and build an exported model (``path``: the artifact folder or its card) on ``device``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    card = read_card(path)
    tensors = load_weights(folder, card)
    source = str(folder / CARD_FILE)
    model = build_model(card.architecture.name, source=source, **card.architecture.args)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{folder / card.weights.file}: weights do not fit {card.architecture.name}: {exc}") from exc
    if count_parameters(model) != card.architecture.num_parameters:
        raise DataError(
            f"{source}: architecture.num_parameters: card says {card.architecture.num_parameters}, "
            f"the model has {count_parameters(model)}"
        )
    model.to(torch.device(device)).eval()
    logger.info("loaded model %s (%s, round %d)", card.id, card.architecture.name, card.round)
    return LoadedModel(model=model, card=card, path=folder)
