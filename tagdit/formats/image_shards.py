"""Image shards: `<dataset>/images/{train,val}-UUUUU-PP.tar` + `shards.json`, written by the shard stage.

A train shard holds part PP of hash bucket UUUUU's train samples, a val shard part PP of val group
UUUUU's (`tagdit.data.shard`); `shards.json` (`ShardIndex`) records what each unit was made from.

A sample is `__key__`, the square crop as `png` or `jpg` bytes, and `json` holding `META_KEYS`:
tags, scores (to 4 places), rating, source, orig_size, crop_box and sha256. Every member has the
fixed mtime `MTIME`, so the same inputs give byte-identical shards. The encode stage, VAE training,
the evaluation and the shard preview read them back through `iter_image_samples` / `read_samples`
and `image_bytes` / `decode_image`.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tagdit.files import atomic_path, write_json_atomic
from tagdit.store_folders import names_in

MTIME = 946_684_800  # 2000-01-01: a fixed member mtime makes shards byte-identical across runs
IMAGE_EXTS = ("png", "jpg", "jpeg")
META_KEYS = ("tags", "scores", "rating", "source", "orig_size", "crop_box", "sha256")


SHARD_INDEX = "shards.json"


def shard_name(split: str, unit: int, part: int) -> str:
    """`train-00012-01.tar`: part `part` of the shards of bucket (train) or val group (val) `unit`."""
    return f"{split}-{unit:05d}-{part:02d}.tar"


def _is_shard(split: str) -> Callable[[str], bool]:
    """Whether a file name is a shard of `split`: `train-00012-01.tar` (`shard_name`), or the older `train-000003.tar`."""
    pattern = re.compile(rf"{split}-[0-9]+(-[0-9]+)?\.tar")
    return lambda name: pattern.fullmatch(name) is not None


def shards_in(folder: Path, split: str) -> list[Path]:
    """The shards of one split in `folder` (image or latent shards), in order; for a working copy, the
    store's too (a stage that reads its units from the store does not pull them)."""
    is_shard = _is_shard(split)
    return sorted(Path(folder) / n for n in names_in(folder, f"{split}-*.tar") if is_shard(n))  # here or in the store


def shard_sources(folder: Path, split: str, cache: bool = False) -> list[str]:
    """What a trainer opens for the shards of one split in `folder`, in order: the local files; for a
    working copy of a store, the store's shards, streamed unless here (`cache`: kept here once read)."""
    from tagdit.store_streams import stream_sources

    return stream_sources(folder, _is_shard(split), cache)


def image_shards(dataset_dir: Path, split: str) -> list[Path]:
    """The dataset's image shards of one split, in order."""
    return shards_in(Path(dataset_dir) / "images", split)


class ShardIndex:
    """`images/shards.json`: per shard unit, the digest of its inputs and its shards' sizes, sha256 and samples.

    A unit (a bucket's train shards, a val group's val shards) whose inputs are unchanged keeps its
    shards' bytes; the sha256 here is what the encode stage records its latent shards were made from.
    """

    def __init__(self, images: Path):
        self.path = Path(images) / SHARD_INDEX
        self.units: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def fresh(self, unit: str, inputs: str) -> bool:
        """Whether `unit` was written from `inputs` and its shards are all still there, at their size."""
        u = self.units.get(unit)
        return u is not None and u["inputs"] == inputs and all(
            (self.path.parent / n).exists() and (self.path.parent / n).stat().st_size == m["size"]
            for n, m in u["shards"].items())

    def replace(self, units: dict[str, dict]) -> None:
        """Record exactly `units` (name -> inputs and shards), as the shard stage finishes."""
        self.units = units
        write_json_atomic(self.path, self.units)

    def samples(self) -> dict[str, int]:
        """Every recorded shard's number of samples, by name (none for an index written before they were)."""
        return {n: m["samples"] for u in self.units.values() for n, m in u["shards"].items() if "samples" in m}

    def shas(self) -> dict[str, str]:
        """Every recorded shard's sha256, by name."""
        return {n: m["sha256"] for u in self.units.values() for n, m in u["shards"].items()}


def sample_json(s: dict) -> bytes:
    """The `json` member of a sample from a row holding at least `META_KEYS` (scores to 4 places)."""
    meta = {k: s[k] for k in META_KEYS} | {"scores": [round(float(x), 4) for x in s["scores"]]}
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()


def image_sample(key: str, image_format: str, image: bytes, s: dict) -> dict[str, Any]:
    """One shard sample: key, encoded image under its format's extension, json metadata."""
    return {"__key__": key, image_format: image, "json": sample_json(s)}


class ShardFile:
    """A tar shard being written under a temporary name; `close()` renames it into place."""

    def __init__(self, path: Path):
        import webdataset as wds

        self.path = path
        self._ctx = atomic_path(path)
        self._file = open(self._ctx.__enter__(), "wb")
        self._tar = wds.TarWriter(self._file, mtime=MTIME)

    def write(self, sample: dict) -> None:
        self._tar.write(sample)

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        self._ctx.__exit__(None, None, None)


def image_bytes(raw: dict[str, Any]) -> bytes:
    """The encoded image of a raw shard sample (png or jpg)."""
    for ext in IMAGE_EXTS:
        if ext in raw:
            return raw[ext]
    raise KeyError(f"sample {raw.get('__key__')!r} has no png/jpg image")


def open_image(data: bytes):
    """Encoded image -> RGB PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_image(data: bytes, resolution: int, flip: bool = False):
    """Encoded image -> float tensor (3, R, R) in [-1, 1]; resized if the shard differs from R."""
    import numpy as np
    import torch
    from PIL import Image

    img = open_image(data)
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    a = np.array(img)  # (R, R, 3) uint8, writable
    if flip:
        a = np.ascontiguousarray(a[:, ::-1])
    x = torch.from_numpy(a).permute(2, 0, 1)  # (3, R, R)
    return x.float() / 127.5 - 1.0


def iter_image_samples(source: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one image shard in order (read them with `image_bytes` / `decode_image`): a local
    file, or a store's object read forward (`shard_sources` names which)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from tagdit.store_streams import open_source

    with open_source(str(source)) as stream:
        yield from group_by_keys(tar_file_expander([{"url": str(source), "stream": stream}]))


def read_samples(dataset_dir: Path, split: str, limit: int | None = None) -> Iterator[tuple[bytes, dict]]:
    """(encoded image, json metadata) of up to `limit` samples of one split, in shard order (a URL
    dataset's shards read from the store, `shard_sources`)."""
    sources = shard_sources(Path(dataset_dir) / "images", split)
    raws = (raw for source in sources for raw in iter_image_samples(source))
    for raw in itertools.islice(raws, limit):
        yield image_bytes(raw), json.loads(raw["json"])
