"""The base of every config section and the folder-setting type (`tagdit.config` composes the sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from tagdit.stores import location

# a folder setting: a plain path, or a URL (s3://, gs://, hf://, file://) worked on in a local copy (tagdit.stores)
Location = Annotated[Path | str, BeforeValidator(location)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
