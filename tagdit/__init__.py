"""tagdit: a Prefect pipeline that trains a tag-conditioned latent Diffusion Transformer.

The library, in layers that import only downward: orchestrate/ (Prefect glue) · evaluation/, web/ ·
train/ · sampling/ · demo/ · data/ · formats/ · config, files, devices. It never imports tasks/ or
flows/ (but for __main__.py, the `tagdit` command's door); models/ (pure torch) is below all of it
(docs/design.md §1). `tagdit.from_pretrained` loads an exported model (tagdit.sampling.pretrained).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tagdit.sampling.pretrained import TagDiT

__version__ = "0.1.0"

# The clone this package runs from (an editable install), or None: a wheel carries tagdit alone (setup.py).
CLONE: Path | None = Path(__file__).resolve().parents[1]
if not ((CLONE / "pyproject.toml").is_file() and (CLONE / "flows" / "command.py").is_file()):
    CLONE = None
CLONE_ONLY = ("this install holds the tagdit library and its presets only; the pipeline runs from a clone "
              "of the repository, installed editable: `git clone <repository> && cd tagdit && make venv` "
              "(or `pip install -e .` there)")

# The project's modules log progress at INFO; Prefect's default root level is WARNING.
for _name in ("tagdit", "tasks", "models", "flows"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)


def from_pretrained(path_or_repo: str | Path, **kwargs: Any) -> TagDiT:
    """An exported model from a folder or Hub repo id, ready to draw: `tagdit.sampling.pretrained.from_pretrained`
    (imported when called, so `import tagdit` stays light)."""
    from tagdit.sampling.pretrained import from_pretrained as load

    return load(path_or_repo, **kwargs)
