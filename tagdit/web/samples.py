"""The sampling page's folder (`<run>/samples-web/`): one batch is PNGs with their settings in a text
chunk, then a zip of them with `settings.json`. This module writes batches and lists them back, newest
first, so a reloaded page shows what the folder holds."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

log = logging.getLogger(__name__)

SAMPLE_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}(-\d{1,2})?\.(png|zip)")  # what `write_batch` writes, nothing else
SETTINGS = "settings.json"


def url(name: str) -> str:
    return f"samples/{name}"


def write_batch(out_dir: Path, images: list[Image.Image], seeds: list[int], settings: dict[str, Any],
                seconds: float) -> dict[str, Any]:
    """PNGs (settings in their text chunk) and one zip, under names made here, never from input; the
    batch as the page shows it. The zip comes last: a batch without one is incomplete and not listed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    records = []
    for i, (img, seed) in enumerate(zip(images, seeds, strict=True)):
        record = {"file": f"{batch}-{i}.png", "seed": seed, **settings}
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps(record))
        img.save(out_dir / record["file"], pnginfo=info)
        records.append(record)
    with zipfile.ZipFile(out_dir / f"{batch}.zip", "w") as z:
        for r in records:
            z.write(out_dir / r["file"], r["file"])
        z.writestr(SETTINGS, json.dumps({"seconds": round(seconds, 2), "images": records}, indent=2))
    log.info("wrote %d images to %s (%s)", len(records), out_dir, batch)
    return shown(records, f"{batch}.zip", seconds)


def shown(records: list[dict[str, Any]], zip_name: str, seconds: float | None) -> dict[str, Any]:
    """A batch as the page shows it: its images' records with their URLs, the zip's URL, the seconds."""
    images = [r | {"url": url(r["file"])} for r in records]
    return {"images": images, "zip": url(zip_name), "seconds": None if seconds is None else round(seconds, 2)}


def read_batches(out_dir: Path, limit: int) -> list[dict[str, Any]]:
    """The folder's newest `limit` complete batches, newest first (a zip that cannot be read is skipped)."""
    if not out_dir.is_dir():
        return []
    zips = [p for p in out_dir.iterdir() if p.suffix == ".zip" and SAMPLE_NAME.fullmatch(p.name)]
    zips.sort(key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    batches = []
    for path in zips[:limit]:
        try:
            records, seconds = read_settings(path)
        except (OSError, KeyError, TypeError, AttributeError, ValueError, zipfile.BadZipFile):
            log.warning("skipping %s: not a batch this page wrote", path)
            continue
        records = [r for r in records if SAMPLE_NAME.fullmatch(str(r.get("file"))) and (out_dir / r["file"]).is_file()]
        if records:
            batches.append(shown(records, path.name, seconds))
    return batches


def read_settings(path: Path) -> tuple[list[dict[str, Any]], float | None]:
    """A batch zip's image records and seconds (the first layout held the records alone, no seconds)."""
    with zipfile.ZipFile(path) as z:
        settings = json.loads(z.read(SETTINGS))
    if isinstance(settings, list):
        return settings, None
    return list(settings["images"]), settings.get("seconds")
