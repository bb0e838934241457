"""Site configs: the shipped examples load, and every bad value names the file and the dotted field."""

from pathlib import Path

import pytest

from common.config import SiteConfig, load_site_config, parse_site_config
from common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "deploy" / "sites"

BASE = """\
name = "guys"
dataset = "ixi"
hospital = "Guys"
data_path = "data/guys"
contrasts = ["T1", "t2"]

[split]
seed = 1
val_fraction = 0.2
test_fraction = 0.2

[scanner]
field_strength_t = 3.0
coils = 4
matrix = [128, 128]
noise_std = 0.01
mask = "poisson"
acceleration = 4
center_fraction = 0.08
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sites" / "guys.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_sites_are_heterogeneous_and_point_at_demo_data() -> None:
    configs = {p.stem: load_site_config(p) for p in sorted(SITES.glob("*.toml"))}
    assert set(configs) == {"site-a", "site-b", "site-c"}
    a, b, c = configs["site-a"], configs["site-b"], configs["site-c"]
    assert (a.dataset, b.dataset, c.dataset) == ("fastmri", "brats", "ixi")
    assert (a.scanner.coils, b.scanner.coils, c.scanner.coils) == (16, 8, 4)
    assert (a.scanner.field_strength_t, b.scanner.field_strength_t) == (3.0, 1.5)
    assert (a.scanner.mask, b.scanner.mask, c.scanner.mask) == ("equispaced", "random", "poisson")
    assert (a.scanner.acceleration, b.scanner.acceleration, c.scanner.acceleration) == (4, 6, 4)
    assert b.contrasts == ["flair", "t2"] and c.contrasts == ["T1", "T2", "PD"] and c.hospital == "Guys"
    for name, config in configs.items():
        assert config.name == name
        assert config.data_path == REPO / "demo-data" / name
        assert config.scanner.matrix == (128, 128)


def test_relative_data_path_resolves_against_the_toml_and_contrasts_normalise(tmp_path: Path) -> None:
    config = load_site_config(write(tmp_path, BASE))
    assert config.data_path == (tmp_path / "sites" / "data" / "guys").resolve()
    assert config.contrasts == ["T1", "T2"]
    absolute = load_site_config(write(tmp_path, BASE.replace('"data/guys"', f'"{tmp_path}"')))
    assert absolute.data_path == tmp_path.resolve()


def test_brats_2023_contrast_names_map_to_canonical() -> None:
    data = {
        "name": "b",
        "dataset": "brats",
        "data_path": "/data",
        "contrasts": ["t2f", "T1c", "t2"],
        "scanner": {
            "field_strength_t": 1.5,
            "coils": 8,
            "mask": "random",
            "acceleration": 6,
            "center_fraction": 0.08,
        },
    }
    config = parse_site_config(data, "b.toml")
    assert config.contrasts == ["flair", "t1ce", "t2"]
    assert config.split.val_fraction == 0.2 and config.demo.subjects == 3 and config.skip_bad_files is False


@pytest.mark.parametrize(
    ("old", "new", "field", "reason"),
    [
        ("coils = 4", "coils = 0", "scanner.coils", "must be >= 1"),
        ("matrix = [128, 128]", "matrix = [128, 8]", "scanner.matrix.1", "must be >= 16"),
        ("field_strength_t = 3.0", "field_strength_t = 0", "scanner.field_strength_t", "must be > 0"),
        ("noise_std = 0.01", "noise_std = -0.1", "scanner.noise_std", "must be >= 0"),
        ('mask = "poisson"', 'mask = "zigzag"', "scanner.mask", "must be one of random, equispaced"),
        ("acceleration = 4", "acceleration = 0.5", "scanner.acceleration", "must be >= 1"),
        ("center_fraction = 0.08", "center_fraction = 1.5", "scanner.center_fraction", "must be < 1"),
        ("coils = 4", "coil = 4", "scanner.coil", "unknown field"),
        (
            'dataset = "ixi"',
            'dataset = "oasis"',
            "dataset",
            "unknown dataset kind 'oasis'; known kinds: brats, fastmri, ixi",
        ),
        ('contrasts = ["T1", "t2"]', 'contrasts = ["T1", "DWI"]', "contrasts", "unknown ixi contrast"),
        ('hospital = "Guys"', 'hospital = "Mayo"', "hospital", "must be one of Guys, HH, IOP"),
        ("val_fraction = 0.2", "val_fraction = 0.9", "split", "val_fraction + test_fraction must be < 1"),
        ('name = "guys"', 'name = "guys/../x"', "name", "string should match pattern"),
        ('data_path = "data/guys"\n', "", "data_path", "required field is missing"),
    ],
)
def test_bad_values_name_file_and_field(tmp_path: Path, old: str, new: str, field: str, reason: str) -> None:
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    line = next(line for line in message.splitlines() if line.startswith(f"{path}: {field}: "))
    assert reason.lower() in line.lower()


def test_hospital_only_for_ixi(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace('dataset = "ixi"', 'dataset = "brats"').replace('["T1", "t2"]', '["t1"]'))
    with pytest.raises(ConfigError, match=r"guys\.toml: hospital: brats data is not split by hospital"):
        load_site_config(path)


def test_every_error_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("coils = 4", "coils = 0").replace("acceleration = 4", "acceleration = 0"))
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    lines = str(info.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["scanner.coils", "scanner.acceleration"]


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("coils = 4", "coils = = 4"))
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    assert str(info.value).startswith(f"{path}: <toml>: invalid TOML")
    assert "line 14" in str(info.value)
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: <file>: no such file"):
        load_site_config(missing)


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load_site_config(write(tmp_path, BASE))
    assert isinstance(config, SiteConfig)
    with pytest.raises(ValueError):
        config.scanner.coils = 8  # type: ignore[misc]
