"""Tag stage throughput at the real tagger's cost per image vs a bare onnxruntime `session.run` loop.

The real WD 1.4 MOAT tagger cannot be downloaded here, so this builds, offline, a model with its
interface and roughly its cost: a ConvNeXt-T-sized network (depths 3-3-9-3, widths 96-768, 35.7
GFLOP per 448 px image, counted with torch's FlopCounterMode) with random weights, exported with
torch.onnx: NHWC float32 [N, 448, 448, 3] BGR in, dynamic batch, one sigmoid score per tag of a
9,083-row selected_tags.csv out (each tag's logit rescaled over calibration images so that scores
cross the thresholds as a trained tagger's do; tagdit/demo/stand_in_taggers.py).

Ours: the whole tag stage (default settings: the reference recipe with Pillow's resize, full-size
decoding) over `--n` generated drawings of mixed sizes (512 px to 3000 x 2000, JPEG and PNG):
parquet read, each crop's square decoded from its source file, preprocessing in a thread pool
overlapped with inference, tag selection, parquet write, and the session load a run pays.
Baseline: the same model file in a session with onnxruntime's default options (every core per run),
`session.run` in a loop over ready, preprocessed batches, each round the faster of two batch sizes
(`tagger.batch_size`, and the images ours has in flight at once: `cpu_batch_size` per run x runs), the
session loaded and warmed up untimed and closed before ours runs. Rounds alternate; the median counts.

Then the recipe's opt-ins on this pixel-sensitive model (`--effect-images` of the same drawings):
max score change and tag flips at the 0.35 / 0.85 thresholds against the reference recipe, for
`tagger.resize=torch`, `tagger.pre_shrink=true` and both.

    .venv/bin/python benchmarks/tag_pipeline_realcost.py [--n 32] [--rounds 5] [--effect-images 16]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_GENERAL, N_CHARACTER = 7000, 2079  # + 4 ratings = 9,083 rows, the size of the v2 taggers' lists
SIZES = [(640, 480, "JPEG"), (1024, 1024, "PNG"), (1200, 1800, "JPEG"), (2000, 1500, "JPEG"),
         (800, 1100, "PNG"), (3000, 2000, "JPEG"), (512, 512, "PNG"), (1500, 1000, "JPEG")]  # fmt: skip


def convnext_t(n_out: int):
    """A ConvNeXt-T-sized network (Liu et al. 2022): patchify stem, 7x7 depthwise blocks with a 4x MLP."""
    import torch
    from torch import nn

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):  # (N, C, H, W), normalised over C
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Block(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):  # (N, C, H, W)
            return x + self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    torch.manual_seed(0)  # the same random weights every run: the recipe effect below repeats
    depths, dims = (3, 3, 9, 3), (96, 192, 384, 768)
    layers: list = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0])]  # (N, 96, 112, 112)
    for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        if i:
            layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
        layers += [Block(dim) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], n_out)]
    return nn.Sequential(*layers).eval()


def gflop_per_image(net) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, 448, 448))
    return counter.get_total_flops() / 1e9


def make_images(folder: Path, n: int) -> list[Path]:
    """`n` drawings cycling through SIZES (JPEG q90 / PNG)."""
    from tagdit.demo.stand_in_taggers import drawn_image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h, fmt = SIZES[i % len(SIZES)]
        path = folder / f"{i:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
        drawn_image(rng, w, h).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def bare_loop(model: Path, n: int, batch: np.ndarray) -> tuple[float, float]:
    """(images/s, core-seconds per image) through `session.run` on a ready-made input batch, >= n images.

    A session with onnxruntime's default options, loaded and warmed up untimed, and closed before the
    function returns: its pool's threads spin between runs (the default), so a session left alive would
    slow whatever runs next in the process (it cost the tag stage ~25 % of its pace when it was kept).
    """
    import onnxruntime as ort

    from tagdit.data.onnx_session import default_providers

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=default_providers())
    name = sess.get_inputs()[0].name
    sess.run(None, {name: batch})  # warm-up: the arena grows to the batch's size
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    while done < n:
        sess.run(None, {name: batch})
        done += len(batch)
    rate, core_s = done / (time.perf_counter() - t0), (time.process_time() - c0) / done
    del sess
    return rate, core_s


def recipe_effect(model: Path, paths: list[Path]) -> None:
    """Scores and tag flips of the opt-in recipes against the reference, on this model."""
    from PIL import Image

    from tagdit.data.tag import source_square
    from tagdit.data.tagger import WDTagger
    from tagdit.formats.wd_image import wd_preprocess, wd_preprocess_torch

    tagger = WDTagger.from_dir(model, batch_size=4)

    def square(path: Path, shrink: bool) -> Image.Image:
        with Image.open(path) as im:
            w, h = im.size
        side = max(w, h)  # the pad box: the whole image on a white square, as tagger.preprocess pads
        box = [(w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side]
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        return source_square(path, sha, [w, h], box, 448 if shrink else None)

    variants = {"reference": (False, wd_preprocess), "resize=torch": (False, wd_preprocess_torch),
                "pre_shrink": (True, wd_preprocess), "pre_shrink+resize=torch": (True, wd_preprocess_torch)}
    probs = {}
    for name, (shrink, prep) in variants.items():
        x = np.stack([prep(square(p, shrink), 448) for p in paths])  # (n, 448, 448, 3)
        probs[name] = np.concatenate([tagger.predict(x[i:i + 4]) for i in range(0, len(x), 4)])  # (n, T)
    ref = probs.pop("reference")
    cats = tagger.labels.category_of()
    is_char = np.array([cats[n] == 4 for n in tagger.names])
    thr = np.where(is_char, 0.85, 0.35)
    kept = ref > thr
    print(f"recipe effect on this pixel-sensitive model, {len(paths)} drawings, {ref.shape[1]} tags "
          f"({int(kept.sum())} tags selected by the reference):")
    for name, p in probs.items():
        d = np.abs(p - ref)
        flips = (p > thr) != kept
        print(f"  {name:24s} max |score change| {d.max():.4f}, mean {d.mean():.5f}, p99.99 "
              f"{np.quantile(d, 0.9999):.4f}; tag flips {int(flips.sum())} of {flips.size} "
              f"(images with any flip: {int(flips.any(1).sum())}); rating changed: "
              f"{int((p[:, :4].argmax(1) != ref[:, :4].argmax(1)).sum())}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--effect-images", type=int, default=16, help="0 skips the recipe-effect part")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for ours (tagger.*)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from PIL import Image

    from tagdit.config import load_config
    from tagdit.data.tagger import WDTagger
    from tagdit.demo.stand_in_taggers import export_wd_model
    from tagdit.formats.wd_image import wd_preprocess
    from tasks.crop import crop_stage
    from tasks.tag import tag_stage

    t_setup = time.perf_counter()
    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "src", max(args.n, args.effect_images))
        net = convnext_t(4 + N_GENERAL + N_CHARACTER)
        gflop = gflop_per_image(net)
        x = np.stack([wd_preprocess(Image.open(p), 448) for p in paths[:8]])  # calibration (8, 448, 448, 3)
        model = export_wd_model(net, tmp / "wd", N_GENERAL, N_CHARACTER, x)
        del net
        for p in paths[args.n:]:
            p.rename(tmp / p.name)  # only --n images in the stage's folder
        cfg = load_config(None, [f"data.source={tmp / 'src'}", f"data.root={tmp / 'shards'}", "data.resolution=64",
                                 f"tagger.path={model}", *args.set])
        crop = crop_stage(cfg)
        tagger = WDTagger.from_config(cfg.tagger)  # the stage's own is loaded in each round, as in a run
        runs, run_batch = tagger.runs, tagger.batch_size
        del tagger
        sizes = sorted({cfg.tagger.batch_size, runs * run_batch})  # the bare loop's batch: the faster of these
        batch = np.stack([wd_preprocess(Image.open(paths[i % args.n]), 448) for i in range(max(sizes))])  # (B, 448, 448, 3)
        print(f"setup {time.perf_counter() - t_setup:.0f} s: model {gflop:.1f} GFLOP/image, "
              f"{4 + N_GENERAL + N_CHARACTER} tags; baseline batch {sizes} (the faster), ours {runs} x {run_batch}; "
              f"overrides {args.set or 'none'}", flush=True)
        cpu: dict[str, list[float]] = {"ours": [], "baseline": []}  # core-s per image: steadier on a busy machine
        for r in range(args.rounds):  # alternating: drift and background load hit both alike
            t0, c0 = time.perf_counter(), time.process_time()
            rec = tag_stage(cfg, crop, force=True)  # every chunk again, with its own session load, as in a run
            rates["ours"].append(args.n / (time.perf_counter() - t0))
            cpu["ours"].append((time.process_time() - c0) / args.n)
            assert rec.info["tagged"] == args.n
            rate, core_s = max(bare_loop(model / "model.onnx", args.n, batch[:bb]) for bb in sizes)
            rates["baseline"].append(rate)
            cpu["baseline"].append(core_s)
            print(f"round {r}: ours {rates['ours'][-1]:.3f} img/s ({cpu['ours'][-1]:.2f} core-s/img), baseline "
                  f"{rate:.3f} img/s ({core_s:.2f} core-s/img), load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.effect_images:
            for p in paths[args.n:]:
                (tmp / p.name).rename(p)
            recipe_effect(model, paths[: args.effect_images])
    ours, base = (statistics.median(rates[k]) for k in ("ours", "baseline"))
    spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in rates.items()}
    core = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.n} images per round, "
          f"median of {args.rounds} (spread ours {spread['ours']}, baseline {spread['baseline']} img/s); "
          f"core-seconds per image: ours {core['ours']:.3f}, baseline {core['baseline']:.3f} "
          f"(baseline / ours {core['baseline'] / core['ours']:.2f}); {time.perf_counter() - t_setup:.0f} s in all")
    print(f"RESULT tag_pipeline_realcost ours={ours:.3f} img/s baseline={base:.3f} ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
