"""The demo tagger: a small CNN trained on demo-world images, exported with the WD 1.4 interface.

The exported graph takes what a WD 1.4 tagger takes (docs/design.md §6: `input_1:0`, NHWC float32
[N, 448, 448, 3], BGR, 0-255) and returns `predictions_sigmoid`. Inside it: BGR -> RGB, NHWC -> NCHW,
a 7x7 average pool (448 -> 64, so CPU inference is cheap), then the CNN. Training therefore uses the
pooled 64 px equivalent of the WD preprocessing (`tagger_data.wd_pooled_view`), for both whole source
images and 64 px centre crops (what the dataset and the DiT produce). Accuracy is measured through
onnxruntime on the exported file with `tagdit.data.tagger.WDTagger`, on world images it never saw.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tagdit.demo import labels, tagger_data, world
from tagdit.demo.parallel import default_workers
from tagdit.files import atomic_path, write_json_atomic
from tagdit.formats.selected_tags import CHARACTER, GENERAL, RATING, write_tags_csv
from tagdit.formats.wd_image import centre_crop

log = logging.getLogger(__name__)

SIZE, POOL = 448, 7  # WD input side; 448 / 7 = 64 px seen by the CNN


def tag_table() -> list[tuple[str, int]]:
    """(display name, category) in model output order: ratings, general tags, characters."""
    return ([(r, RATING) for r in labels.RATINGS] + [(t, GENERAL) for t in labels.GENERAL_TAGS]
            + [(t, CHARACTER) for t in labels.CHARACTER_TAGS])


def conv_bn(c_in: int, c_out: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class DemoCNN(nn.Module):
    """64 px RGB in [-1, 1] -> tag logits; avg + max global pooling keeps small features (eyes) visible."""

    def __init__(self, n_tags: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w, 2, k=5), conv_bn(w, w),  # 32 x 32
            conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w),  # 16 x 16
            conv_bn(2 * w, 4 * w, 2), conv_bn(4 * w, 4 * w),  # 8 x 8
        )
        self.head = nn.Linear(8 * w, n_tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, 4w, 8, 8)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # (B, 8w)
        return self.head(h)  # (B, T)


class WDInterface(nn.Module):
    """WD 1.4 input/output around the CNN: (N, 448, 448, 3) BGR 0-255 -> (N, T) sigmoid."""

    def __init__(self, cnn: DemoCNN):
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., [2, 1, 0]].permute(0, 3, 1, 2)  # (N, 3, 448, 448) RGB
        x = F.avg_pool2d(x, POOL)  # (N, 3, 64, 64)
        return torch.sigmoid(self.cnn(x / 127.5 - 1.0))  # (N, T)


# ---------------------------------------------------------------- data + training


def label_matrix(tag_lists: list[list[str]], names: list[str]) -> np.ndarray:
    """(N, T) float32 multi-hot; every demo image is rated `general`."""
    index = {n: i for i, n in enumerate(names)}
    y = np.zeros((len(tag_lists), len(names)), np.float32)
    y[:, index["general"]] = 1.0
    for r, tags in enumerate(tag_lists):
        y[r, [index[t] for t in tags]] = 1.0
    return y


def train_cnn(x: np.ndarray, y: np.ndarray, categories: list[int], epochs: int, batch_size: int,
              lr: float, seed: int, width: int) -> DemoCNN:
    """Train on (N, 64, 64, 3) uint8 views with horizontal flips; AdamW + one-cycle schedule."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DemoCNN(y.shape[1], width).to(memory_format=torch.channels_last)
    xs = torch.from_numpy(x).permute(0, 3, 1, 2)  # (N, 3, 64, 64) uint8
    ys = torch.from_numpy(y)
    # rare character tags must clear the 0.85 character threshold: weight their positives up
    pos_weight = torch.tensor([4.0 if c == CHARACTER else 1.0 for c in categories])
    n_batches = max(1, len(xs) // batch_size)  # drop the ragged last batch (one batch if tiny)
    steps = epochs * n_batches
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    step, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        total = 0.0
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb = xs[idx].float().div_(127.5).sub_(1.0)  # (B, 3, 64, 64)
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = xb[flip].flip(-1)
            xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(model(xb), ys[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            step += 1
        log.info("demo tagger epoch %d/%d: loss %.4f (%.0f img/s)", epoch + 1, epochs,
                 total / n_batches, step * batch_size / (time.perf_counter() - t0))
    return model.eval()


# ---------------------------------------------------------------- export


def export_onnx(cnn: DemoCNN, path: Path, opset: int = 18) -> int:
    """Write the WD-interface graph atomically; returns the opset used (18, else 17)."""
    model = WDInterface(cnn).eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(1, SIZE, SIZE, 3)
    for version in (opset, 17):
        try:
            with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deliberate (docs/design.md §10)
                torch.onnx.export(
                    model, (dummy,), str(tmp), input_names=["input_1:0"],
                    output_names=["predictions_sigmoid"], opset_version=version, dynamo=False,
                    dynamic_axes={"input_1:0": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
                )
            return version
        except Exception as e:  # an older exporter without opset 18
            if version == 17:
                raise
            log.warning("ONNX export at opset %d failed (%s); retrying with 17", version, e)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, world_seed: int, n_eval: int, res: int = 64, offset: int = 0) -> dict[str, Any]:
    """Per-tag precision / recall of the exported tagger on world images, full and 64 px crops."""
    from tagdit.data.tagger import WDTagger

    tagger = WDTagger.from_dir(model_dir, batch_size=32)
    items = [world.make_item(world_seed, i) for i in range(offset, offset + n_eval)]
    truth = [set(it.tags) for it in items]
    views = {
        "full": lambda: (world.decode(it.data) for it in items),
        f"crop{res}": lambda: (centre_crop(world.decode(it.data), res) for it in items),
    }
    report: dict[str, Any] = {"n_eval": n_eval, "world_seed": world_seed, "views": {}}
    for view, images in views.items():
        results = list(tagger.tag_images(images()))
        report["views"][view] = score(truth, [set(r.tags) for r in results], [r.rating for r in results],
                                      [n for n, c in tag_table() if c != 9])
    return report


def score(truth: list[set[str]], pred: list[set[str]], ratings: list[str], names: list[str]) -> dict:
    """Per-tag and micro precision/recall, exact-match rate and rating accuracy."""
    per_tag = {}
    tp_all = fp_all = fn_all = 0
    for name in names:
        tp = sum(name in t and name in p for t, p in zip(truth, pred, strict=True))
        fp = sum(name not in t and name in p for t, p in zip(truth, pred, strict=True))
        fn = sum(name in t and name not in p for t, p in zip(truth, pred, strict=True))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
        per_tag[name] = {"precision": tp / (tp + fp) if tp + fp else 1.0,
                         "recall": tp / (tp + fn) if tp + fn else 1.0, "support": tp + fn}
    return {
        "tags": per_tag,
        "precision": tp_all / max(1, tp_all + fp_all),
        "recall": tp_all / max(1, tp_all + fn_all),
        "min_precision": min(v["precision"] for v in per_tag.values()),
        "min_recall": min(v["recall"] for v in per_tag.values()),
        "exact_match": sum(t == p for t, p in zip(truth, pred, strict=True)) / max(1, len(truth)),
        "rating_accuracy": sum(r == "general" for r in ratings) / max(1, len(ratings)),
    }


# ---------------------------------------------------------------- build


def build_demo_tagger(
    out: Path,
    seed: int = 0,
    world_seed: int = 0,
    n_train: int = 4000,
    n_eval: int = 400,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 32,
    workers: int = 0,
) -> dict[str, Any]:
    """Train on the tagger's own image stream, export `out/model.onnx` + `selected_tags.csv`,
    measure it on the first `n_eval` images of world `world_seed`, write `out/report.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workers = workers or default_workers()
    torch.set_num_threads(os.cpu_count() or 1)
    examples = tagger_data.training_examples(seed, range(n_train), workers)
    x = np.stack([v for full, crop, _ in examples for v in (full, crop)])  # (2N, 64, 64, 3)
    table = tag_table()
    names, cats = [n for n, _ in table], [c for _, c in table]
    y = np.repeat(label_matrix([tags for _, _, tags in examples], names), 2, axis=0)  # (2N, T)
    t_data = time.perf_counter() - t0
    log.info("demo tagger: %d training views in %.1fs", len(x), t_data)
    cnn = train_cnn(x, y, cats, epochs, batch_size, lr, seed, width)
    t_train = time.perf_counter() - t0 - t_data
    write_tags_csv(out / "selected_tags.csv", names, cats, y[::2].sum(0))
    opset = export_onnx(cnn, out / "model.onnx")
    report = evaluate(out, world_seed, n_eval)
    report.update({
        "seed": seed, "n_train": n_train, "epochs": epochs, "width": width, "opset": opset,
        "threshold": {"general": 0.35, "character": 0.85},
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    })
    write_json_atomic(out / "report.json", report)
    return report


def summary_table(report: dict[str, Any]) -> str:
    """Plain-text per-tag precision/recall table of a build report (one column pair per view)."""
    views = list(report["views"])
    head = f"{'tag':<20}" + "".join(f"{v + ' P':>11}{v + ' R':>11}{'n':>5}" for v in views)
    lines = [head]
    for tag in report["views"][views[0]]["tags"]:
        row = f"{tag:<20}"
        for v in views:
            m = report["views"][v]["tags"][tag]
            row += f"{m['precision']:>11.3f}{m['recall']:>11.3f}{m['support']:>5d}"
        lines.append(row)
    for key in ("precision", "recall", "min_precision", "min_recall", "exact_match"):
        lines.append(f"{key:<20}" + "".join(f"{report['views'][v][key]:>11.3f}{'':>16}" for v in views))
    return "\n".join(lines)
