"""The names of every pluggable kind, in one place that needs neither PyTorch nor Flower.

Run-config validation, the CLI's choices, the error messages and the docs (README, ARCHITECTURE,
pyproject's comments: :mod:`common.docs_gen`) read the names from here; each implementation (the strategy
builders, the baselines, the losses) is keyed by the same names and checked against them when its module is
imported, so a name cannot exist in one list only. A model's entry names its class itself (as
``"module:Class"``, imported only when the model is built), so a model is its module and its entry. Each name carries the one-line
description the docs show, so a description is written once, next to its name.
(Mask patterns are derived from their builders in :mod:`common.masks`, which carry theirs.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Aggregation strategies (run-config ``strategy``): name -> what it does, for the docs.
STRATEGY_DESCRIPTIONS: dict[str, str] = {
    "fedavg": "FedAvg: the example-weighted mean of the sites' updated weights (McMahan et al. 2017)",
    "fedprox": "FedProx: FedAvg, with each site's local training held near the global model by the "
    "proximal term (μ/2)·‖w − w_global‖², μ = `proximal-mu` (Li et al. 2020)",
    "fedmedian": "FedMedian: the coordinate-wise median of the sites' weights; robust to a faulty or hostile site",
    "fedtrimmedavg": "FedTrimmedAvg: the coordinate-wise mean after dropping the `trim-beta` fraction at each end",
    "fedadam": "FedAdam: an Adam step of the server on the mean update taken as a pseudo-gradient (Reddi et al. 2021)",
    "fedyogi": "FedYogi: FedAdam with Yogi's additive second-moment update",
    "fedadagrad": "FedAdagrad: FedAdam with Adagrad's accumulated second moment",
    "fedavgm": "FedAvgM: server SGD with momentum on the mean update (Hsu et al. 2019)",
    "scaffold": "SCAFFOLD: FedAvg with each site's local gradients corrected by control variates (server's "
    "minus the site's), which removes client drift on heterogeneous sites (Karimireddy et al. 2020)",
}


#: How a model keeps its output consistent with the acquired k-space.
DC_OPERATORS = ("none", "closed-form", "gradient")


@dataclass(frozen=True)
class ModelEntry:
    """A reconstruction model's facts, declared once: building it, SSDU, DP-SGD, ONNX export and the docs read
    them here."""

    description: str
    #: Its ``nn.Module`` class as ``"package.module:Class"``; :func:`common.models.build_model` imports it
    #: on use, so this module (and the docs, the config validation) need no PyTorch.
    implementation: str
    #: How its output is kept consistent with the acquired k-space: "none", "closed-form" or "gradient".
    dc_operator: str
    #: Whether its output can be taken to k-space, which SSDU's loss on the held-back locations needs.
    supports_ssdu: bool
    #: Whether ``fedsense export --onnx`` can convert it: its class then has the ``onnx_module(height, width)``
    #: hook of :class:`common.onnx_export.OnnxExportable` (a module on real (..., 2) k-space pairs).
    onnx_exportable: bool = False
    #: Why DP-SGD cannot train it; empty when it can.
    dp_refusal: str = ""

    def __post_init__(self) -> None:
        if self.dc_operator not in DC_OPERATORS:
            raise ValueError(f"dc_operator: {self.dc_operator!r} is none of {', '.join(DC_OPERATORS)}")
        module, _, attribute = self.implementation.partition(":")
        if not module or not attribute:
            raise ValueError(f"implementation: {self.implementation!r} is not 'package.module:Class'")

    @property
    def supports_dp(self) -> bool:
        """Whether sample-level DP-SGD can train it."""
        return not self.dp_refusal


#: Reconstruction models (run-config ``model``): name -> its facts.
MODEL_ENTRIES: dict[str, ModelEntry] = {
    "unet": ModelEntry(
        "end-to-end U-Net on the coil-combined zero-filled image (fastMRI's baseline); at radial / spiral "
        "sites on the density-compensated NUFFT adjoint",
        implementation="common.models.unet:UnetRecon",
        dc_operator="none",
        supports_ssdu=False,
        onnx_exportable=True,
    ),
    "unrolled": ModelEntry(
        "unrolled cascade of small residual CNNs, each followed by a closed-form data-consistency "
        "layer (after Schlemper et al.'s DC-CNN); at radial / spiral sites the DC is CG-SENSE "
        '(`nc_dc = "cg"`) or a gradient step on the NUFFT',
        implementation="common.models.unrolled:UnrolledNet",
        dc_operator="closed-form",
        supports_ssdu=True,
    ),
    "varnet": ModelEntry(
        "end-to-end VarNet: gradient data consistency in multi-coil k-space with coil maps estimated by "
        "the model (after Sriram et al. 2020); at radial / spiral sites each cascade runs its image-domain "
        "twin (gradient DC on the NUFFT, the same weights) with the site's own maps",
        implementation="common.models.varnet:VarNet",
        dc_operator="gradient",
        supports_ssdu=True,
        dp_refusal="its coil-sensitivity network runs on every coil image as a separate batch element (B·C), so "
        "Opacus' per-sample gradients would be per coil, not per slice, and clipping would not bound "
        "a slice's influence; use unet or unrolled",
    ),
}
#: Reconstruction models: name -> what it is, for the docs.


def _capabilities(entry: ModelEntry) -> str:
    """What a model can do, for the docs' table: read from its entry, as the code that refuses it reads it."""
    yes = {True: "yes", False: "no"}
    return (
        f"data consistency: {entry.dc_operator}; SSDU: {yes[entry.supports_ssdu]}; "
        f"DP-SGD: {yes[entry.supports_dp]}; ONNX export: {yes[entry.onnx_exportable]}"
    )


