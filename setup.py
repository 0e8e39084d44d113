"""Build hook (everything else is in pyproject.toml): the wheel carries the Hydra configs (conf/) and
the data contract (data_schemas/) inside the package, as ``convcg_cli/_bundled/``, so an installed
``convcg`` runs from any directory. A source checkout reads them from the repository root instead
(``convcg_cli.resources``)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("conf", "data_schemas")


class BuildPyWithResources(build_py):
    """``build_py`` plus a copy of each ``BUNDLED`` directory into the built package."""

    def run(self) -> None:
        super().run()
        root = Path(__file__).resolve().parent
        for name in BUNDLED:
            target = Path(self.build_lib) / "convcg_cli" / "_bundled" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / name, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithResources})
