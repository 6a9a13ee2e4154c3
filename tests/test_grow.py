"""A growing dataset: adding or changing a file re-does only its hash bucket, and nothing stale survives."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import tagdit.data.crop
import tagdit.data.encode
import tasks.encode as enc
from models.vae import build_vae
from tagdit.config import load_config
from tagdit.data.tagger import WDTagger
from tagdit.formats.checkpoints import save_weights_only
from tagdit.formats.image_shards import image_shards, iter_image_samples
from tagdit.formats.latent_shards import latent_shard_paths
from tagdit.formats.sources import SOURCES, read_buckets, read_sources
from tasks.crop import crop_stage
from tasks.shard import shard_stage
from tasks.tag import tag_stage
from tests.model_fixtures import TINY_VAE

pytestmark = pytest.mark.usefixtures("one_thread")


def colour(folder: int, i: int) -> tuple[int, int, int]:
    return (30 * folder + 7 * i) % 256, (90 + 13 * i) % 256, (200 - 20 * folder) % 256


def make_source(src: Path, folders: int, per_folder: int) -> Path:
    """`folders` folders of `per_folder` solid-colour images each: a folder per character."""
    for f in range(folders):
        (src / f"char{f}").mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            Image.new("RGB", (36 + i % 5, 40), colour(f, i)).save(src / f"char{f}" / f"{i:03d}.png")
    return src


def grow_config(root: Path | str, src: Path, wd: Path, *extra: str):
    return load_config(None, [f"data.source={src}", f"data.root={root}", "data.name=g", "data.resolution=32",
                              "crop.workers=1", f"tagger.path={wd}", "shards.samples_per_shard=8",
                              "shards.val_fraction=0.1", "shards.min_tag_count=1", "latents.batch_size=4",
                              "vae.train.device=cpu", *extra])


def prepare(root: Path, src: Path, wd: Path, *extra: str):
    cfg = grow_config(root, src, wd, *extra)
    crop = crop_stage(cfg)
    tag = tag_stage(cfg, crop)
    return cfg, crop, shard_stage(cfg, crop, tag)


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    """A random-init tiny VAE checkpoint (raw == EMA)."""
    torch.manual_seed(0)
    model = build_vae(TINY_VAE)
    return save_weights_only(tmp_path_factory.mktemp("vae") / "ckpt-0000001", model,
                             TINY_VAE.model_dump(mode="json"), step=1)


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every chunk and shard under `folders` by folder/name."""
    return {f"{d.name}/{p.name}": p.read_bytes() for d in folders for p in sorted(d.iterdir())
            if p.suffix in (".parquet", ".tar")}


def count_calls(monkeypatch, owner, name: str) -> list:
    """Record the first argument of every call of owner.name (and still make the call)."""
    real, calls = getattr(owner, name), []

    def counted(*a, **k):
        calls.append(a[1] if len(a) > 1 else a[0])
        return real(*a, **k)

    monkeypatch.setattr(owner, name, counted)
    return calls


def encoded_keys(monkeypatch) -> list[str]:
    """Keys of the images the VAE encodes from now on (reused posteriors are not)."""
    real, keys = tagdit.data.encode.image_batches, []

    def counted(*a, **k):
        for raws, x in real(*a, **k):
            keys.extend(r["__key__"] for r in raws)
            yield raws, x

    monkeypatch.setattr(tagdit.data.encode, "image_batches", counted)
    return keys


def assert_latents_follow_images(ds: Path, latents: Path) -> None:
    for split in ("train", "val"):
        assert [p.name for p in image_shards(ds, split)] == [p.name for p in latent_shard_paths(latents, split)]
        for p in image_shards(ds, split):
            want = [r["__key__"] for r in iter_image_samples(p)]
            assert [r["__key__"] for r in iter_image_samples(latents / p.name)] == want, p.name