MODEL_DESCRIPTIONS: dict[str, str] = {
    name: f"{entry.description} ({_capabilities(entry)})" for name, entry in MODEL_ENTRIES.items()
}
#: Baselines (``fedsense baseline KIND``): name -> what it trains, for the docs.
BASELINE_DESCRIPTIONS: dict[str, str] = {
    "local": "each site trains its own model on its own data only, for the same rounds and local steps",
    "centralized": "one model on all sites' training slices pooled, every slice equally likely, with as many "
    "steps per round as all sites of a federated round together",
    "centralized-balanced": "the same, with the batches drawn from each site in turn, so every site gets equal steps",
    "zero-filled": "no learning: the inverse FFT of the undersampled k-space (round 0 only)",
}
#: Training losses (run-config ``loss``): name -> what it compares, for the docs.
LOSS_DESCRIPTIONS: dict[str, str] = {
    "l1": "mean absolute error between the reconstruction and the target image",
    "ssim": "1 − SSIM (fastMRI's 7×7 window) at the target volume's range",
    "l1+ssim": "the sum of the two",
}
#: Experiment trackers (run-config ``tracking``, comma-separated): name -> what the server writes, for the docs.
TRACKER_DESCRIPTIONS: dict[str, str] = {
    "mlflow": "an MLflow run: the flattened run config as params, sites' scanners as tags, per-site and global "
    "metrics with step = round, phase wall times, the best round, sample images, the exported model "
    "as an artifact and a registered model version",
    "tensorboard": "TensorBoard event files under the run directory's `tensorboard/`: per-site and global "
    "scalars per round, sample images, the run config as text",
}

STRATEGIES: tuple[str, ...] = tuple(STRATEGY_DESCRIPTIONS)
MODELS: tuple[str, ...] = tuple(MODEL_DESCRIPTIONS)
BASELINES: tuple[str, ...] = tuple(BASELINE_DESCRIPTIONS)
LOSSES: tuple[str, ...] = tuple(LOSS_DESCRIPTIONS)
TRACKERS: tuple[str, ...] = tuple(TRACKER_DESCRIPTIONS)


def check_implemented(kind: str, names: Iterable[str], implemented: Iterable[str]) -> None:
    """Fail at import when an implementation table and its registry disagree (a programming error)."""
    missing, extra = set(names) - set(implemented), set(implemented) - set(names)
    if missing or extra:
        raise RuntimeError(f"{kind} registry mismatch: not implemented {sorted(missing)}, unregistered {sorted(extra)}")


def known_name(value: str, names: Iterable[str]) -> str:
    """``value`` if it is one of ``names``; else ``ValueError`` listing them (the validators' one message)."""
    names = tuple(names)
    if value not in names:
        raise ValueError(f"must be one of {', '.join(names)}, got {value!r}")
    return value
