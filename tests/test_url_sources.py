"""A source in a bucket (a real S3-compatible server on 127.0.0.1): the same crops and shards as a local folder."""

from pathlib import Path

import pytest
from PIL import Image

from tagdit.config import load_config
from tagdit.data.sources import listing_scope, source_listing
from tagdit.formats.chunks import read_crop_chunk
from tagdit.stores import StoreError
from tasks.crop import crop_stage
from tasks.shard import shard_stage
from tasks.tag import tag_stage

pytestmark = pytest.mark.usefixtures("one_thread")
SAME = ["key", "source", "ok", "reason", "sha256", "orig_size", "crop_box", "image", "sidecar"]  # all but the stamp


def make_source(src: Path) -> Path:
    """Two folders of images, a sidecar, a hidden folder and file, a vector file, stray text, an odd extension."""
    for f in range(2):
        (src / f"char{f}").mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 36), (90 * f, 40 * i, 200)).save(src / f"char{f}" / f"{i}.png")
    (src / "char0" / "0.txt").write_text("red_hair, smile\n")
    (src / ".hidden").mkdir()
    Image.new("RGB", (40, 40)).save(src / ".hidden" / "skipped.png")
    Image.new("RGB", (40, 40)).save(src / "char1" / ".dot.png")
    (src / "logo.svg").write_text("<svg/>")
    (src / "notes.txt").write_text("not a sidecar")
    Image.new("RGB", (50, 40), (1, 2, 3)).save(src / "odd.data", "PNG")
    (src / "tiny.png").write_bytes(b"")
    return src


def config(root: Path, source, wd: Path, name: str, workers: int = 1):
    return load_config(None, [f"data.source={source}", f"data.root={root}", f"data.name={name}", "data.resolution=32",
                              f"crop.workers={workers}", f"tagger.path={wd}", "shards.samples_per_shard=4",
                              "shards.min_tag_count=1"])


def crop_rows(crop) -> list[dict]:
    return [r for c in crop.info["chunks"] for r in read_crop_chunk(Path(crop.out_dir) / c, SAME).to_pylist()]


def test_a_bucket_source_gives_the_rows_and_shard_bytes_of_a_local_folder(tmp_path, s3_server, wd_model):
    src = make_source(tmp_path / "src")
    url = s3_server.bucket("src") + "/images"
    s3_server.upload(src, url)
    runs = {}
    for name, source, workers in (("local", src, 1), ("s3", url, 2)):  # crop worker processes read the bucket too
        cfg = config(tmp_path / "shards", source, wd_model, name, workers)
        crop = crop_stage(cfg)
        shard = shard_stage(cfg, crop, tag_stage(cfg, crop))
        tars = sorted((cfg.dataset_dir / "images").glob("*.tar"))
        runs[name] = (crop, shard, {p.name: p.read_bytes() for p in tars})
    (crop, shard, tars), (crop_s3, shard_s3, tars_s3) = runs["local"], runs["s3"]
    assert crop_rows(crop_s3) == crop_rows(crop) and crop_s3.info["chunks"] != []
    assert (crop_s3.info["found"], crop_s3.info["sidecars"]) == (crop.info["found"], crop.info["sidecars"]) == (11, 1)
    assert tars_s3 == tars and len(tars) >= 2
    assert shard_s3.info["sharded"] == shard.info["sharded"] == 7  # 6 images + odd.data
    assert any(r["sidecar"] == "red_hair, smile\n" for r in crop_rows(crop_s3))


def test_an_object_gone_since_the_listing_is_a_recorded_reject(tmp_path, s3_server, wd_model):
    src = make_source(tmp_path / "src")
    url = s3_server.bucket("gone")
    s3_server.upload(src, url)
    cfg = config(tmp_path / "shards", url, wd_model, "gone")
    with listing_scope():
        assert source_listing(cfg).found == 11
        s3_server.fs().rm_file(f"{url.removeprefix('s3://')}/char1/2.png")
        crop = crop_stage(cfg)  # the same listing: the object is still in it
    gone = [r for r in crop_rows(crop) if r["source"] == "char1/2.png"]
    assert gone[0]["ok"] is False and gone[0]["reason"] == f"vanished: {url}/char1/2.png was listed but is gone"
    assert crop.info["found"] == 11 and crop.info["rejected"] == 5


def test_a_missing_bucket_fails_before_any_work_naming_the_setting(tmp_path, s3_server, wd_model):
    cfg = config(tmp_path / "shards", "s3://no-such-bucket/images", wd_model, "nope")
    with pytest.raises(StoreError, match=r"data\.source=s3://no-such-bucket/images: cannot use the store"):
        crop_stage(cfg)
    assert not (cfg.dataset_dir / "work").exists()


def test_a_manifest_in_a_bucket_names_objects_relative_to_it_and_in_other_buckets(tmp_path, s3_server, wd_model):
    src = make_source(tmp_path / "src")
    a, b = s3_server.bucket("a"), s3_server.bucket("b")
    s3_server.upload(src / "char0", f"{a}/char0")
    s3_server.upload(src / "char1", f"{b}/x")
    lines = ["url,tags", "char0/0.png,\"blue_sky, smile\"", "char0/1.png,", f"{b}/x/2.png,cat"]
    s3_server.fs().pipe_file(f"{a.removeprefix('s3://')}/list.csv", "\n".join(lines).encode())
    crop = crop_stage(config(tmp_path / "shards", f"{a}/list.csv", wd_model, "m"))
    rows = {r["source"]: r for r in crop_rows(crop)}
    assert set(rows) == {"char0/0.png", "char0/1.png", f"{b}/x/2.png"} and all(r["ok"] for r in rows.values())
    assert [rows[k]["sidecar"] for k in sorted(rows)] == ["blue_sky, smile", None, "cat"]
    local = crop_rows(crop_stage(config(tmp_path / "shards", src, wd_model, "l")))
    assert rows[f"{b}/x/2.png"]["image"] == next(r["image"] for r in local if r["source"] == "char1/2.png")


@pytest.mark.parametrize("ahead", [1, 3])
def test_a_bucket_is_walked_folder_by_folder_in_a_local_folders_order(tmp_path, s3_server, monkeypatch, ahead):
    """Folders listed a few at a time give the files, sidecars and order of `os.walk` on the same tree."""
    import tagdit.data.walk as walk

    src = make_source(tmp_path / "src")
    for rel in ("a/b/1.png", "a/b/c/2.png", "a-c/3.png", "a/4.png", "a/4.txt", "a/.h/5.png", "z/6.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    url = s3_server.bucket("src") + "/images"
    s3_server.upload(src, url)
    monkeypatch.setattr(walk, "LIST_AHEAD", ahead)

    def facts(files):
        return [(f.rel, f.size, f.sidecar) for f in files]

    counts = [walk.WalkCounts(), walk.WalkCounts()]
    local, bucket = facts(walk.folder_files(src, counts[0])), facts(walk.url_files(url, counts[1]))
    assert bucket == local and len(local) == 16 and counts[0].sidecars == counts[1].sidecars == 2
    assert [r for r, _, _ in local].index("a/b/c/2.png") < [r for r, _, _ in local].index("a-c/3.png")  # depth first

