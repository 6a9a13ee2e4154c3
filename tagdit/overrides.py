"""`key.path=value` overrides on a config tree, and the keys that were renamed or retired.

Used by `tagdit.config.load_config`: each override is checked level by level against the config
models (an unknown key is refused naming the closest one), and a renamed key of an older config or
command line loads under its new name with a warning.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import yaml
from pydantic import BaseModel

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: numbers, lists, null, strings)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


# Keys that were renamed (section, old key) -> new key: the old spelling loads, with a warning;
# None: a key that no longer does anything (dropped, with a warning).
RENAMED = {("evaluate", "cfg"): "cfg_scale", ("crop", "chunk_size"): None}


def rename_keys(tree: dict) -> None:
    """Move renamed keys of a config tree (a YAML file, or an override's path) to their new names."""
    for (section, key), new in RENAMED.items():
        if isinstance(node := tree.get(section), dict) and key in node:
            value = node.pop(key)
            if new is None:
                log.warning("config key %s.%s does nothing now (data.buckets are the units): ignored", section, key)
            else:
                log.warning("config key %s.%s is spelled %s.%s now", section, key, section, new)
                node[new] = value


def apply_override(tree: dict, parts: list[str], value: Any, root: type[BaseModel]) -> None:
    """Set a dotted key in a nested dict, checking each level against the config model `root`."""
    if len(parts) == 2 and (parts[0], parts[1]) in RENAMED:
        probe = {parts[0]: {parts[1]: value}}
        rename_keys(probe)  # warns
        if not probe[parts[0]]:
            return
        parts = [parts[0], next(iter(probe[parts[0]]))]
    model: type[BaseModel] | None = root
    node = tree
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if model is not None and part not in model.model_fields:
            close = difflib.get_close_matches(part, model.model_fields, n=1)
            guess = f"did you mean {'.'.join([*parts[:i], close[0]])!r}? " if close else ""
            raise ConfigError(f"unknown config key {dotted!r}; {guess}valid: {sorted(model.model_fields)}")
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if isinstance(child, str) or child is None:  # a preset name becomes preset + overrides
            child = {"preset": child} if isinstance(child, str) else {}
            node[part] = child
        node = child
        ann = model.model_fields[part].annotation if model is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
