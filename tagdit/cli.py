"""Command-line entry shared by every flow module: `--config FILE [--set key=value ...]`."""

from __future__ import annotations

import argparse
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
    return p


def parse_config(args: argparse.Namespace) -> PipelineConfig:
    """Validate early so a bad key fails before any Prefect machinery starts."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def flow_main(flow: Callable[..., Any], description: str, argv: list[str] | None = None) -> Any:
    """Run `flow(config=..., overrides=...)` from the command line."""
    args = config_parser(description).parse_args(argv)
    parse_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return flow(config=args.config, overrides=args.overrides)
