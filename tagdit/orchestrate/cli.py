"""Command-line entry shared by every flow module: `--config FILE [--set key=value ...]`."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from tagdit.config import ConfigError, PipelineConfig, load_config


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML preset, e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set data.source=/my/images (repeatable)",
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage and every stage after it, ignoring caches (repeatable)",
    )
    return p


def parse_config(args: argparse.Namespace) -> PipelineConfig:
    """Validate early so a bad key fails before any Prefect machinery starts."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def flow_main(flow: Callable[..., Any], description: str, argv: list[str] | None = None) -> Any:
    """Run `flow(config=..., overrides=..., force=..., [--flag ...])` from the command line; print its summary.

    Every flow takes `config`, `overrides` and `force`; a flow's extra boolean parameters (such as
    evaluate's `nightly`) become `--flag` options.
    """
    fn = getattr(flow, "fn", flow)
    parser = config_parser(description)
    extras = [name for name, p in inspect.signature(fn).parameters.items()
              if name not in ("config", "overrides", "force") and p.annotation in (bool, "bool")]
    for name in extras:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true")
    args = parser.parse_args(argv)
    parse_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kwargs: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "force": args.force or None,
                              **{name: getattr(args, name) for name in extras}}
    result = flow(**kwargs)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return result
