"""The JSON schema of one `key=value` override, so that the Prefect server checks the keys.

The server validates a new run's parameters against the flow's JSON schema (it runs no Python), so
the config's keys are spelled out as patterns, section by section: `dit.train.stpes=5` is refused
at `prefect deployment run`, before a worker starts, with the closest key when one is near:
"'dit.train.stpes=5' does not match '^\\s*dit\\.train\\.steps(\\.|\\s*=)'"; else the message lists the
section's keys. Renamed keys (`tagdit.overrides.RENAMED`) still pass: they load with a warning.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from tagdit.overrides import RENAMED

END = r"(\.|\s*=)"  # a deeper key, or the value


def _near(name: str) -> str:
    """A regex for the misspellings of `name` within two edits of one spot (swapped, missing, extra, wrong)."""
    spots = {name[:i] + r"\w{0,3}" + name[i + 2:] for i in range(max(1, len(name) - 1))}
    return "(" + "|".join(sorted(spots)) + ")"


def _section(prefix: str, names: list[str]) -> dict[str, Any]:
    """`prefix` must be followed by one of `names`; a key that is not, but is near one, is refused naming it."""
    start = r"^\s*" + re.escape(prefix)
    known = {"pattern": start + "(" + "|".join(sorted(names)) + ")" + END}
    hints = [{"if": {"pattern": start + _near(n) + END}, "then": {"pattern": start + n + END}} for n in sorted(names)]
    # the hints first: the server reports the first of equally deep errors
    return {"allOf": [{"if": {"not": known}, "then": {"allOf": hints}}, known]}


def override_json_schema(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """The schema of a `key=value` string whose key is a field of `model` at each level (sections recursively)."""
    names = [*model.model_fields, *(old for (section, old) in RENAMED if section == prefix.rstrip("."))]
    schema = _section(prefix, names)
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sub = override_json_schema(field.annotation, f"{prefix}{name}.")
            schema["allOf"].append({"if": {"pattern": r"^\s*" + re.escape(f"{prefix}{name}.")}, "then": sub})
    return schema if prefix else {"type": "string", **schema}
