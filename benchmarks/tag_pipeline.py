"""Tag stage throughput vs a bare onnxruntime `session.run` loop on ready-made inputs, same model.

Ours: the whole tag stage on 512 source images of 96 px (parquet read, each crop's square read and
decoded from its source file, WD preprocessing in a thread pool overlapped with inference, one
single-threaded onnxruntime run per core, tag selection, parquet write). Baseline: the same model in
a default session (every core per run) over already-preprocessed batches of the same size. Model: the demo tagger
(shards/demo-tagger) when built, else the demo tagger's architecture untrained (same compute),
else the tests' tiny WD-interface model.

Rounds alternate between the two (ours re-tags every chunk with `force`); the median counts.

    .venv/bin/python benchmarks/tag_pipeline.py [--n 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_dir(tmp: Path) -> tuple[Path, str]:
    """(folder with model.onnx + selected_tags.csv, description)."""
    demo = ROOT / "shards" / "demo-tagger"
    if (demo / "model.onnx").is_file() and (demo / "selected_tags.csv").is_file():
        return demo, "demo tagger (shards/demo-tagger)"
    from tagdit.demo.stand_in_taggers import TAGS, build_wd_model

    folder = build_wd_model(tmp / "wd")
    try:  # the demo tagger's network, untrained: same cost per image as the real demo tagger
        from tagdit.demo.tagger import DemoCNN, export_onnx

        export_onnx(DemoCNN(len(TAGS)), folder / "model.onnx")
        return folder, "demo-tagger architecture (untrained export)"
    except Exception as e:  # noqa: BLE001 - fall back to the tiny fixture model
        print(f"demo tagger architecture unavailable ({e}); using the tiny fixture model")
        return folder, "tiny WD-interface fixture"


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).ellipse([20, 20, 76, 76], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:05d}.png")


def bare_loop(sess, n: int, batch: np.ndarray, fixed: int | None) -> float:
    """Seconds for n images through `session.run` on ready-made input batches."""
    name = sess.get_inputs()[0].name
    step = fixed or len(batch)
    sess.run(None, {name: batch[:step]})  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        sess.run(None, {name: batch[:step]})
        done += step
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides (e.g. tagger.resize=torch)")
    args = ap.parse_args()
    import onnxruntime as ort

    from tagdit.config import load_config
    from tagdit.data.onnx_session import default_providers
    from tagdit.data.tagger import WDTagger
    from tasks.crop import crop_stage
    from tasks.tag import tag_stage

    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, what = model_dir(tmp)
        make_images(tmp / "src", args.n)
        cfg = load_config(None, [f"data.source={tmp / 'src'}", f"data.root={tmp / 'shards'}", "data.resolution=64",
                                 f"tagger.path={folder}", *args.set])
        crop = crop_stage(cfg)
        tagger = WDTagger.from_config(cfg.tagger)
        imgs = [Image.new("RGB", (64, 64), (i, 255 - i, 128)) for i in range(cfg.tagger.batch_size)]  # the peer: one run of all
        batch = np.stack([tagger.preprocess(im) for im in imgs])  # (B, 448, 448, 3)
        list(tagger.probabilities(imgs))  # load the onnxruntime kernels once in this process
        sess = ort.InferenceSession(str(tagger.model_path), providers=default_providers())  # onnxruntime's defaults
        for r in range(args.rounds):  # alternating: drift and background load hit both alike
            t0 = time.perf_counter()
            rec = tag_stage(cfg, crop, force=True)  # every chunk again, its own session as in a run
            rates["ours"].append(args.n / (time.perf_counter() - t0))
            assert rec.info["tagged"] == args.n
            rates["baseline"].append(args.n / bare_loop(sess, args.n, batch, tagger.fixed_batch))
            print(f"round {r}: ours {rates['ours'][-1]:.1f} img/s, baseline {rates['baseline'][-1]:.1f} img/s",
                  flush=True)
    ours, base = (statistics.median(rates[k]) for k in ("ours", "baseline"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; model: {what}; "
          f"batch {cfg.tagger.batch_size} ({tagger.runs} runs x {tagger.batch_size}); overrides {args.set or 'none'}; "
          f"{args.n} images per round, median of {args.rounds}")
    print(f"RESULT tag_pipeline ours={ours:.1f} img/s baseline={base:.1f} ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
