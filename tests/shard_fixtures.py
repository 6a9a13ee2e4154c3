"""Tiny image shards in the shared format (docs/design.md §3: image shards, vocab.json, the shard stage's stamp).

Images are coloured shapes on coloured backgrounds, drawn deterministically from a seed, so a VAE
has something learnable and tests can compare pixels.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from tagdit.data.vocab import Vocab
from tagdit.formats.image_shards import image_sample
from tagdit.orchestrate.stage import StageRecord

TAGS = ["circle", "square", "red", "blue", "green"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}


def draw_image(rng: random.Random, size: int):
    """One RGB PIL image with a shape, plus its tags."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(["circle", "square"])
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img, [shape, colour]


def write_image_shards(
    dataset_dir: Path,
    n_train: int = 24,
    n_val: int = 8,
    size: int = 32,
    per_shard: int = 10,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Write `<dataset_dir>/images/{train,val}-NNNNNN.tar`, vocab.json and a shard-stage stamp."""
    import webdataset as wds

    rng = random.Random(seed)
    images = Path(dataset_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = []
    index = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for shard in range((n + per_shard - 1) // per_shard):
            path = images / f"{split}-{shard:06d}.tar"
            with wds.TarWriter(str(path), mtime=0) as w:
                for _ in range(min(per_shard, n - shard * per_shard)):
                    img, tags = draw_image(rng, size)
                    buf = io.BytesIO()
                    img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
                    meta = {"tags": tags, "scores": [0.9] * len(tags), "rating": "general",
                            "source": f"src/img{index:05d}.png", "orig_size": [size, size],
                            "crop_box": [0, 0, size, size], "sha256": f"{index:064d}"}
                    w.write(image_sample(f"src/img{index:05d}", fmt, buf.getvalue(), meta))
                    index += 1
            files.append(path)
    Vocab.from_tags(TAGS).save(Path(dataset_dir) / "vocab.json")
    return Path(dataset_dir)


def shard_record(dataset_dir: Path) -> StageRecord:
    """A shard-stage record for the fixture, stamped as `<dataset_dir>/.stage-shard.json`."""
    from tagdit.files import sha256_file, sha256_text

    files = sorted(Path(dataset_dir).glob("images/*.tar"))
    entries = {f.relative_to(dataset_dir).as_posix(): sha256_file(f) for f in files}
    record = StageRecord(stage="shard", key="shard-fixture", out_dir=str(dataset_dir),
                         fingerprint=sha256_text(json.dumps(entries, sort_keys=True)),
                         info={"n_train": sum(1 for f in files if f.name.startswith("train"))})
    stamp = {"record": record.model_dump(), "files": {k: {"sha256": v} for k, v in entries.items()}}
    (Path(dataset_dir) / ".stage-shard.json").write_text(json.dumps(stamp))
    return record
