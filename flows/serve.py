"""serve: the sampling page for a trained run, in the browser.

    python -m flows.serve --config configs/demo.yaml [--set run.name=...] [--host 127.0.0.1 --port 8765]
        [--checkpoint DIR]

Loads the run's latest EMA checkpoint (or `--checkpoint`) once, then serves a page to draw from it:
tag prompt with completion, negative prompt, CFG, sampler, steps, seed, images, img2img upload.
Images go to `<run>/samples-web/`. It listens on 127.0.0.1 unless told otherwise and has no
authentication: expose it only on networks you trust.
"""

from __future__ import annotations

import argparse
import logging

from tagdit.orchestrate.cli import config_parser, parse_config

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    p: argparse.ArgumentParser = config_parser("Serve a page that draws images from the trained DiT.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--checkpoint", default=None, help="checkpoint or run dir (default: <run>/dit latest EMA)")
    a = p.parse_args(argv)
    cfg = parse_config(a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import uvicorn

    from tagdit.web.app import create_app
    from tasks.records import painter_for_run

    painter = painter_for_run(cfg, a.checkpoint)
    app = create_app(painter, cfg.run_dir / "samples-web")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the page", a.host)
    log.info("%s on %s: http://%s:%d/", painter.checkpoint, painter.device, a.host, a.port)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
