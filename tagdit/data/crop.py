"""The crop stage's work: every file of a source -> a square RGB crop, or a reject with its reason.

Every file found becomes a row: a crop, or a reject with its reason (vector files, stray text,
hidden files, undecodable images); a `name.txt` beside an image is that image's sidecar, not a file
of its own. Hidden folders are not walked. A file is read from a local path or, for a URL source
or a manifest's URL, through fsspec (`read_source`); an object gone since the listing is a reject.

Layers (webdataset style): `crop_image` (one file's bytes -> encoded crop, or a `Reject` with a
reason) -> `crop_row` (one file -> one chunk row) -> `process_bucket` (one hash bucket's files -> one crop
chunk, `tagdit.formats.chunks`, written atomically, reusing the rows of unchanged files from the
bucket's previous chunk). Listing the files is `tagdit.data.walk` and `tagdit.data.sources`; planning the buckets, running
them and stamping the stage is `tasks.crop`. This is image decoding and cropping, the data library's kind of work,
so it lives in `tagdit.data` and imports only formats/, config, files and stores.
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
    tags: str | None = None  # a user manifest's tags: the sidecar's text, given inline

    @property
    def stamp(self) -> str:
        """What says the file (and its sidecar) is unchanged: path, size, mtime, sidecar stamp."""
        return f"{self.rel}:{self.size}:{self.mtime_ns}:{self.sidecar}:{self.sidecar_stamp}"


def sample_key(rel: str) -> str:
    """Stable, webdataset-safe key from a relative path: no dots or slashes, unique by hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel).strip("_")[-64:] or "x"
    return f"{stem}-{sha256_text(rel)[:8]}"


def check_name(name: str) -> bool:
    """Reject by name what is not a raster image (hidden, vector, stray text); True for a raster extension."""
    ext = os.path.splitext(name)[1].lower()
    if name.startswith("."):
        raise Reject("hidden file")
    if ext in VECTOR_EXTS:
        raise Reject(f"not a raster image (vector format {ext})")
    if ext == ".txt":
        raise Reject("unreadable image: a .txt file with no image of the same name (not a sidecar)")
    return ext in IMAGE_EXTS


def _identify(open_arg: Path | io.BytesIO, ext: str) -> None:
    """Pass a file under an unusual extension only if Pillow identifies it from its header."""
    try:
        with Image.open(open_arg):  # reads the header only
            return
    except Image.DecompressionBombError:  # an image, and too big: the decode records why
        return
    except Image.UnidentifiedImageError:
        raise Reject(f"unreadable image: not an image format Pillow can open ({ext or 'no extension'})") from None
    except OSError as e:
        raise Reject(f"unreadable image: {e.strerror or type(e).__name__}") from None


def check_kind(path: Path) -> None:
    """Reject what is not a raster image before reading it whole: hidden, vector and non-image files.

    A file under an unusual extension that Pillow identifies from its header passes (and is decoded).
    """
    if check_name(path.name):
        return
    try:
        st = path.stat()
    except OSError as e:
        raise Reject(f"unreadable image: {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below
        raise Reject("unreadable: not a regular file")
    if st.st_size == 0:
        raise Reject("unreadable image: empty file")
    _identify(path, path.suffix.lower())


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


def _read_object(url: str) -> bytes:
    """An object's bytes through fsspec; one that vanished since the listing is a reject, not a crash."""
    from tagdit.stores import filesystem

    name = url.rsplit("/", 1)[-1]
    raster = check_name(name)
    fs, path = filesystem(url)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise Reject(f"vanished: {url} was listed but is gone") from None
    except Exception as e:
        raise Reject(f"unreadable: {type(e).__name__}: {e}") from None
    if not raster:
        if not data:
            raise Reject("unreadable image: empty file")
        _identify(io.BytesIO(data), os.path.splitext(name)[1].lower())
    return data


def locate(base: str | Path, rel: str) -> str | Path:
    """Where a listed file is: a URL, or a local path (`rel` may itself be a URL or absolute, from a manifest)."""
    from tagdit.stores import is_url

    if is_url(rel):
        return rel
    if is_url(base):
        return f"{str(base).rstrip('/')}/{rel}"
    return Path(base) / rel


def read_source(where: str | Path) -> bytes:
    """A source file's bytes, after the checks of its kind (`Reject` with the reason otherwise)."""
    if isinstance(where, str):
        return _read_object(where)
    check_kind(where)
    return _read_source(where)


def fetch_bytes(where: str | Path) -> bytes:
    """A listed file's bytes as they are (a sidecar, the tagger's source): a local path or a URL through fsspec."""
    if isinstance(where, str):
        from tagdit.stores import filesystem

        fs, path = filesystem(where)
        return fs.cat_file(path)
    return Path(where).read_bytes()


def crop_row(base: str | Path, f: SourceFile, p: CropParams) -> dict:
    """One source file -> one chunk row (a sample or a reject); `base`: what `f.rel` is relative to."""
    row = {"key": sample_key(f.rel), "source": f.rel, "stamp": f.stamp, "ok": False, "reason": None, "sha256": None,
           "orig_size": None, "crop_box": None, "image": None, "sidecar": None}
    try:
        data = read_source(locate(base, f.rel))
        row["sha256"] = hashlib.sha256(data).hexdigest()
        row["image"], row["orig_size"], row["crop_box"] = crop_image(data, p)
        row["ok"] = True
        if f.tags is not None:
            row["sidecar"] = f.tags
        elif f.sidecar:
            row["sidecar"] = fetch_bytes(locate(base, f.sidecar)).decode("utf-8", errors="replace")
    except Reject as e:
        row["reason"] = str(e)
    except Exception as e:  # a decoder bug must not stop the run: record it
        row["reason"] = f"decode failed ({type(e).__name__}: {e})"
    return row


def process_bucket(source: str | Path, files: list[SourceFile], p: CropParams, dst: Path,
                   previous: Path | None = None) -> tuple[int, int]:
    """Crop one bucket's files into one crop chunk at `dst` (atomic); returns (ok, rejected).

    Rows of files unchanged since `previous` (the bucket's last crop chunk: same stamp) are copied
    from it; only new or changed files are read and cropped.
    """
    kept = {}
    if previous is not None:  # here, or in the store of a URL dataset (read from there)
        kept = {r["stamp"]: r for r in read_crop_chunk(previous).to_pylist()}
    rows = [kept.get(f.stamp) or crop_row(source, f, p) for f in files]
    write_crop_chunk(rows, dst)
    ok = sum(r["ok"] for r in rows)
    return ok, len(rows) - ok


def chunk_digest(stamps: list[str], p: CropParams, code: str) -> str:
    """A crop chunk's name: the stage's `code` key, the settings and every file's stamp (key-hash order)."""
    return sha256_text(code, repr(p), *stamps)[:16]
