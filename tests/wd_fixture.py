"""A tiny ONNX model with the exact WD 1.4 tagger interface whose tags follow the image's colour.

Input `input_1:0` NHWC float32 [N, 448, 448, 3] BGR 0-255; output `predictions_sigmoid` [N, T].
The model averages each channel and applies a fixed linear layer + sigmoid, so a pure red image
is tagged `red`, a white one `white background`, a yellow one `^_^`, a blue one `blue` and the
character `test character`.
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


# ---------------------------------------------------------------- image corpora

GOOD = 13  # images make_corpus writes that must become samples
BAD = 6  # images it writes that must be rejected
OTHER = 3  # non-image files it writes, rejected too (red.txt is red.jpg's sidecar: not counted)


def _jpeg_with_orientation(img, orientation: int) -> bytes:
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def make_corpus(root: str | Path) -> Path:
    """Every kind of input the crop stage must handle: GOOD valid images, BAD broken ones, others."""
    import io

    from PIL import Image

    root = Path(root)
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)

    def save(rel: str, img, fmt: str | None = None, **kw) -> None:
        img.save(root / rel, fmt, **kw)

    save("red.jpg", Image.new("RGB", (120, 80), (255, 0, 0)), quality=95)
    save("sub/Blue.PNG", Image.new("RGB", (90, 100), (0, 0, 255)), "PNG")
    save("sub/deeper/yellow.GIF", Image.new("RGB", (64, 64), (255, 255, 0)).convert("P"), "GIF")
    rgba = Image.new("RGBA", (80, 80), (0, 255, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 40, 80))
    save("rgba.png", rgba)
    pal = Image.new("P", (70, 70), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 70, 35))
    save("palette_transparent.png", pal, transparency=0)
    save("grey.jpg", Image.new("L", (64, 96), 128))
    a16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    save("deep16.png", Image.fromarray(a16))
    save("cmyk.jpg", Image.new("CMYK", (72, 72), (0, 255, 255, 0)))
    (root / "exif_rotated.jpg").write_bytes(
        _jpeg_with_orientation(Image.new("RGB", (100, 60), (0, 0, 255)), 6)
    )
    save("image.webp", Image.new("RGB", (50, 50), (0, 255, 0)))
    save("image.bmp", Image.new("RGB", (50, 40), (255, 255, 255)))
    save("image.TIFF", Image.new("RGB", (40, 50), (0, 0, 0)), "TIFF")
    save("wide.jpeg", Image.new("RGB", (400, 100), (255, 0, 0)))
    # the broken ones
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    save("tiny.png", Image.new("RGB", (10, 10), (255, 0, 0)))
    save("bomb.png", Image.new("L", (1200, 1000), 0))  # > the 1e6-pixel limit the tests configure
    (root / "unreadable.jpg").symlink_to(root / "does-not-exist.jpg")  # root can read chmod 000 files
    # not images: rejected with a reason (OTHER), except the sidecar red.txt
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.jpg").write_text("editor backup, hidden: skipped\n")
    (root / "labels.json").write_text("{}\n")
    (root / "red.txt").write_text("Hand_Drawn, red, ^_^\n")  # sidecar of red.jpg
    return root
