"""The crop stage's work: every file under a source folder -> a square RGB crop, or a reject with its reason.

Every file found becomes a row: a crop, or a reject with its reason (vector files, stray text,
hidden files, undecodable images); a `name.txt` beside an image is that image's sidecar, not a file
of its own. Hidden folders are not walked.

Layers (webdataset style): `crop_image` (one file's bytes -> encoded crop, or a `Reject` with a
reason) -> `crop_row` (one file -> one chunk row) -> `process_bucket` (one hash bucket's files -> one crop
chunk, `tagdit.formats.chunks`, written atomically, reusing the rows of unchanged files from the
bucket's previous chunk). Listing the files is `tagdit.data.sources`; planning the buckets, running
them and stamping the stage is `tasks.crop`. This is image decoding and cropping, the data library's kind of work,
so it lives in `tagdit.data` and imports only formats/, config and files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from tagdit.config import PipelineConfig
from tagdit.files import sha256_text
from tagdit.formats.chunks import read_crop_chunk, write_crop_chunk
from tagdit.formats.wd_image import centre_box, pad_square, to_rgb_on_white

log = logging.getLogger(__name__)

# Vector formats: rejected by name ("not a raster image"), never decoded.
VECTOR_EXTS = frozenset({".svg", ".svgz", ".eps", ".epsf", ".epsi", ".ps", ".pdf", ".ai", ".emf", ".wmf"})
# Pillow's readable extensions, minus vector formats and stubs (video, HDF, GRIB) it cannot decode alone.
_NOT_RASTER = VECTOR_EXTS | {".mpeg", ".mpg", ".h5", ".hdf", ".bufr", ".grib"}
Image.init()
IMAGE_EXTS = frozenset(e for e, f in Image.EXTENSION.items() if f in Image.OPEN) - _NOT_RASTER


class Reject(Exception):
    """An input that cannot become a training sample; the message is the recorded reason."""


@dataclass(frozen=True)
class CropParams:
    """Everything that decides a crop's bytes."""

    resolution: int
    mode: str
    min_size: int
    max_pixels: int | None
    image_format: str
    jpeg_quality: int

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> CropParams:
        c, s = cfg.crop, cfg.shards
        return cls(cfg.data.resolution, c.mode, c.min_size, c.max_pixels, s.image_format, s.jpeg_quality)


@dataclass(frozen=True)
class SourceFile:
    rel: str  # posix path relative to data.source
    size: int
    mtime_ns: int
    sidecar: str | None  # rel path of `name.txt` when it exists
    sidecar_stamp: str = ""

    @property
    def stamp(self) -> str:
        """What says the file (and its sidecar) is unchanged: path, size, mtime, sidecar stamp."""
        return f"{self.rel}:{self.size}:{self.mtime_ns}:{self.sidecar}:{self.sidecar_stamp}"


def sample_key(rel: str) -> str:
    """Stable, webdataset-safe key from a relative path: no dots or slashes, unique by hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel).strip("_")[-64:] or "x"
    return f"{stem}-{sha256_text(rel)[:8]}"


def is_image_name(fn: str) -> bool:
    """Whether a file name is an image's by its extension (a sidecar needs one beside it)."""
    return not fn.startswith(".") and os.path.splitext(fn)[1].lower() in IMAGE_EXTS


def check_kind(path: Path) -> None:
    """Reject what is not a raster image before reading it whole: hidden, vector and non-image files.

    A file under an unusual extension that Pillow identifies from its header passes (and is decoded).
    """
    ext = path.suffix.lower()
    if path.name.startswith("."):
        raise Reject("hidden file")
    if ext in VECTOR_EXTS:
        raise Reject(f"not a raster image (vector format {ext})")
    if ext in IMAGE_EXTS:
        return
    if ext == ".txt":
        raise Reject("unreadable image: a .txt file with no image of the same name (not a sidecar)")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below
            raise Reject("unreadable: not a regular file")
        if st.st_size == 0:
            raise Reject("unreadable image: empty file")
        with Image.open(path):  # reads the header only
            return
    except Image.DecompressionBombError:  # an image, and too big: the decode records why
        return
    except Image.UnidentifiedImageError:
        raise Reject(f"unreadable image: not an image format Pillow can open ({ext or 'no extension'})") from None
    except OSError as e:
        raise Reject(f"unreadable image: {e.strerror or type(e).__name__}") from None


