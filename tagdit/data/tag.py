"""The tag stage's work: WD 1.4 tags for a crop chunk's samples, merged with their sidecar tags.

The tagger sees each crop's square cut from the SOURCE file at the source's resolution, never the
small dataset-size crop: the tagger then applies the reference recipe (white square, Pillow BICUBIC to
448 px). `tagger.pre_shrink` and `tagger.resize=torch` trade that exactness for speed (opt-in).

`tag_chunk` reads a crop chunk and writes its tag chunk (`tagdit.formats.chunks`): rows key, input,
tags (score order), scores (sidecar tags score 1.0), categories, rating; rows of unchanged crops are
copied from the bucket's previous tag chunk. `loaded_tagger` keeps one ONNX
tagger per process. Planning the chunks and stamping the stage is `tasks.tag`. Decoding images and
running the tagger is the data library's kind of work, so it lives in `tagdit.data`.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from tagdit.config import TaggerConfig
from tagdit.data.crop import fetch_bytes, locate
from tagdit.data.onnx_session import device_providers, import_onnxruntime
from tagdit.data.tagger import ResolvedTagger, TagResult, WDTagger, default_preprocess_threads
from tagdit.files import sha256_text
from tagdit.formats.chunks import read_crop_chunk, read_tag_chunk, tag_chunk_tagger, write_tag_chunk
from tagdit.formats.selected_tags import UNKNOWN, display_name
from tagdit.formats.wd_image import WHITE, to_rgb_on_white

SIDECAR_SCORE = 1.0  # a human-written tag is certain


def parse_sidecar(text: str | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """`Long_Hair, smile ,, smile` -> ["long hair", "smile"]: lower case, deduplicated, in order."""
    if not text:
        return []
    excluded = {display_name(t.lower()) for t in exclude}
    out: list[str] = []
    for raw in text.replace("\n", ",").split(","):
        t = display_name(raw.strip().lower())
        if t and t not in out and t not in excluded:
            out.append(t)
    return out


def merge_tags(res: TagResult, sidecar: list[str], mode: str) -> tuple[list[str], list[float]]:
    """Combine tagger and sidecar tags per `tagger.sidecar` (merge | sidecar | tagger)."""
    if mode == "tagger":
        return res.tags, res.scores
    if mode == "sidecar":
        return sidecar, [SIDECAR_SCORE] * len(sidecar)
    rest = [(t, s) for t, s in zip(res.tags, res.scores, strict=True) if t not in sidecar]
    return sidecar + [t for t, _ in rest], [SIDECAR_SCORE] * len(sidecar) + [s for _, s in rest]


_OPEN_LOCK = threading.Lock()  # Pillow's pixel limit is a global: the decode threads take turns to lift it


def _open_unlimited(data: bytes):
    """Image.open without Pillow's bomb check: the crop stage applied `crop.max_pixels` to these very bytes."""
    from PIL import Image

    with _OPEN_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))  # reads the header only; the check runs here
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def source_square(path: str | Path, sha256: str, orig_size: list[int], box: list[int], shrink_to: int | None = None):
    """The crop's square `box` (upright source pixels) cut from the source file, on white, as RGB.

    Decoded at the source's resolution: what the reference recipe resizes. With `shrink_to`
    (`tagger.pre_shrink`: the tagger's input size) reduced by an integer factor first (JPEG DCT
    scaling, then `Image.reduce`) as far as the square keeps a side >= `shrink_to`: faster, not the
    reference. The pad mode's box reaches past the image: the outside is white, as the crop stage pads.
    """
    from PIL import Image, ImageOps

    data = fetch_bytes(path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{path} changed since the crop stage read it: run the crop stage again")
    (ow, oh), (left, top, right, _) = orig_size, box
    side = right - left
    k = max(1, side // shrink_to) if shrink_to else 1  # any reduction by <= k keeps the side >= shrink_to
    img = _open_unlimited(data)
    if k > 1 and img.format == "JPEG":  # decodes at 1/2, 1/4 or 1/8 size, never below the request
        img.draft(img.mode, (math.ceil(img.width / k), math.ceil(img.height / k)))
    img = to_rgb_on_white(ImageOps.exif_transpose(img))
    k2 = (side * img.width) // (ow * shrink_to) if shrink_to else 1  # the further reduction keeping side >= shrink_to
    if k2 > 1:
        img = img.reduce(k2)
    fx, fy = img.width / ow, img.height / oh
    x, y, s = round(left * fx), round(top * fy), max(1, round(side * fx))
    if x >= 0 and y >= 0 and x + s <= img.width and y + s <= img.height:
        return img.crop((x, y, x + s, y + s))
    square = Image.new("RGB", (s, s), WHITE)
    square.paste(img, (-x, -y))
    return square


@contextmanager
def source_images(rows: list[dict], source: str | Path, threads: int, shrink_to: int | None = None) -> Iterator[Iterator]:
    """The tagger's view of crop rows (source, sha256, orig_size, crop_box), in order: each square cut from its source.

    Decoding starts on entering, `threads` at a time (Pillow decodes without the GIL) and 2 x threads
    ahead of the consumer, so the first squares decode while the caller loads its model; leaving
    stops it.
    """

    def square(r: dict):
        return source_square(locate(source, r["source"]), r["sha256"], r["orig_size"], r["crop_box"], shrink_to)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="tag-decode")
    rest = iter(rows)
    pending = deque(pool.submit(square, r) for r in islice(rest, 2 * threads))

    def in_order() -> Iterator:  # runs in whichever thread consumes it
        while pending:
            done = pending.popleft()
            pending.extend(pool.submit(square, r) for r in islice(rest, 1))
            yield done.result()

    try:
        yield in_order()
    finally:  # queued squares dropped in one step, whatever thread is still submitting
        pool.shutdown(wait=True, cancel_futures=True)


def tag_input(row: dict) -> str:
    """What a tag row is made from besides the tagger: the source's bytes and its sidecar's text."""
    return sha256_text(row["sha256"] or "", row["sidecar"] or "")


def reusable_tags(previous: Path | None, tagger: str) -> dict[tuple[str, str], dict]:
    """(key, input) -> tag row of the bucket's previous tag chunk, when the same tagger and settings made it."""
    if previous is None or not tagger or tag_chunk_tagger(previous) != tagger:  # (read from the store when not here)
        return {}
    return {(r["key"], r["input"]): r for r in read_tag_chunk(previous).to_pylist()}


def tag_chunk(load_tagger: Callable[[], WDTagger], crop_chunk: Path, dst: Path, tcfg: TaggerConfig,
              source: str | Path, previous: Path | None = None, tagger_key: str = "", threads: int = 0) -> int:
    """Tag one crop chunk into `dst` (atomic), reading the sources under `source`; returns the rows written.

    Rows whose key and input match a row of `previous` (the bucket's last tag chunk, written under
    the same `tagger_key`) are copied; only the others go through the tagger. The first squares
    decode while `load_tagger` loads the session (once per process), unless `tagger.pre_shrink`
    needs the model's input size first. `threads` decode at once (0: `default_preprocess_threads()`).
    """
    crops = read_crop_chunk(crop_chunk, ["key", "source", "sha256", "orig_size", "crop_box", "sidecar"],
                            ok_only=True).to_pylist()
    kept = reusable_tags(previous, tagger_key)
    todo = [r for r in crops if (r["key"], tag_input(r)) not in kept]
    fresh = {}
    if todo:
        shrink_to = load_tagger().size if tcfg.pre_shrink else None
        with source_images(todo, source, threads or default_preprocess_threads(), shrink_to) as images:
            tagger = load_tagger()
            category = tagger.labels.category_of()
            for r, res in zip(todo, tagger.tag_images(images), strict=True):
                tags, scores = merge_tags(res, parse_sidecar(r["sidecar"], tcfg.exclude), tcfg.sidecar)
                fresh[r["key"]] = {"key": r["key"], "input": tag_input(r), "tags": tags, "scores": scores,
                                   "categories": [category.get(t, UNKNOWN) for t in tags], "rating": res.rating}
    rows = [fresh.get(r["key"]) or kept[(r["key"], tag_input(r))] for r in crops]
    write_tag_chunk(rows, dst, tagger_key)
    return len(rows)


def tagger_cuda_devices() -> int:
    """CUDA devices the tagger can run on: torch's count when this onnxruntime has the CUDA provider, else 0."""
    from tagdit.devices import cuda_device_count

    if "CUDAExecutionProvider" not in import_onnxruntime().get_available_providers():
        return 0
    return cuda_device_count()


def tag_chunk_on(device: str | None, crop_chunk: Path, dst: Path, tagger: ResolvedTagger, tcfg: TaggerConfig,
                 source: str | Path, previous: Path | None = None, tagger_key: str = "") -> int:
    """`tag_chunk` with this process's tagger on `device` (a device worker's; None: the default providers)."""
    from tagdit.devices import unit_threads

    return tag_chunk(lambda: loaded_tagger(tagger, tcfg, device), crop_chunk, dst, tcfg, source, previous,
                     tagger_key, threads=unit_threads(device))


_TAGGERS: dict[str, WDTagger] = {}  # this process's loaded tagger, keyed on its files, settings and device


def loaded_tagger(tagger: ResolvedTagger, tcfg: TaggerConfig, device: str | None = None) -> WDTagger:
    """The ONNX tagger for these files and settings on `device` (None: the default providers), loaded once per process."""
    from tagdit.devices import unit_threads

    key = tagger.model_dump_json() + tcfg.model_dump_json() + str(device)
    if key not in _TAGGERS:
        _TAGGERS.clear()  # one model at a time
        threads = unit_threads(device)
        _TAGGERS[key] = WDTagger(tagger.model, tagger.tags_csv, tcfg.general_threshold, tcfg.character_threshold,
                                 tcfg.mcut, tcfg.exclude, tcfg.batch_size, tcfg.cpu_batch_size,
                                 providers=device_providers(device), threads=threads,
                                 preprocess_threads=threads or None, resize=tcfg.resize)
    return _TAGGERS[key]


def forget_taggers() -> None:
    """Drop this process's loaded tagger (its ONNX session and memory)."""
    _TAGGERS.clear()
