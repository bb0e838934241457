"""Demo files laid out as the public datasets are downloaded: IXI tarball folders, BraTS subject folders,
one flat fastMRI ``multicoil_train`` folder whose files come from two scanners (real ISMRMRD headers)."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import h5py

from common.config import SiteConfig, parse_site_config
from common.data.demo import generate_demo
from common.data.readers import ISMRMRD_NAMESPACE

# What the generated fastMRI files hold, per scanner: the headers must reproduce this, not the names.
FASTMRI_SCANNERS = {
    "skyra": {"field_strength_t": 2.89362, "coils": 4, "contrasts": ["AXT2", "AXFLAIR"]},
    "aera": {"field_strength_t": 1.494, "coils": 2, "contrasts": ["AXT1"]},
}


def demo_site(name: str, dataset: str, scanner: dict[str, Any] | None = None, **fields: Any) -> SiteConfig:
    """A site config for the demo generator only (give each a distinct demo seed: distinct subject ids)."""
    data = {
        "name": name,
        "dataset": dataset,
        "data_path": ".",
        "scanner": {
            "field_strength_t": 3.0,
            "coils": 4,
            "mask": "equispaced",
            "acceleration": 4,
            "center_fraction": 0.08,
            **(scanner or {}),
        },
        **fields,
    }
    return parse_site_config(data, name)


def write_public_layout(
    root: Path, size: int = 32, subjects: int = 3, datasets: tuple[str, ...] = ("ixi", "brats", "fastmri")
) -> dict[str, Any]:
    """``root/{ixi,brats,fastmri}`` as downloaded; returns what was written, per dataset and group."""
    generated = root / "generated"
    sites = [
        demo_site(f"ixi-{h}", "ixi", hospital=h, demo={"subjects": subjects, "seed": k})
        for k, h in enumerate(("HH", "Guys", "IOP"))
    ]
    sites.append(demo_site("brats", "brats", demo={"subjects": 2 * subjects, "seed": 5}))
    sites += [
        demo_site(
            f"fastmri-{name}",
            "fastmri",
            contrasts=spec["contrasts"],
            demo={"subjects": subjects, "seed": 7 + k},
            scanner={"field_strength_t": spec["field_strength_t"], "coils": spec["coils"]},
        )
        for k, (name, spec) in enumerate(FASTMRI_SCANNERS.items())
    ]
    written = generate_demo(generated, size=size, seed=0, sites=[s for s in sites if s.dataset in datasets])
    layout: dict[str, Any] = {"ixi": {}, "fastmri": {}, "brats": []}
    for hospital in ("HH", "Guys", "IOP") if "ixi" in datasets else ():
        info = written[f"ixi-{hospital}"]
        layout["ixi"][hospital] = info["subjects"]
        for name in info["files"]:
            contrast = name.split("-")[-1].split(".")[0]
            _move(Path(info["folder"]) / name, root / "ixi" / f"IXI-{contrast}" / name)
    for scanner in FASTMRI_SCANNERS if "fastmri" in datasets else ():
        info = written[f"fastmri-{scanner}"]
        layout["fastmri"][scanner] = info["files"]
        for name in info["files"]:
            dst = root / "fastmri" / "multicoil_train" / name
            _move(Path(info["folder"]) / name, dst)
            set_scanner(dst, "SIEMENS", scanner.capitalize())
    for subject in written["brats"]["subjects"] if "brats" in datasets else ():
        _move(Path(written["brats"]["folder"]) / subject, root / "brats" / subject)
        layout["brats"].append(subject)
    shutil.rmtree(generated)
    return layout


def set_scanner(path: Path, vendor: str, model: str, field_t: float | None = None) -> None:
    """Rewrite the vendor and model (and optionally the field) in a file's ISMRMRD header, as scanners write them."""
    with h5py.File(path, "r+") as f:
        root = ET.fromstring(f["ismrmrd_header"][()])
        system = root.find(f"{{{ISMRMRD_NAMESPACE}}}acquisitionSystemInformation")
        assert system is not None
        for tag, value in (("systemVendor", vendor), ("systemModel", model), ("systemFieldStrength_T", field_t)):
            if value is not None:
                element = system.find(f"{{{ISMRMRD_NAMESPACE}}}{tag}")
                assert element is not None
                element.text = str(value)
        ET.register_namespace("", ISMRMRD_NAMESPACE)
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _move(src: Path, dst: Path) -> None:
    if dst.exists():
        raise AssertionError(f"{dst}: two demo files share a name; change a demo seed")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
