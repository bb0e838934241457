"""Typed run configuration shared by the ServerApp, the ClientApp and the baselines.

Flower hands both apps a flat ``run_config`` dict whose keys come from ``pyproject.toml``
``[tool.flwr.app.config]`` (dashed names) plus per-run overrides. Validating it once, here,
means a typo or a bad value fails at the start of a run with the key named, not hours later
inside a training step.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import ConfigError
from common.privacy_config import check_privacy
from common.registry import LOSSES, MODELS, STRATEGIES, TRACKERS, known_name


class RunConfig(BaseModel):
    """Every run-time setting of a federated run (names are the dashed TOML keys, underscored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "fedsense-run"
    num_server_rounds: int = Field(3, ge=1)
    strategy: str = "fedprox"
    proximal_mu: float = Field(0.01, ge=0.0)
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_train_nodes: int = Field(2, ge=1)
    min_evaluate_nodes: int = Field(2, ge=0)
    min_available_nodes: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0.0)
    # Stragglers (README "Slow sites"): aggregate at this many seconds once min-train-nodes replied (0: off).
    round_deadline: float = Field(0.0, ge=0.0)
    adaptive_local_steps: bool = False  # slow sites get fewer local steps, to finish by round-deadline
    node_wait_timeout: float = Field(600.0, gt=0.0)
    # How the weights travel: fp16 halves the bytes (server: rounded weights; sites: float16 changes).
    transport_dtype: Literal["fp32", "fp16"] = "fp32"
    model: str = "unet"
    model_args: str = "{}"
    local_epochs: int = Field(1, ge=0)
    local_steps: int = Field(8, ge=0)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    loss: str = "l1"
    run_dir: str = "runs/latest"
    sites: str = ""
    sample_dir: str = ""
    num_samples: int = Field(2, ge=0)
    max_eval_slices: int = Field(0, ge=0)
    seed: int = 0
    norm_outlier_factor: float = Field(0.0, ge=0.0)
    resume: bool = True
    ssdu_rho: float = Field(0.4, gt=0.0, lt=1.0)
    ssdu_masks: int = Field(1, ge=1, le=16)
    augment: bool = True
    server_eta: float = Field(0.01, gt=0.0)
    server_tau: float = Field(1e-3, gt=0.0)
    server_beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    server_beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    server_learning_rate: float = Field(1.0, gt=0.0)
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    client_optimizer: Literal["reset", "keep"] = "reset"
    local_layers: str = ""
    site_state_dir: str = ""
    fine_tune_steps: int = Field(0, ge=0)
    fine_tune_eval_every: int = Field(10, ge=1)
    fine_tune_patience: int = Field(3, ge=0)
    fine_tune_warmup: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    compile: bool = False
    # Privacy (see README "Privacy"): sample-level DP-SGD at the sites, client-level DP at the server.
    dp_noise_multiplier: float = Field(0.0, ge=0.0)
    dp_max_grad_norm: float = Field(1.0, gt=0.0)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    dp_target_epsilon: float = Field(0.0, ge=0.0)
    dp_unit: Literal["subject", "sample"] = "subject"
    dp_client_level: Literal["off", "server-fixed", "client-fixed"] = "off"
    dp_client_noise: float = Field(0.0, ge=0.0)
    dp_client_clip: float = Field(1.0, gt=0.0)
    secagg: bool = False
    secagg_num_shares: int = Field(3, ge=3)
    secagg_reconstruction_threshold: int = Field(2, ge=2)
    secagg_clipping_range: float = Field(1.0, gt=0.0)
    secagg_quantization_range: int = Field(2**22, ge=2, lt=2**32)
    secagg_max_weight: float = Field(1000.0, gt=0.0)
    site_caps: str = "{}"
    site_keys: str = ""  # site-keys.json of `fedsense pki` (key fingerprint -> site); "": names are not key-bound
    select_metric: Literal["psnr", "ssim", "nmse"] = "psnr"
    patience: int = Field(0, ge=0)
    # "global": patience counts rounds without a better mean metric; "every-site": also each site's own metric
    # of the shared model, so a run stops only when neither has improved (the local baseline's rule).
    stop_rule: Literal["global", "every-site"] = "global"
    evaluate_with_train: bool = False
    # Experiment tracking, written by the server only (README "Tracking and monitoring").
    tracking: str = ""
    tracking_uri: str = ""
    metrics_port: int = Field(0, ge=0, le=65535)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return known_name(value, STRATEGIES)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return known_name(value, MODELS)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        return known_name(value, LOSSES)

    @field_validator("tracking")
    @classmethod
    def _known_trackers(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
        return ",".join(dict.fromkeys(names))

    @field_validator("model_args", "site_caps", mode="before")
    @classmethod
    def _args_as_json(cls, value: Any) -> Any:
        # Flower's run config holds only scalars, so the model's kwargs travel as a JSON string.
        return json.dumps(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ValueError("one of local-epochs or local-steps must be > 0")
        if self.round_deadline >= self.round_timeout:
            raise ValueError(
                f"round-deadline ({self.round_deadline:g} s) must be shorter than round-timeout "
                f"({self.round_timeout:g} s), or 0 (off)"
            )
        if self.adaptive_local_steps and (self.round_deadline == 0 or self.local_steps == 0):
            raise ValueError(
                "adaptive-local-steps needs round-deadline > 0 and local-steps > 0 (it scales the "
                "local steps of slow sites to the deadline)"
            )
        if self.round_deadline > 0 and self.secagg:
            raise ValueError("round-deadline does not apply to SecAgg+ rounds (secagg = true): set it to 0")
        if self.transport_dtype == "fp16" and self.secagg:
            raise ValueError(
                'transport-dtype = "fp16" does not apply to SecAgg+ rounds (secagg = true: they quantise the '
                'update themselves): set it to "fp32"'
            )
        if self.round_deadline > 0 and self.strategy == "scaffold":
            # A straggler keeps its new control variate c_i while the server discards its Δc_i, so the
            # server's c would stop being the mean of the sites' c_i for the rest of the run.
            raise ValueError(
                "round-deadline does not apply to strategy = scaffold (a straggler's control variate would "
                "drift from the server's): set it to 0"
            )
        try:
            args = json.loads(self.model_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model-args is not valid JSON: {exc}") from exc
        if not isinstance(args, dict):
            raise ValueError("model-args must be a JSON object")
        check_privacy(self)
        self.caps  # noqa: B018 - the property validates site-caps
        return self

    @property
    def caps(self) -> dict[str, int]:
        """Per-site caps on the ``num-examples`` an update may claim (``site-caps``; empty: none)."""
        try:
            caps = json.loads(self.site_caps)
        except json.JSONDecodeError as exc:
            raise ValueError(f"site-caps is not valid JSON: {exc}") from exc
        if not isinstance(caps, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in caps.values()
        ):
            raise ValueError('site-caps must be a JSON object of site name -> integer >= 1, e.g. {"site-a": 120}')
        return {str(k): int(v) for k, v in caps.items()}

    @property
    def proximal_term_mu(self) -> float:
        """The one rule for FedProx's term: ``proximal-mu`` with ``strategy = fedprox``, 0 otherwise.

        (FedProx is FedAvg plus the term; the robust and server-optimiser strategies aggregate plain
        local updates, so pyproject's ``proximal-mu`` default never leaks into them.)
        """
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`common.models.build_model`."""
        return dict(json.loads(self.model_args))

    @property
    def local_layer_patterns(self) -> tuple[str, ...]:
        """fnmatch patterns of the parameters that stay at each site (``local-layers``)."""
        return tuple(p.strip() for p in self.local_layers.split(",") if p.strip())

    @property
    def trackers(self) -> tuple[str, ...]:
        """The experiment trackers of ``tracking``, in the order given."""
        return tuple(n for n in self.tracking.split(",") if n)

    @property
    def site_list(self) -> list[str]:
        """Site-config paths of a simulation, in partition order."""
        return [s.strip() for s in self.sites.split(",") if s.strip()]

    def to_flat(self) -> dict[str, Any]:
        """The dashed-key dict Flower's run config uses."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    @classmethod
    def from_flat(cls, flat: dict[str, Any], source: str = "run config") -> RunConfig:
        """Validate a dashed-key dict; errors name ``source`` and the offending key."""
        data = {str(k).replace("-", "_"): v for k, v in flat.items()}
        try:
            return cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p).replace("_", "-") for p in first["loc"]) or "(config)"
            raise ConfigError(f"{source}: {loc}: {first['msg'].removeprefix('Value error, ')}") from exc