def test_adding_one_file_redoes_only_its_bucket(tmp_path, wd_model, vae_ckpt, monkeypatch):
    src = make_source(tmp_path / "src", folders=4, per_folder=12)
    cfg, crop, shard = prepare(tmp_path, src, wd_model)
    ds, latents = cfg.dataset_dir, tmp_path / "latents"
    enc.encode_latents(cfg, ds, vae_ckpt, latents, "abc")
    assert crop.info["buckets"] == 8 == read_buckets(ds)  # 48 files / 8 per shard -> the power of two 8
    before = snapshot(ds / "work/crop", ds / "work/tag", ds / "images", latents)

    cropped = count_calls(monkeypatch, tagdit.data.crop, "crop_row")
    tagged = []
    real_tag = WDTagger.tag_images
    monkeypatch.setattr(WDTagger, "tag_images", lambda self, imgs: real_tag(self, (tagged.append(i) or i for i in imgs)))
    encoded = encoded_keys(monkeypatch)
    Image.new("RGB", (44, 40), (250, 10, 10)).save(src / "char1" / "new.png")
    cfg, crop2, shard2 = prepare(tmp_path, src, wd_model)
    enc.encode_latents(cfg, ds, vae_ckpt, latents, "abc")
    after = snapshot(ds / "work/crop", ds / "work/tag", ds / "images", latents)

    new = next(r for r in read_sources(ds / SOURCES) if r["rel"] == "char1/new.png")
    bucket, groups = new["bucket"], 1  # 8 buckets x 0.1 val fraction -> one val group
    assert crop2.info["buckets"] == 8 and crop2.info["found"] == 49 == shard2.info["sharded"] + shard2.info["rejected"]
    assert [f.rel for f in cropped] == ["char1/new.png"] and len(tagged) == 1 and len(encoded) == 1
    gone, added = set(before) - set(after), set(after) - set(before)
    changed = {n for n in set(before) & set(after) if before[n] != after[n]}
    may_change = {f"-{bucket:05d}-", f"val-{bucket % groups:05d}-"}
    assert all(any(m in n for m in may_change) for n in gone | added | changed), (gone, added, changed)
    kept = [n for n in after if n.startswith(("images/", "latents/")) and not any(m in n for m in may_change)]
    assert len(kept) >= 6 and all(before[n] == after[n] for n in kept)  # other buckets' shards keep their bytes
    assert len([n for n in added if n.startswith("crop/")]) == 1 == len([n for n in added if n.startswith("tag/")])
    assert_latents_follow_images(ds, latents)


def test_a_folder_per_character_is_mixed_into_every_shard(tmp_path, wd_model):
    src = make_source(tmp_path / "src", folders=8, per_folder=48)
    _, _, shard = prepare(tmp_path, src, wd_model, "data.buckets=4", "shards.samples_per_shard=1000")
    assert len(shard.info["train_shards"]) == 4  # one per bucket, ~86 samples each
    for p in image_shards(Path(shard.out_dir), "train"):
        chars = Counter(json.loads(r["json"])["source"].split("/")[0] for r in iter_image_samples(p))
        n = sum(chars.values())
        # each character holds 1/8 of the source: in every shard it holds between half and twice that share
        assert len(chars) == 8 and all(n / 16 <= c <= n / 4 for c in chars.values()), (p.name, chars)


def test_a_changed_image_re_encodes_its_latent_shard_with_the_same_vae(tmp_path, wd_model, vae_ckpt, monkeypatch):
    src = make_source(tmp_path / "src", folders=4, per_folder=12)
    cfg, _, _ = prepare(tmp_path, src, wd_model)
    ds, latents = cfg.dataset_dir, tmp_path / "latents"
    enc.encode_latents(cfg, ds, vae_ckpt, latents, "abc")
    images_before, latents_before = snapshot(ds / "images"), snapshot(latents)

    target = src / "char2" / "005.png"
    Image.new("RGB", Image.open(target).size, (0, 255, 0)).save(target)  # new pixels, same name
    encoded = encoded_keys(monkeypatch)
    shards = count_calls(monkeypatch, tagdit.data.encode, "encode_shard")
    prepare(tmp_path, src, wd_model)
    enc.encode_latents(cfg, ds, vae_ckpt, latents, "abc")
    images_after, latents_after = snapshot(ds / "images"), snapshot(latents)

    changed_images = {n.split("/")[1] for n in images_after if images_before.get(n) != images_after[n]}
    changed_latents = {n.split("/")[1] for n in latents_after if latents_before.get(n) != latents_after[n]}
    key = tagdit.data.crop.sample_key("char2/005.png")
    assert len(changed_images) >= 1 and changed_latents == changed_images == {Path(p).name for p in shards}
    assert encoded == [key]  # the other samples of the rewritten shard keep their posteriors
    assert all(latents_before[n] == latents_after[n] for n in latents_after if n.split("/")[1] not in changed_images)
    assert_latents_follow_images(ds, latents)


