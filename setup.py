"""Build hook beside pyproject.toml (which holds everything else): what a wheel carries.

An editable install (`make venv`, `pip install -e .`) maps the clone's four packages: tagdit, flows,
tasks, models. A wheel (`pip install .`, `pip wheel .`) carries the library `tagdit` with the presets
(configs/*.yaml as tagdit/configs/) and never the top floors' generic names flows/tasks/models:
there `tagdit` refuses with one line saying how to install from the clone (tagdit/__main__.py).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CLONE_ONLY = ("flows", "tasks", "models")  # top-level names that must not land in site-packages


class BuildPy(build_py):
    """A wheel: tagdit and its presets only; an editable build: every package, mapped to the clone."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.editable_mode:
            self.packages = [p for p in self.packages if p.split(".")[0] not in CLONE_ONLY]

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            found = sorted(Path("configs").glob("*.yaml"))
            if not found:
                raise SystemExit("setup.py: no presets in configs/*.yaml to carry (an sdist without MANIFEST.in?)")
            presets = Path(self.build_lib, "tagdit", "configs")
            presets.mkdir(parents=True, exist_ok=True)
            for f in found:
                shutil.copyfile(f, presets / f.name)


setup(cmdclass={"build_py": BuildPy})
