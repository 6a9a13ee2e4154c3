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
    """Run `flow(config=..., overrides=..., [force=...])` from the command line; print its summary."""
    args = config_parser(description).parse_args(argv)
    parse_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kwargs: dict[str, Any] = {"config": args.config, "overrides": args.overrides}
    fn = getattr(flow, "fn", flow)
    if args.force:
        if "force" not in inspect.signature(fn).parameters:
            print("error: this flow has no stages to force", file=sys.stderr)
            raise SystemExit(2)
        kwargs["force"] = args.force
    result = flow(**kwargs)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return result
