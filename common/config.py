"""Per-site configuration: which data a hospital holds and how its scanner acquires it.

Each site (hospital) describes itself in one TOML file (``deploy/sites/*.toml``). Validating it here, with
unknown keys refused, means a typo or an impossible scanner setting fails at start-up with the file and the
dotted field named (``sites/guys.toml: scanner.coils: must be >= 1``), not later inside a training step.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.errors import ConfigError
from common.masks import PATTERNS
from common.registry import known_name

if TYPE_CHECKING:
    from common.data.kinds import DatasetKind

# Canonical contrast names per dataset; BraTS 2023+ names (t1n, t1c, t2w, t2f) map onto the 2020 ones.
BRATS_CONTRASTS = ("t1", "t1ce", "t2", "flair")
BRATS_ALIASES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
IXI_CONTRASTS = ("T1", "T2", "PD")
IXI_HOSPITALS = ("Guys", "HH", "IOP")

# Upper bounds keep a typo (matrix = [64000, 64000], coils = 10000) from becoming a site that passes validation
# and then dies allocating tens of GiB in its first training step.
MatrixSide = Annotated[int, Field(ge=16, le=1024)]
MAX_COILS = 128


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, so a misspelt key cannot be silently ignored.

    NaN and infinity are refused too: no setting means anything at infinity, and ``noise_std = inf`` would
    silently turn every simulated sample into NaN.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitConfig(_Strict):
    """Subject-level train/val/test partition of the site's data (see :mod:`common.data.splits`)."""

    seed: int = 0
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 (training needs subjects)")
        return self


class ScannerConfig(_Strict):
    """The site's acquisition: scanner, receive coils, sampling pattern and noise.

    ``noise_std`` is the standard deviation of the complex white Gaussian noise added to every k-space
    sample of every coil (E|n|^2 = noise_std^2, i.e. noise_std / sqrt(2) per real and imaginary part),
    relative to the maximum of the magnitude image volume. With the orthonormal FFT the same std holds per
    coil image pixel (Parseval), so 0.01 means noise at 1 % of the brightest tissue in each coil image.
    It is simulated only for magnitude-only data (BraTS, IXI); fastMRI k-space already carries its noise.
    ``matrix`` is the (H, W) the magnitude images are resampled to before simulation; fastMRI k-space is
    used at its stored size.
    """

    field_strength_t: float = Field(gt=0.0)
    coils: int = Field(ge=1, le=MAX_COILS)
    matrix: tuple[MatrixSide, MatrixSide] = (128, 128)
    noise_std: float = Field(0.0, ge=0.0)
    # Cartesian sites: the undersampling mask and its fully sampled centre (required for them).
    mask: str | None = None
    acceleration: float = Field(ge=1.0)
    center_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    # Non-Cartesian sites (common.trajectories): the readout, and spokes / interleaves (derived from
    # ``acceleration`` when not given; when given they must agree with it).
    trajectory: Literal["cartesian", "radial-ga", "spiral"] = "cartesian"
    spokes: int | None = Field(None, ge=1, le=4096)
    interleaves: int | None = Field(None, ge=1, le=1024)
    readout_samples: int | None = Field(None, ge=8, le=8192)
    oversampling: float = Field(2.0, ge=1.0, le=4.0)

    @field_validator("mask")
    @classmethod
    def _known_pattern(cls, value: str | None) -> str | None:
        return None if value is None else known_name(value, PATTERNS)

    @model_validator(mode="after")
    def _sampling_fits_trajectory(self) -> ScannerConfig:
        if self.trajectory == "cartesian":
            for key in ("spokes", "interleaves", "readout_samples"):
                if getattr(self, key) is not None:
                    raise ValueError(f'{key} applies to non-Cartesian trajectories only (trajectory = "cartesian")')
            missing = [key for key in ("mask", "center_fraction") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"{missing[0]} is required for a Cartesian site (or set trajectory)")
            return self
        from common.trajectories import non_cartesian_check  # the trajectory maths lives there

        for key in ("mask", "center_fraction"):
            if getattr(self, key) is not None:
                raise ValueError(f"{key} applies to Cartesian sites only, not trajectory = {self.trajectory!r}")
        if self.trajectory == "radial-ga" and self.interleaves is not None:
            raise ValueError("interleaves applies to spiral trajectories; a radial-ga site sets spokes")
        if self.trajectory == "spiral" and self.spokes is not None:
            raise ValueError("spokes applies to radial-ga trajectories; a spiral site sets interleaves")
        non_cartesian_check(self)
        return self


