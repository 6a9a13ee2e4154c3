"""Synthetic WD-interface taggers and drawing-like images, for the tests and benchmarks.

`build_wd_model`: a tiny ONNX model with the exact WD 1.4 tagger interface whose tags follow the
image's colour (input `input_1:0` NHWC float32 [N, 448, 448, 3] BGR 0-255; output
`predictions_sigmoid` [N, T]): it averages each channel and applies a fixed linear layer + sigmoid,
so a pure red image is tagged `red`, a white one `white background`, a yellow one `^_^`, a blue one
`blue` and the character `test character`. `export_wd_model` / `build_pixel_model`: random-weight
taggers whose scores depend on the pixels, calibrated to spread across the thresholds (the
benchmarks' stand-in for the real MOAT tagger's cost and sensitivity). `drawn_image`: a source-like
drawing. The trained demo tagger is tagdit/demo/tagger.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (raw name, category, logit weights for mean (R, G, B) in 0..1, bias)
TAGS: list[tuple[str, int, tuple[float, float, float], float]] = [
    ("general", 9, (2.0, 2.0, 2.0), -2.0),
    ("sensitive", 9, (0.0, 0.0, 0.0), 0.0),
    ("questionable", 9, (-2.0, -2.0, -2.0), 1.0),
    ("explicit", 9, (0.0, 0.0, 0.0), -5.0),
    ("red", 0, (12.0, -6.0, -6.0), -2.0),
    ("green", 0, (-6.0, 12.0, -6.0), -2.0),
    ("blue", 0, (-6.0, -6.0, 12.0), -2.0),
    ("white_background", 0, (10 / 3, 10 / 3, 10 / 3), -8.0),
    ("^_^", 0, (12.0, 12.0, -12.0), -14.0),
    ("dark", 0, (-12.0, -12.0, -12.0), 6.0),
    ("test_character", 4, (-10.0, -10.0, 20.0), -5.0),
]


def reference_probs(rgb_mean: np.ndarray) -> np.ndarray:
    """What the model outputs for mean colours (N, 3) RGB in 0..1."""
    w = np.array([t[2] for t in TAGS], np.float64).T  # (3, T)
    b = np.array([t[3] for t in TAGS], np.float64)
    return 1 / (1 + np.exp(-(rgb_mean @ w + b)))


def build_wd_model(folder: str | Path, size: int = 448, fixed_batch: int | None = None) -> Path:
    """Write model.onnx + selected_tags.csv into `folder`; return the folder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w_rgb = np.array([t[2] for t in TAGS], np.float32).T  # (3, T) rows R, G, B
    w_bgr = w_rgb[::-1].copy() / 255.0  # the input is BGR 0-255
    b = np.array([t[3] for t in TAGS], np.float32)
    n = fixed_batch if fixed_batch else "N"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),  # (N, 3)
            helper.make_node("MatMul", ["mean", "W"], ["logits0"]),  # (N, T)
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "wd_fixture",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [n, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [n, len(TAGS)])],
        [
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
            numpy_helper.from_array(w_bgr, "W"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    lines = ["tag_id,name,category,count"]
    lines += [f"{i},{name},{cat},{1000 - i}" for i, (name, cat, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    return folder


def write_tags_csv(folder: Path, n_general: int, n_character: int) -> list[int]:
    """selected_tags.csv: the 4 ratings, `n_general` general tags, `n_character` characters; returns the categories."""
    cats = [9] * 4 + [0] * n_general + [4] * n_character
    names = ["general", "sensitive", "questionable", "explicit"]
    names += [f"tag_{i}" for i in range(n_general)] + [f"character_{i}_(test)" for i in range(n_character)]
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{len(cats) - i}" for i, (n, c) in enumerate(zip(names, cats, strict=True))]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    return cats


def export_wd_model(net, folder: str | Path, n_general: int, n_character: int, calibration: np.ndarray,
                    size: int = 448) -> Path:
    """Export a torch `net` ((N, 3, S, S) in 0..1 -> (N, T) logits) with the WD interface into `folder`.

    Random weights give logits that barely move between images; each tag's logit is rescaled to
    mean -4 and std 2 over `calibration` ((N, S, S, 3) WD inputs), so scores spread across the 0.35
    and 0.85 thresholds (~5 % of general tags selected per image; a trained tagger selects fewer) and
    a preprocessing change shows as tag flips.
    """
    import warnings

    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tags_csv(folder, n_general, n_character)

    class WD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mu", torch.zeros(4 + n_general + n_character))
            self.register_buffer("sigma", torch.ones(4 + n_general + n_character))

        def forward(self, x):  # (N, S, S, 3) BGR 0-255; channel order is moot for random weights
            z = self.net(x.permute(0, 3, 1, 2) / 255.0)  # (N, T)
            return torch.sigmoid((z - self.mu) / self.sigma * 2.0 - 4.0)

    wd = WD().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deliberate (docs/design.md §10)
        z = torch.cat([net(torch.from_numpy(c[None]).permute(0, 3, 1, 2) / 255.0) for c in calibration])
        wd.mu.copy_(z.mean(0))
        wd.sigma.copy_(z.std(0).clamp_min(1e-6))
        torch.onnx.export(wd, (torch.zeros(1, size, size, 3),), str(folder / "model.onnx"),
                          input_names=["input_1:0"], output_names=["predictions_sigmoid"], opset_version=18,
                          dynamo=False, dynamic_axes={"input_1:0": {0: "batch"}, "predictions_sigmoid": {0: "batch"}})
    return folder


def small_convnet(n_tags: int, seed: int = 0):
    """A random-weight CNN (~45 MFLOP at 448 px): a 4 px patchify conv sees every pixel, GELUs bend it."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4), nn.GELU(),  # (N, 16, 112, 112)
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),  # (N, 32, 56, 56)
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),  # (N, 64, 28, 28)
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),  # (N, 64, 14, 14)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_tags),  # (N, T)
    ).eval()


def build_pixel_model(folder: str | Path, calibration: list, n_general: int = 40, n_character: int = 8) -> Path:
    """A cheap WD-interface tagger whose scores depend on the pixels (unlike `build_wd_model`'s means),
    calibrated on the WD inputs of the `calibration` PIL images."""
    from tagdit.formats.wd_image import wd_preprocess

    x = np.stack([wd_preprocess(im, 448) for im in calibration])  # (N, 448, 448, 3)
    return export_wd_model(small_convnet(4 + n_general + n_character), folder, n_general, n_character, x)


def drawn_image(rng: np.random.Generator, w: int, h: int, mode: str = "RGB"):
    """A drawing-like test image: a gradient, filled shapes, strokes, a little noise (not pure noise,
    which no real source is and which exaggerates resize differences)."""
    from PIL import Image, ImageDraw

    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    t = (np.arange(w, dtype=np.float32)[None, :] / w + np.arange(h, dtype=np.float32)[:, None] / h) / 2  # (h, w)
    base = c0 + (c1 - c0) * t[..., None] + 4 * rng.standard_normal((h, w, 3), dtype=np.float32)  # (h, w, 3)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, x1 = sorted(rng.integers(0, w, 2))
        y0, y1 = sorted(rng.integers(0, h, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            d.ellipse([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0), width=max(1, w // 200))
        elif shape == 1:
            d.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            d.line([x0, y0, x1, y1], fill=colour, width=max(1, int(rng.integers(1, 1 + w // 60))))
    if mode == "RGBA":
        alpha = Image.new("L", (w, h), 0)
        ImageDraw.Draw(alpha).ellipse([w // 8, h // 8, w - w // 8, h - h // 8], fill=255)
        img.putalpha(alpha)
    return img
