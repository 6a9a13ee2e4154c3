import json
import tarfile
from pathlib import Path

import pytest

import tasks.shard
from tagdit.config import load_config
from tagdit.data.shard import TagStats, val_keys
from tagdit.formats.dataset_tables import (
    read_manifest,
    read_rejects,
    read_tag_table,
    write_tag_table,
)
from tagdit.formats.image_shards import MTIME, ShardIndex
from tagdit.train.tar_samples import tar_sample_count
from tagdit.train.vae import image_shard_counter
from tasks.crop import crop_stage
from tasks.shard import shard_stage
from tasks.tag import tag_stage
from tests.wd_fixture import BAD, GOOD, OTHER

CONTRACT_KEYS = {"tags", "scores", "rating", "source", "orig_size", "crop_box", "sha256"}


def run_all(root: Path, world, *extra):
    src, wd = world
    cfg = load_config(None, [f"data.source={src}", f"data.root={root}", "data.name=t", "data.resolution=32",
                             "crop.max_pixels=1000000", "crop.workers=1",
                             f"tagger.path={wd}", "shards.samples_per_shard=4", "shards.val_fraction=0.2",
                             "shards.min_tag_count=2", *extra])
    crop = crop_stage(cfg)
    tag = tag_stage(cfg, crop)
    return cfg, shard_stage(cfg, crop, tag)


def test_webdataset_reads_every_shard_back_and_accounting_holds(tmp_path, world):
    import webdataset as wds

    _, rec = run_all(tmp_path, world)
    out = Path(rec.out_dir)
    assert rec.info["found"] == GOOD + BAD + OTHER == rec.info["sharded"] + rec.info["rejected"]
    names = rec.info["train_shards"] + rec.info["val_shards"]
    assert sorted(p.name for p in (out / "images").glob("*.tar")) == sorted(names)
    assert rec.info["val_shards"] == ["val-00000-00.tar"]  # 8 buckets x 0.2: one val group
    assert all(n.startswith("train-000") and n.endswith("-00.tar") for n in rec.info["train_shards"])
    urls = [str(out / "images" / n) for n in names]
    seen = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(seen) == rec.info["sharded"] == GOOD
    for s in seen:
        assert s["png"].size == (32, 32) and s["png"].mode == "RGB"
        assert set(s["json"]) == CONTRACT_KEYS and len(s["json"]["tags"]) == len(s["json"]["scores"])
    assert len({s["__key__"] for s in seen}) == GOOD
    recorded = ShardIndex(out / "images").samples()  # what training counts a shard by, reading none
    assert recorded == {n: tar_sample_count(u) for n, u in zip(names, urls, strict=True)}
    counter = image_shard_counter(out)
    assert [counter(f"s3://bucket/t/images/{n}") for n in names] == [recorded[n] for n in names]
    with tarfile.open(urls[0]) as tf:
        assert {m.mtime for m in tf.getmembers()} == {MTIME}
    manifest = read_manifest(out)
    assert sorted(m["key"] for m in manifest) == sorted(s["__key__"] for s in seen)
    assert all(m["shard"] in names and m["split"] == m["shard"].split("-")[0] for m in manifest)
    rejects = read_rejects(out)
    assert len(rejects) == BAD + OTHER and all(r["stage"] == "crop" and r["reason"] for r in rejects)
    assert {r["path"] for r in rejects} >= {"empty.png", "truncated.jpg", "unreadable.jpg"}
    tags = {r["tag"]: r for r in read_tag_table(out)}
    assert tags["red"]["count"] == sum("red" in m["tags"] for m in manifest)
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert vocab[:3] == ["<pad>", "<unk>", "<cls>"]
    assert all(tags[t]["train_count"] >= 2 for t in vocab[3:])


def test_same_inputs_give_byte_identical_shards_and_tables(tmp_path, world):
    _, a = run_all(tmp_path / "a", world)
    _, b = run_all(tmp_path / "b", world)
    for rel in [f"images/{n}" for n in a.info["train_shards"] + a.info["val_shards"]] + [
            "manifest.parquet", "rejects.parquet", "tags.parquet", "vocab.json"]:
        assert (Path(a.out_dir) / rel).read_bytes() == (Path(b.out_dir) / rel).read_bytes(), rel
    assert a.fingerprint == b.fingerprint


