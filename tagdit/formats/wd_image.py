"""The WD 1.4 image recipe (SmilingWolf's wd-v1-4 taggers) and the square geometry the crops share.

Any image -> RGBA -> composited on white -> padded to a centred white square -> Pillow BICUBIC to the
model's size -> float32 BGR 0-255 (docs/design.md §6). The crop stage uses the same compositing,
centring and padding, so a crop and the tagger see an image the same way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)


def to_rgba(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGBA (16-bit and float greyscale scaled to 8 bits, CMYK via RGB)."""
    if img.mode == "RGBA":
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else a
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    return img.convert("RGBA")


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """Composite any image (alpha, palette transparency) on white and return RGB."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else to_rgba(img).convert("RGB")
    canvas = Image.new("RGBA", img.size, (*WHITE, 255))
    canvas.alpha_composite(to_rgba(img))
    return canvas.convert("RGB")


def centred(inner: int, outer: int) -> int:
    """Offset that centres a length `inner` in `outer` (the reference rounds down)."""
    return (outer - inner) // 2


def centre_box(w: int, h: int) -> tuple[int, int, int, int]:
    """The largest centred square of a w x h image: (left, top, right, bottom)."""
    side = min(w, h)
    left, top = centred(side, w), centred(side, h)
    return left, top, left + side, top + side


def pad_square(img: Image.Image) -> Image.Image:
    """An RGB image centred on a white square of its long side (returned as is when square)."""
    w, h = img.size
    side = max(w, h)
    if w == h:
        return img
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(img, (centred(w, side), centred(h, side)))
    return square


def centre_crop(img: Image.Image, res: int, resample: int = Image.LANCZOS) -> Image.Image:
    """On white, the centre square, resized to res x res (RGB)."""
    rgb = to_rgb_on_white(img)
    return rgb.resize((res, res), resample, box=centre_box(*rgb.size))


def wd_square(img: Image.Image, size: int) -> Image.Image:
    """The reference WD recipe up to the resize: on white -> centred white square -> BICUBIC to size."""
    img = pad_square(to_rgb_on_white(img))
    return img.resize((size, size), Image.BICUBIC) if img.width != size else img


def _bgr_float(rgb: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """(S, S, 3) uint8 RGB -> float32 BGR 0-255, into `out` when given (exact: uint8 fits float32)."""
    if out is None:
        out = np.empty(rgb.shape, np.float32)
    for c in range(3):  # RGB -> BGR and uint8 -> float32; per channel is 5x faster than a reversed view
        out[:, :, c] = rgb[:, :, 2 - c]
    return out


def wd_preprocess(img: Image.Image, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """WD input, the reference recipe bit for bit: (size, size, 3) float32 BGR 0-255 (`wd_square`,
    Pillow's BICUBIC), written into `out` when given."""
    return _bgr_float(np.asarray(wd_square(img, size)), out)


def resize_bicubic(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 through torch's antialiased bicubic (a = -0.5, as
    Pillow's BICUBIC): 3-7x faster than Pillow, each pixel within 2 levels of Pillow's (most identical)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last strides
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()


def wd_preprocess_torch(img: Image.Image, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`wd_preprocess` with torch's resize (`tagger.resize=torch`): faster, not bit-exact; its effect on
    a pixel-sensitive tagger's scores is measured in docs/design.md §6."""
    rgb = np.array(pad_square(to_rgb_on_white(img)))  # (s, s, 3) uint8, writable
    if rgb.shape[0] != size:
        rgb = resize_bicubic(rgb, size)  # (S, S, 3)
    return _bgr_float(rgb, out)


WD_RESIZE = {"pillow": wd_preprocess, "torch": wd_preprocess_torch}  # tagger.resize -> preprocessing