def _decoded(data: bytes, p: CropParams) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check and decode (reduced for JPEG) -> (RGB image, transposed original size)."""
    pillow = Image.MAX_IMAGE_PIXELS
    limit = p.max_pixels or (2 * pillow if pillow else None)  # unset: Pillow's own error threshold
    Image.MAX_IMAGE_PIXELS = None  # Pillow would raise before we can record a reason
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise Reject("not a decodable image (format not recognised)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow
    w0, h0 = img.size
    if limit and w0 * h0 > limit:
        raise Reject(f"decompression bomb: {w0}x{h0} = {w0 * h0} pixels > limit {limit}")
    rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    ow, oh = (h0, w0) if rotated else (w0, h0)
    if min(ow, oh) < p.min_size:
        raise Reject(f"too small: {ow}x{oh} (short side < crop.min_size={p.min_size})")
    scale = p.resolution / (min(ow, oh) if p.mode == "center" else max(ow, oh))
    if img.format == "JPEG" and scale < 1:  # DCT-domain downscale: decode 1/2, 1/4 or 1/8 size
        img.draft(img.mode, (math.ceil(w0 * scale), math.ceil(h0 * scale)))
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb_on_white(img), (ow, oh)
    except (OSError, SyntaxError, ValueError) as e:
        raise Reject(f"decode failed ({type(e).__name__}: {e})") from None


def crop_image(data: bytes, p: CropParams) -> tuple[bytes, tuple[int, int], tuple[int, int, int, int]]:
    """Source bytes -> (encoded square crop, original size, crop box in original pixels)."""
    if not data:
        raise Reject("empty file")
    img, (ow, oh) = _decoded(data, p)
    fx, fy, r = img.width / ow, img.height / oh, p.resolution
    if p.mode == "center":
        left, top, right, bottom = centre_box(ow, oh)
        side = right - left
        dbox = (left * fx, top * fy, right * fx, bottom * fy)
        out = img.resize((r, r), Image.LANCZOS, box=dbox, reducing_gap=3.0)
    else:  # pad: fit inside, centred on white like the tagger
        side = max(ow, oh)
        left, top = -((side - ow) // 2), -((side - oh) // 2)
        nw, nh = max(1, round(ow * r / side)), max(1, round(oh * r / side))
        out = pad_square(img.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0))
    buf = io.BytesIO()
    if p.image_format == "png":
        out.save(buf, "PNG")
    else:
        out.save(buf, "JPEG", quality=p.jpeg_quality)
    return buf.getvalue(), (ow, oh), (left, top, left + side, top + side)


def _read_source(path: Path) -> bytes:
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise Reject("unreadable: not a regular file")
        return path.read_bytes()
    except OSError as e:
        raise Reject(f"unreadable: {e.strerror or e}") from None


def crop_row(source: Path, f: SourceFile, p: CropParams) -> dict:
    """One source file -> one chunk row (a sample or a reject)."""
    row = {"key": sample_key(f.rel), "source": f.rel, "stamp": f.stamp, "ok": False, "reason": None, "sha256": None,
           "orig_size": None, "crop_box": None, "image": None, "sidecar": None}
    try:
        check_kind(source / f.rel)
        data = _read_source(source / f.rel)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        row["image"], row["orig_size"], row["crop_box"] = crop_image(data, p)
        row["ok"] = True
        if f.sidecar:
            row["sidecar"] = (source / f.sidecar).read_text(encoding="utf-8", errors="replace")
    except Reject as e:
        row["reason"] = str(e)
    except Exception as e:  # a decoder bug must not stop the run: record it
        row["reason"] = f"decode failed ({type(e).__name__}: {e})"
    return row


def process_bucket(source: Path, files: list[SourceFile], p: CropParams, dst: Path,
                   previous: Path | None = None) -> tuple[int, int]:
    """Crop one bucket's files into one crop chunk at `dst` (atomic); returns (ok, rejected).

    Rows of files unchanged since `previous` (the bucket's last crop chunk: same stamp) are copied
    from it; only new or changed files are read and cropped.
    """
    kept = {}
    if previous is not None and previous.exists():
        kept = {r["stamp"]: r for r in read_crop_chunk(previous).to_pylist()}
    rows = [kept.get(f.stamp) or crop_row(source, f, p) for f in files]
    write_crop_chunk(rows, dst)
    ok = sum(r["ok"] for r in rows)
    return ok, len(rows) - ok


def chunk_digest(files: list[SourceFile], p: CropParams, code: str) -> str:
    """A crop chunk's name: the stage's `code` key, the settings and every file's stamp."""
    return sha256_text(code, repr(p), *(f.stamp for f in files))[:16]