def test_the_source_tree_is_walked_once_per_crop_stage_run(tmp_path, monkeypatch):
    src = make_source(tmp_path / "src", folders=3, per_folder=4)
    cfg = load_config(None, [f"data.source={src}", f"data.root={tmp_path}", "data.name=g", "data.resolution=32",
                             "crop.workers=1"])
    real, walks = os.walk, []
    monkeypatch.setattr(os, "walk", lambda *a, **k: (walks.append(a[0]), real(*a, **k))[1])
    real_scandir, scans = os.scandir, []
    monkeypatch.setattr(os, "scandir", lambda *a, **k: (scans.append(str(a[0]) if a else "."), real_scandir(*a, **k))[1])
    first = crop_stage(cfg)
    assert len(walks) == 1 and first.info["found"] == 12
    assert crop_stage(cfg) == first and len(walks) == 2  # unchanged: one walk for key, stamp check and plan
    Image.new("RGB", (40, 40), (1, 2, 3)).save(src / "char0" / "late.png")
    assert crop_stage(cfg).info["found"] == 13 and len(walks) == 3  # a new stage run lists again
    assert len([s for s in scans if s.startswith(str(src))]) == 3 * 4  # os.walk's, per folder: the root and 3
    assert [r["rel"] for r in read_sources(cfg.dataset_dir / SOURCES) if r["rel"].endswith("late.png")]


def test_a_prepare_data_flow_run_walks_the_source_tree_once(prefect_env, tmp_path, wd_model, monkeypatch):
    from flows.prepare_data import prepare_data_flow

    src = make_source(tmp_path / "src", folders=2, per_folder=3)
    args = [f"data.source={src}", f"data.root={tmp_path / 'shards'}", "data.name=g", "data.resolution=32",
            "crop.workers=1", f"tagger.path={wd_model}", "shards.min_tag_count=1"]
    real, walks = os.walk, []
    monkeypatch.setattr(os, "walk", lambda *a, **k: (walks.append(a[0]), real(*a, **k))[1])
    prepare_data_flow(overrides=args)
    assert walks == [src]  # Prefect's cache key, the stamp check and the crop plan share one listing
    assert prepare_data_flow(overrides=args).cached and walks == [src, src]  # a new flow run lists again


def test_a_grown_dataset_keeps_the_trained_vae_encodes_only_new_shards_and_continues_the_dit(
        tmp_path, wd_model, monkeypatch):
    """The use case: images added to a trained run's dataset; the VAE kept by an explicit setting (not
    retrained, not silently reused), only the new images encoded, the DiT continued from its step."""
    from tasks.encode import encode_stage
    from tasks.train_dit import train_dit_stage
    from tasks.train_vae import train_vae_stage
    from tests.model_fixtures import TINY_VAE, as_override

    train = [f"run.root={tmp_path / 'runs'}", as_override("vae.model", TINY_VAE), "vae.w_perc=0",
             "vae.train.steps=2", "vae.train.batch_size=4", "vae.train.warmup_steps=1", "vae.train.nproc=1",
             "dit.model=demo", "dit.model.patch=2", "dit.model.width=32", "dit.model.depth=1", "dit.model.heads=2",
             "dit.model.tag_heads=2", "dit.model.max_tags=4", "dit.train.device=cpu", "dit.train.nproc=1",
             "dit.train.batch_size=4", "dit.train.warmup_steps=1", "dit.train.val_every=100", "dit.val_samples=2",
             "dit.train.loader_workers=0"]

    def pipeline(*extra: str):
        cfg, _, shard = prepare(tmp_path, src, wd_model, *train, *extra)
        vae = train_vae_stage(cfg, shard)
        latents = encode_stage(cfg, shard, vae)
        return vae, latents, train_dit_stage(cfg, latents, shard)

    src = make_source(tmp_path / "src", folders=2, per_folder=8)
    vae, latents, dit = pipeline("dit.train.steps=2")
    Image.new("RGB", (44, 40), (250, 10, 10)).save(src / "char1" / "new.png")
    encoded = encoded_keys(monkeypatch)
    keep = ["vae.train.continue_on_new_data=true", "dit.train.continue_on_new_data=true"]
    vae2, latents2, dit2 = pipeline("dit.train.steps=4", *keep)
    assert vae2.info["checkpoint"] == vae.info["checkpoint"] and vae2.info["vae_id"] == vae.info["vae_id"]
    assert latents2.out_dir == latents.out_dir and len(encoded) == 1 and encoded[0].startswith("char1_new")
    runs = tmp_path / "runs" / "demo"
    assert dit2.info["step"] == 4 and not list(runs.glob("*.superseded-*"))  # continued, not moved aside
    assert (runs / "dit" / "ckpt-0000002").is_dir() and (runs / "dit" / "ckpt-0000004").is_dir()