class DemoConfig(_Strict):
    """How ``fedsense data demo`` synthesises this site's offline demo data."""

    subjects: int = Field(3, ge=1)
    seed: int = 0


class RehearsalConfig(_Strict):
    """Test and benchmark knobs that make a site behave like a worse one; never set at a real site."""

    # Each training step takes this many times as long (the site sleeps after the step): a slower machine.
    slowdown: float = Field(1.0, ge=1.0, le=1000.0)


class SiteConfig(_Strict):
    """One site's data and scanner; ``data_path`` is absolute after loading (resolved against the TOML)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # A kind of common.data.kinds (fastmri, brats, ixi, or one registered there).
    dataset: str
    data_path: Path
    contrasts: list[str] = Field(default_factory=list)
    hospital: str | None = None
    seed: int = 0
    split: SplitConfig = SplitConfig()
    scanner: ScannerConfig
    max_slices_per_volume: int | None = Field(None, ge=1)
    skip_bad_files: bool = False
    # Seconds a child process may take to read each HDF5 file once before it is declared bad (hangs).
    file_check_seconds: float = Field(10.0, gt=0.0, le=600.0)
    demo: DemoConfig = DemoConfig()
    rehearsal: RehearsalConfig = RehearsalConfig()
    # "self": the site has no fully sampled data and trains self-supervised (SSDU, common.ssdu).
    supervision: Literal["full", "self"] = "full"

    @model_validator(mode="after")
    def _non_cartesian_support(self) -> SiteConfig:
        if self.scanner.trajectory != "cartesian" and self.supervision == "self":
            raise ValueError('supervision = "self" (SSDU) splits a Cartesian mask; use it on Cartesian sites only')
        return self

    @field_validator("data_path")
    @classmethod
    def _resolve(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        try:
            value = value.expanduser()
        except RuntimeError as exc:  # "~someone/..." for a user this machine does not know
            raise ValueError(f"cannot expand {str(value)!r}: {exc}") from None
        if not value.is_absolute() and base is not None:
            value = Path(base) / value
        return value.resolve()

    @field_validator("dataset")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        _kind(value)
        return value

    @field_validator("contrasts")
    @classmethod
    def _known_contrasts(cls, value: list[str], info: ValidationInfo) -> list[str]:
        dataset = info.data.get("dataset")
        return value if dataset is None else _kind(dataset).contrasts(value)  # None: dataset already refused

    @field_validator("hospital")
    @classmethod
    def _known_hospital(cls, value: str | None, info: ValidationInfo) -> str | None:
        dataset = info.data.get("dataset")
        if value is None or dataset is None:
            return value
        hospitals = _kind(dataset).hospitals
        if not hospitals:
            raise ValueError(f"{dataset} data is not split by hospital")
        by_lower = {h.lower(): h for h in hospitals}
        if value.lower() not in by_lower:
            raise ValueError(f"must be one of {', '.join(hospitals)}, got {value!r}")
        return by_lower[value.lower()]


def _kind(name: str) -> DatasetKind:
    """The registered dataset kind ``name`` (:mod:`common.data.kinds` imports this module, so it is
    imported here, when a config is validated)."""
    from common.data.kinds import dataset_kind

    return dataset_kind(name)


def _reason(error: Mapping[str, Any]) -> str:
    """A short, uniform reason for one pydantic error ("must be >= 1" rather than pydantic's sentence)."""
    ctx = error.get("ctx") or {}
    bounds = {
        "greater_than_equal": ("ge", ">="),
        "greater_than": ("gt", ">"),
        "less_than_equal": ("le", "<="),
        "less_than": ("lt", "<"),
    }
    kind = error["type"]
    if kind in bounds:
        key, op = bounds[kind]
        return f"must be {op} {ctx[key]}, got {error['input']!r}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field (misspelt?)"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {error['input']!r}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def format_validation_error(source: str, exc: ValidationError) -> str:
    """``source: dotted.field: reason`` lines, one per error, the first being the headline."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "<root>"
        lines.append(f"{source}: {field}: {_reason(error)}")
    return "\n".join(lines)


def parse_site_config(data: dict[str, Any], source: str, base_dir: Path | None = None) -> SiteConfig:
    """Validate an already-parsed mapping; errors become :class:`ConfigError` naming ``source``."""
    try:
        return SiteConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate one site TOML; a missing file, bad TOML or bad value raises :class:`ConfigError`.

    A file the user may not read raises ``PermissionError`` as it is: the file system said no (exit 4).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: <file>: no such file") from exc
    except PermissionError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: <file>: cannot read: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: <toml>: invalid TOML: {exc}") from exc
    return parse_site_config(data, str(path), base_dir=path.parent.resolve())
