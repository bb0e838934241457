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

STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg")


class RunConfig(BaseModel):
    """Every run-time setting of a federated run (names are the dashed TOML keys, underscored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "fedsense-run"
    num_server_rounds: int = Field(3, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedmedian", "fedtrimmedavg"] = "fedprox"
    proximal_mu: float = Field(0.0, ge=0.0)
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_train_nodes: int = Field(2, ge=1)
    min_evaluate_nodes: int = Field(2, ge=0)
    min_available_nodes: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0.0)
    node_wait_timeout: float = Field(600.0, gt=0.0)
    model: Literal["unet", "unrolled", "varnet"] = "unet"
    model_args: str = "{}"
    local_epochs: int = Field(1, ge=0)
    local_steps: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    loss: Literal["l1", "ssim", "l1+ssim"] = "l1"
    run_dir: str = "runs/latest"
    sites: str = ""
    sample_dir: str = ""
    num_samples: int = Field(2, ge=0)
    max_eval_slices: int = Field(0, ge=0)
    seed: int = 0
    norm_outlier_factor: float = Field(0.0, ge=0.0)
    resume: bool = True
    select_metric: Literal["psnr", "ssim", "nmse"] = "psnr"
    patience: int = Field(0, ge=0)

    @field_validator("model_args", mode="before")
    @classmethod
    def _args_as_json(cls, value: Any) -> Any:
        # Flower's run config holds only scalars, so the model's kwargs travel as a JSON string.
        return json.dumps(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ValueError("one of local-epochs or local-steps must be > 0")
        try:
            args = json.loads(self.model_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model-args is not valid JSON: {exc}") from exc
        if not isinstance(args, dict):
            raise ValueError("model-args must be a JSON object")
        return self

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`common.models.build_model`."""
        return dict(json.loads(self.model_args))

    @property
    def site_list(self) -> list[str]:
        """Site-config paths of a simulation, in partition order."""
        return [s.strip() for s in self.sites.split(",") if s.strip()]

    def to_flat(self) -> dict[str, Any]:
        """The dashed-key dict Flower's run config uses."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    @classmethod
    def from_flat(cls, flat: dict[str, Any], source: str = "run config") -> "RunConfig":
        """Validate a dashed-key dict; errors name ``source`` and the offending key."""
        data = {str(k).replace("-", "_"): v for k, v in flat.items()}
        try:
            return cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p).replace("_", "-") for p in first["loc"]) or "(config)"
            raise ConfigError(f"{source}: {loc}: {first['msg']}") from exc
