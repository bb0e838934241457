"""Get one site container ready for its SuperNode: choose real or demo data, write the site config.

``/data`` is the site's own volume, mounted read-only: a site never writes or re-owns its data.
Anything in it besides ``demo/`` (and ``lost+found``) is taken as the hospital's real data: the
config then points at ``/data``. Otherwise ``/data/demo/<site>`` must hold complete demo data,
written beforehand by the one-shot ``demo-data`` role (``--generate-demo``: ``fedsense data demo``
for this site only, once; a marker file says it completed). Prints the rendered config's path.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

from common.config import load_site_config

logger = logging.getLogger("fedsense.site")

IGNORED = {"demo", "lost+found"}


def render(template: Path, data_path: Path, out: Path) -> Path:
    """The template with ``data_path`` pointing at the container's data; validated before use."""
    config = tomllib.loads(template.read_text(encoding="utf-8"))
    config["data_path"] = str(data_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tomli_w.dumps(config), encoding="utf-8")
    load_site_config(out)  # a ConfigError names the field now, not inside the first round
    return out


def demo_data(config: Path, demo_root: Path, size: str | None, subjects: str | None) -> None:
    """``fedsense data demo`` for this one site, unless an earlier start completed it."""
    name = load_site_config(config).name
    marker = demo_root / f".{name}.complete"
    if marker.exists():
        logger.info("reusing demo data in %s", demo_root / name)
        return
    cmd = ["fedsense", "data", "demo", "--out", str(demo_root), "--site-config", str(config)]
    if size:
        cmd += ["--size", size]
    if subjects:
        cmd += ["--subjects", subjects]
    logger.info("no data mounted: generating demo data (%s)", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    marker.touch()


def main(argv: list[str] | None = None) -> int:
    """``prepare_site.py --site site-a`` prints the config path for ``--site-config``."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", required=True)
    parser.add_argument(
        "--template",
        type=Path,
        default=os.environ.get("FEDSENSE_SITE_CONFIG"),
        help="site TOML (default: $FEDSENSE_SITE_CONFIG, else the image's deploy/sites/SITE.toml)",
    )
    parser.add_argument("--data", type=Path, default=Path("/data"))
    parser.add_argument("--out", type=Path, default=Path.home() / "site.toml")
    parser.add_argument(
        "--generate-demo",
        action="store_true",
        help="write demo data into an empty --data (the demo-data role; sites never do)",
    )
    args = parser.parse_args(argv)

    template = (
        args.template
        or Path(os.environ.get("FEDSENSE_APP", "/opt/fedsense-app")) / "deploy/sites" / f"{args.site}.toml"
    )
    real = sorted(p.name for p in args.data.iterdir() if p.name not in IGNORED) if args.data.is_dir() else []
    if real:
        logger.info("using the data mounted at %s (%d entries; no demo data)", args.data, len(real))
        config = render(template, args.data, args.out)
    else:
        demo_root = args.data / "demo"
        name = tomllib.loads(template.read_text(encoding="utf-8"))["name"]
        config = render(template, demo_root / name, args.out)
        if args.generate_demo:
            demo_data(config, demo_root, os.environ.get("FEDSENSE_DEMO_SIZE"), os.environ.get("FEDSENSE_DEMO_SUBJECTS"))
        elif not (demo_root / f".{name}.complete").exists():
            logger.error(
                "%s holds no data: mount the site's data there (read-only), or run the demo-data "
                "role first for demo data",
                args.data,
            )
            return 1
    print(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
