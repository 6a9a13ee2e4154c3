"""Command-line entry shared by every flow module: `--config PRESET [--set key=value ...] [--force STAGE]`.

A flow's typed parameters (tagdit.orchestrate.params) become options of the same name and help
(`dit_steps` -> `--dit-steps`), with the same choices and bounds as Prefect's run form.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

from tagdit.config import ConfigError, PipelineConfig
from tagdit.orchestrate.params import Unset, flow_config, stage_spelling, typed_settings

COMMON = ("config", "overrides", "force")


class _Defaults(argparse.HelpFormatter):
    """Help that ends each option with its default, when it has one to show (not None, a flag's False, "" or [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d in ("", []) or "default" in text \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _stage_name(text: str) -> str:
    """A stage name for --force; an earlier spelling (train_dit) is taken with a hint."""
    name = stage_spelling(text)
    if name != text:
        print(f"note: stage {text!r} is spelled {name!r}", file=sys.stderr)
    return name


def config_parser(description: str, stages: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """`--config` and `--set`, and `--force` with `stages` as its choices when given."""
    p = argparse.ArgumentParser(description=description, formatter_class=_Defaults)
    p.add_argument("--config", default=None, help="preset name (demo, original-256) or a YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set data.source=/my/images (repeatable)",
    )
    if stages:
        p.add_argument("--force", action="append", default=[], choices=stages, metavar="STAGE", type=_stage_name,
                       help=f"recompute this stage and every stage after it (repeatable; one of {', '.join(stages)})")
    return p


def parse_config(args: argparse.Namespace, **settings: Any) -> PipelineConfig:
    """Validate early so a bad key fails before any Prefect machinery starts."""
    try:
        return flow_config(args.config, args.overrides, **settings)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """`Annotated[int | None, Field(ge=1)]` -> (int, [Field(ge=1)]): the plain type and its constraints."""
    meta: list[Any] = []
    while True:
        if typing.get_origin(annotation) is Annotated:
            meta += list(annotation.__metadata__)
            annotation = annotation.__origin__
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None) and a != Unset]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation, meta


def _checked(kind: type, meta: list[Any]) -> Callable[[str], Any]:
    """An argparse `type` that checks the bounds (ge/le) and the pattern the Prefect form checks."""
    bounds = {m.__class__.__name__: getattr(m, m.__class__.__name__.lower(), None)
              for field in meta for m in getattr(field, "metadata", [])}
    pattern = next((m.pattern for m in meta if getattr(m, "pattern", None)), None)

    def convert(text: str) -> Any:
        if pattern and not re.search(pattern, text):
            raise argparse.ArgumentTypeError(f"{text!r} does not match {pattern}")
        value = kind(text)
        if bounds.get("Ge") is not None and value < bounds["Ge"]:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {bounds['Ge']}")
        if bounds.get("Le") is not None and value > bounds["Le"]:
            raise argparse.ArgumentTypeError(f"{value} is above the maximum {bounds['Le']}")
        return value

    convert.__name__ = kind.__name__
    return convert


def arg_type(annotation: Any) -> Callable[[str], Any]:
    """An argparse `type` for a typed parameter (`Steps`, `GuidanceScale`, ...): the same bounds as the run form."""
    kind, meta = _unwrap(annotation)
    return _checked(kind, meta)


def _add_option(parser: argparse.ArgumentParser, name: str, annotation: Any, help_text: str, required: bool) -> None:
    kind, meta = _unwrap(annotation)
    flag = f"--{name.replace('_', '-')}"
    if kind is bool:
        parser.add_argument(flag, dest=name, action="store_true", help=help_text)
    elif typing.get_origin(kind) is Literal:
        parser.add_argument(flag, dest=name, choices=typing.get_args(kind), required=required, help=help_text)
    else:
        parser.add_argument(flag, dest=name, type=_checked(kind if kind in (int, float) else str, meta),
                            required=required, help=help_text)


def _stage_choices(annotation: Any) -> tuple[str, ...]:
    """The Literal stage names of `force: list[...] | None`."""
    kind, _ = _unwrap(annotation)
    item, _ = _unwrap(typing.get_args(kind)[0]) if typing.get_args(kind) else (None, [])
    return typing.get_args(item) if typing.get_origin(item) is Literal else ()


def flow_parser(flow: Callable[..., Any], description: str) -> tuple[argparse.ArgumentParser, list[str]]:
    """The flow's command line from its signature and docstring; returns the parser and its extra options."""
    from prefect.utilities.callables import parameter_docstrings

    fn = getattr(flow, "fn", flow)
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn, include_extras=True) if params else {}
    parser = config_parser(description, _stage_choices(hints["force"]) if "force" in hints else None)
    docs = parameter_docstrings(inspect.getdoc(fn))
    extras = [name for name, p in params.items() if name not in COMMON
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in extras:
        _add_option(parser, name, hints.get(name, str), docs.get(name, ""), params[name].default is params[name].empty)
    return parser, extras


def flow_main(flow: Callable[..., Any], description: str, argv: list[str] | None = None) -> Any:
    """Run the flow with its parameters from the command line; print its summary."""
    parser, extras = flow_parser(flow, description)
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in extras}
    parse_config(args, **typed_settings(options))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kwargs: dict[str, Any] = {"config": args.config, "overrides": args.overrides,
                              **{k: v for k, v in options.items() if v is not None}}
    if getattr(args, "force", None):
        kwargs["force"] = args.force
    result = flow(**kwargs)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return result
