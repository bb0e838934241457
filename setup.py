"""Build hook: the files ``fedsense`` reads at run time that live outside the packages go into the wheel.

A hospital installs a wheel, not a clone. ``fedsense simulate`` needs a Flower app directory (this
pyproject.toml: components, run-config defaults) and ``fedsense data demo`` the example site configs
(deploy/sites/*.toml). They are copied at build time into ``server/flwr_app/`` and
``common/data/demo_sites/`` so the repository's files stay the single source; a checkout uses them
in place (see :func:`server.simulate.find_project_dir`, :func:`common.data.demo.default_site_files`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# (source files, destination package folder inside the build)
SHIPPED = (
    (sorted((ROOT / "deploy" / "sites").glob("*.toml")), Path("common/data/demo_sites")),
    ([ROOT / "pyproject.toml"], Path("server/flwr_app")),
)


class BuildWithRuntimeFiles(build_py):
    """``build_py`` that also copies the run-time files listed in :data:`SHIPPED` into the build."""

    def run(self) -> None:
        super().run()
        for sources, destination in SHIPPED:
            if not sources:
                raise FileNotFoundError(f"{destination}: no source files to ship")
            target = Path(self.build_lib) / destination
            target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                shutil.copy2(source, target / source.name)
        # The packaged app holds no code (its components import the installed packages), so its FAB
        # includes only the pyproject; flwr refuses include patterns that match nothing.
        app = Path(self.build_lib) / "server/flwr_app/pyproject.toml"
        text = re.sub(r"(?m)^fab-include = .*$", 'fab-include = ["pyproject.toml"]', app.read_text(encoding="utf-8"))
        app.write_text(text, encoding="utf-8")


setup(cmdclass={"build_py": BuildWithRuntimeFiles})
