"""The YAML presets by name (`demo` -> configs/demo.yaml): the clone's configs/, or the copy a wheel carries.

Needs nothing but the standard library, so a wheel install (tagdit alone, setup.py) finds them too.
"""

from __future__ import annotations

from pathlib import Path

from tagdit import CLONE

PRESETS_DIR = CLONE / "configs" if CLONE else Path(__file__).resolve().parent / "configs"


def preset_path(name: str) -> Path | None:
    """`<presets>/<name>.yaml` when `name` is a bare preset name that exists, else None."""
    if "/" in name or "\\" in name or name.endswith((".yaml", ".yml")):
        return None
    p = PRESETS_DIR / f"{name}.yaml"
    return p if p.is_file() else None
