"""serve: the sampling page for a trained run, in the browser.

    python -m flows.serve --config configs/demo.yaml [--set run.name=...] [--host 127.0.0.1 --port 8765]
        [--checkpoint DIR]
    python -m flows.serve --model DIR|USER/NAME [--samples-dir samples-web]   # an exported model (flows.export)

Loads the run's latest EMA checkpoint (or `--checkpoint`, or the exported folder `--model`) once, then
serves a page to draw from it: tag prompt with completion, negative prompt, CFG, sampler, steps, seed,
images, img2img upload, with step progress and cancel; a reload lists earlier batches. Images go
to `--samples-dir`, by default `<run>/samples-web/` (with `--model`: `./samples-web/`). It listens
on 127.0.0.1 unless told otherwise and has no authentication: expose it only on networks you trust.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flows import outside_flow_runs
from flows.sample import add_model_options, painter_from_args
from tagdit.orchestrate.cli import config_parser, parse_config

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    outside_flow_runs()
    p: argparse.ArgumentParser = config_parser("Serve a page that draws images from the trained DiT.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--checkpoint", default=None, help="checkpoint or run dir (default: <run>/dit latest EMA)")
    add_model_options(p)
    p.add_argument("--samples-dir", default=None, metavar="DIR",
                   help="where drawn images go (default: <run>/samples-web, or ./samples-web with --model)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import uvicorn

    from tagdit.web.app import create_app

    painter = painter_from_args(p, a)
    samples = a.samples_dir or (Path("samples-web") if a.model else parse_config(a).run_dir / "samples-web")
    app = create_app(painter, Path(samples))
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the page", a.host)
    log.info("%s on %s: http://%s:%d/", painter.checkpoint, painter.device, a.host, a.port)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