def test_more_samples_per_shard_rewrites_and_removes_stale_shards(tmp_path, world):
    _, small = run_all(tmp_path, world, "data.buckets=2", "shards.samples_per_shard=1")
    _, big = run_all(tmp_path, world, "data.buckets=2", "shards.samples_per_shard=100")
    assert big.info["train_shards"] == ["train-00000-00.tar", "train-00001-00.tar"]
    assert len(small.info["train_shards"]) == small.info["n_train"] > 2  # a bucket over samples_per_shard: parts
    assert sorted(p.name for p in Path(big.out_dir, "images").glob("*.tar")) == [*big.info["train_shards"],
                                                                                   "val-00000-00.tar"]
    assert not list(Path(big.out_dir).rglob(".*tmp-*")) and not list(Path(big.out_dir).rglob(".progress-*"))


def test_split_depends_only_on_each_key():
    keys = [f"k{i}" for i in range(2000)]
    val = val_keys(keys, 0.1)
    assert 140 < len(val) < 260
    assert val_keys(keys[:1000], 0.1) == {k for k in val if k in keys[:1000]}
    assert len(val_keys(["a", "b"], 0.01)) == 1 and val_keys(keys, 0.0) == set()


def test_vocab_takes_frequent_train_tags_caps_size_and_skips_ratings(tmp_path):
    stats = TagStats()
    for i in range(10):
        tags = ["common", "general"] + (["mid"] if i < 5 else []) + (["rare"] if i == 0 else [])
        cats = [0, 9] + [0] * (len(tags) - 2)
        stats.add({"tags": tags, "scores": [0.9] * len(tags), "categories": cats}, train=i != 9)
    assert stats.vocab(2, 100).tokens == ["<pad>", "<unk>", "<cls>", "common", "mid"]
    assert stats.vocab(2, 4).tokens == ["<pad>", "<unk>", "<cls>", "common"]
    write_tag_table(tmp_path, stats.table_rows())
    table = {r["tag"]: r for r in read_tag_table(tmp_path)}
    assert table["common"]["count"] == 10 and table["common"]["train_count"] == 9


def test_a_run_killed_mid_stage_keeps_the_finished_units_and_writes_only_the_rest(tmp_path, world, monkeypatch):
    import tagdit.data.shard as shard_lib

    cfg, whole = run_all(tmp_path / "whole", world)
    real, done = shard_lib.shard_unit, []

    def dies_at_the_third(job):
        if len(done) == 2:
            raise RuntimeError("killed")
        done.append(job.unit.name)
        return real(job)

    monkeypatch.setattr(shard_lib, "shard_unit", dies_at_the_third)
    monkeypatch.setattr(tasks.shard, "shard_unit", dies_at_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        run_all(tmp_path / "killed", world)
    records = sorted(p.name for p in (tmp_path / "killed/t/work/shard").glob("*-*.json"))
    assert len(records) == 2 and not (tmp_path / "killed/t/manifest.parquet").exists()
    written = []
    monkeypatch.setattr(tasks.shard, "shard_unit", lambda job: written.append(job.unit.name) or real(job))
    _, again = run_all(tmp_path / "killed", world)
    units = len(list((tmp_path / "whole/t/work/shard").glob("*-*.json")))
    assert len(written) == units - 2 and not set(written) & set(done)
    for rel in [f"images/{n}" for n in whole.info["train_shards"] + whole.info["val_shards"]] + [
            "manifest.parquet", "tags.parquet", "vocab.json", "images/shards.json"]:
        assert (Path(whole.out_dir) / rel).read_bytes() == (Path(again.out_dir) / rel).read_bytes(), rel


def test_the_split_reads_only_the_keys_of_crop_chunks_it_has_not_seen(tmp_path, world, monkeypatch):
    import shutil

    import tagdit.data.shard_plan as plan

    cfg, rec = run_all(tmp_path, world)
    chunks = sorted((tmp_path / "t/work/crop").glob("chunk-*.parquet"))
    parts = tmp_path / "t/work/shard"
    read, real = [], plan.chunk_keys
    monkeypatch.setattr(plan, "chunk_keys", lambda cs: (read.extend(c.name for c in cs), real(cs))[1])
    before = plan.split_summaries(chunks, 0.2, parts)
    assert read == []  # the shard stage kept every chunk's summary
    new = chunks[0].with_name(chunks[0].name.replace(".parquet", "0.parquet"))  # a chunk by another name
    shutil.copy(chunks[0], new)
    after = plan.split_summaries([new, *chunks[1:]], 0.2, parts)
    assert read == [new.name] and after[0][1] == before[0][1] and after[1:] == before[1:]
    assert len(plan.split_summaries(chunks, 0.1, parts)) == len(chunks) and len(read) == 1 + len(chunks)  # new fraction
