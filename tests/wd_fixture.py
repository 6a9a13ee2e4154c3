"""The reference WD preprocessing and the messy source folder the crop/tag/shard tests read.

The synthetic taggers and drawings the tests use live in tagdit.demo.stand_in_taggers (the
benchmarks build them too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reference_prepare(image, size: int = 448) -> np.ndarray:
    """SmilingWolf's wd-tagger `prepare_image`, written out as in the reference app (Pillow only)."""
    from PIL import Image

    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    max_dim = max(image.size)
    pad_left = (max_dim - image.size[0]) // 2
    pad_top = (max_dim - image.size[1]) // 2
    padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded.paste(image, (pad_left, pad_top))
    if max_dim != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    return np.asarray(padded, dtype=np.float32)[:, :, ::-1]


# ---------------------------------------------------------------- pixel-sensitive taggers


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
