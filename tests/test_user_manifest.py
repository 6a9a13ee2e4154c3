"""A user manifest as `data.source`: parquet, CSV or JSONL rows of URIs with optional tags; malformed ones refused."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tagdit.config import load_config
from tagdit.formats.chunks import read_crop_chunk
from tagdit.formats.user_manifest import ManifestError
from tasks.crop import crop_stage


def images(tmp_path: Path) -> tuple[Path, Path]:
    """Two folders far apart: `a/` beside the manifest, `elsewhere/b/` named by absolute path."""
    a, b = tmp_path / "m" / "a", tmp_path / "elsewhere" / "b"
    for folder, colour in ((a, (200, 0, 0)), (b, (0, 0, 200))):
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40 + i, 36), colour).save(folder / f"{i}.png")
    return a, b


def rows_of(tmp_path: Path, b: Path) -> list[dict]:
    return [{"url": "a/0.png", "tags": "red_hair, smile"}, {"url": "a/1.png", "tags": None},
            {"url": str(b / "0.png"), "tags": "blue_sky"}, {"url": str(b / "1.png"), "tags": ""},
            {"url": "a/missing.png", "tags": None}]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["url,tags"] + [f"{r['url']},\"{r['tags'] or ''}\"" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def crop(tmp_path: Path, source: Path, name: str = "m"):
    cfg = load_config(None, [f"data.source={source}", f"data.root={tmp_path / 'shards'}", f"data.name={name}",
                             "data.resolution=32", "crop.workers=1"])
    rec = crop_stage(cfg)
    return rec, [r for c in rec.info["chunks"] for r in read_crop_chunk(Path(rec.out_dir) / c).to_pylist()]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_a_manifest_joins_folders_and_its_tags_are_the_sidecar_text(tmp_path, suffix):
    a, b = images(tmp_path)
    manifest = write(tmp_path / "m" / f"list{suffix}", rows_of(tmp_path, b))
    rec, rows = crop(tmp_path, manifest)
    by = {r["source"]: r for r in rows}
    assert rec.info["found"] == 5 and rec.info["ok"] == 4 and rec.info["sidecars"] == 0
    assert by["a/0.png"]["sidecar"] == "red_hair, smile" and by[str(b / "0.png")]["sidecar"] == "blue_sky"
    assert by["a/1.png"]["sidecar"] is None and by[str(b / "1.png")]["sidecar"] is None
    assert not by["a/missing.png"]["ok"] and by["a/missing.png"]["reason"].startswith("unreadable")
    folder = {r["source"]: r["image"] for r in crop(tmp_path, tmp_path / "m", "f")[1]}
    assert by["a/0.png"]["image"] == folder["a/0.png"]  # the same crop as from a folder walk


def test_changed_manifest_tags_recrop_only_that_row(tmp_path):
    a, b = images(tmp_path)
    rows = rows_of(tmp_path, b)
    manifest = write(tmp_path / "m" / "list.jsonl", rows)
    first, _ = crop(tmp_path, manifest)
    rows[0]["tags"] = "red_hair"
    second, after = crop(tmp_path, write(manifest, rows))
    assert next(r["sidecar"] for r in after if r["source"] == "a/0.png") == "red_hair"
    assert len(set(first.info["chunks"]) ^ set(second.info["chunks"])) == 2  # that bucket's chunk, old and new


@pytest.mark.parametrize("name, text, message", [
    ("list.csv", "url,tags\na/0.png,x\n,y\n", "list.csv line 3: column 'url' is empty"),
    ("list.csv", "path\na/0.png\na/1.png,extra\n", "list.csv line 3: more fields than the header's 1"),
    ("list.csv", "file,tags\na/0.png,x\n", "list.csv: no 'url' or 'path' column (it has 'file', 'tags')"),
    ("list.jsonl", '{"url": "a/0.png"}\n{"url": "a/1.png"}\n{"url": \n', "list.jsonl line 3: not JSON"),
    ("list.jsonl", '{"url": "a/0.png"}\n["a/1.png"]\n', "list.jsonl line 2: not a JSON object"),
    ("list.jsonl", '{"path": "a/0.png", "tags": 3}\n', "list.jsonl line 1: column 'tags' is not text"),
    ("list.jsonl", '{"url": 7}\n', "list.jsonl line 1: column 'url' is not text (int)"),
    ("list.jsonl", '{"url": "a/0.png"}\n{"url": "a/0.png"}\n', "data.source lists 'a/0.png' twice"),
    ("list.parquet", "not parquet", "list.parquet: not a parquet file"),
])  # fmt: skip
def test_a_malformed_manifest_is_refused_by_line_and_column_before_any_work(tmp_path, name, text, message):
    images(tmp_path)
    (tmp_path / "m" / name).write_text(text)
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        crop(tmp_path, tmp_path / "m" / name)
    assert not (tmp_path / "shards" / "m" / "work" / "crop").exists()


def test_a_parquet_manifest_row_without_a_uri_is_refused_by_row(tmp_path):
    pq.write_table(pa.table({"path": ["a/0.png", None], "tags": ["x", "y"]}), tmp_path / "list.parquet")
    with pytest.raises(ManifestError, match=r"^list\.parquet row 2: column 'path' is empty$"):
        crop(tmp_path, tmp_path / "list.parquet")


def test_a_missing_manifest_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source=.*nope.csv'?: no such manifest file"):
        crop(tmp_path, tmp_path / "nope.csv")
