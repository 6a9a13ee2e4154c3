"""The on-disk formats: each written by its owner module and read back by the same module."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tagdit.data.metrics import psnr
from tagdit.data.vocab import SPECIALS, Vocab
from tagdit.demo.stand_in_latents import fixture_stats
from tagdit.formats.image_shards import (
    MTIME,
    ShardFile,
    decode_image,
    image_sample,
    image_shards,
    open_image,
    read_samples,
)
from tagdit.formats.latent_shards import (
    LatentShardWriter,
    LatentStats,
    has_flip,
    iter_latent_samples,
    latent_shard_name,
    latent_shard_paths,
    npy_bytes,
    read_meta,
    read_npy,
    read_posterior,
)
from tagdit.formats.selected_tags import (
    CHARACTER,
    GENERAL,
    RATING,
    RATING_ID,
    TagLabels,
    write_tags_csv,
)
from tagdit.formats.wd_image import centre_box, centre_crop, pad_square

META = {"tags": ["blue hair", "smile"], "scores": [0.912345, 0.5], "rating": "general", "source": "a/b.png",
        "orig_size": [40, 30], "crop_box": [5, 0, 35, 30], "sha256": "0" * 64}


def test_latent_stats_round_trip_through_stats_json(tmp_path):
    stats = fixture_stats(0.25, (4, 8, 8), count=10)
    path = stats.save(tmp_path)
    assert path == tmp_path / "stats.json"
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"scale_factor", "mean", "std", "count", "values", "latent_shape", "vae_checkpoint_sha256",
                            "vae_id", "vae_checkpoint", "weights", "seed", "samples"}
    assert on_disk["scale_factor"] == 0.25 and on_disk["latent_shape"] == [4, 8, 8]
    assert LatentStats.load(tmp_path) == stats


def test_scale_factor_maps_vae_latents_to_model_space_and_back():
    stats = fixture_stats(0.25, (4, 2, 2), count=1)
    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stats.to_model(z), z * 0.25)
    torch.testing.assert_close(stats.to_vae(stats.to_model(z)), z)
    torch.testing.assert_close(stats.to_model(stats.to_vae(z)), z)


@pytest.mark.parametrize("a", [
    np.arange(256, dtype=np.float16).reshape(4, 8, 8),
    np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 4, 5),
    np.asfortranarray(np.ones((3, 2))),
    np.array(5.0),
])
def test_read_npy_equals_np_load(a):
    raw = npy_bytes(a)
    for _ in range(2):  # parsed, then from the header cache
        b = read_npy(raw)
        ref = np.load(io.BytesIO(raw))
        assert b.dtype == ref.dtype == a.dtype and b.shape == a.shape and np.array_equal(b, ref)
        assert b.flags.writeable


def test_posterior_sample_is_mean_plus_std_times_seeded_noise():
    from models.vae import AutoencoderKL

    mean = torch.linspace(-1, 1, 32).reshape(2, 1, 4, 4)
    logvar = torch.full_like(mean, np.log(0.09))  # std 0.3
    z = AutoencoderKL.sample(mean, logvar, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, mean + 0.3 * eps)
    assert torch.equal(z, AutoencoderKL.sample(mean, logvar, generator=torch.Generator().manual_seed(7)))


def test_latent_sample_round_trips_with_and_without_flip(tmp_path):
    rng = np.random.default_rng(0)
    mean, logvar, fmean = (rng.normal(size=(4, 2, 2)).astype(np.float32) for _ in range(3))
    with LatentShardWriter(tmp_path / latent_shard_name("train", 0)) as w:
        w.write("a", b'{"tags": ["x"]}', mean, logvar)
        w.write("b", b"{}", mean, logvar, fmean, logvar)
    assert latent_shard_paths(tmp_path, "train") == [tmp_path / "train-000000.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]  # no temporary file left
    a, b = iter_latent_samples(latent_shard_paths(tmp_path, "train"))
    assert not has_flip(a) and has_flip(b) and read_meta(a) == {"tags": ["x"]}
    m, lv = read_posterior(a)
    assert m.dtype == lv.dtype == np.float16 and np.array_equal(m, mean.astype(np.float16))
    assert np.array_equal(read_posterior(b, flipped=True)[0], fmean.astype(np.float16))


def test_image_shard_sample_round_trips(tmp_path):
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path = tmp_path / "images" / "val-000000.tar"
    shard = ShardFile(path)
    shard.write(image_sample("k0", "png", buf.getvalue(), {**META, "extra": 1}))
    shard.close()
    assert image_shards(tmp_path, "val") == [path] and image_shards(tmp_path, "train") == []
    with tarfile.open(path) as tf:
        assert {m.mtime for m in tf.getmembers()} == {MTIME}
    [(data, meta)] = list(read_samples(tmp_path, "val"))
    assert data == buf.getvalue() and meta == {**META, "scores": [0.9123, 0.5]}
    assert open_image(data).getpixel((0, 0)) == (255, 0, 0)
    x = decode_image(data, 4, flip=True)  # (3, 4, 4), resized
    assert x.shape == (3, 4, 4) and torch.allclose(x[0], torch.ones(4, 4)) and torch.allclose(x[1], -torch.ones(4, 4))
    assert list(read_samples(tmp_path, "val", limit=0)) == []


def test_vocab_json_round_trip(tmp_path):
    vocab = Vocab.from_tags(["blue hair", "^_^"])
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == {"tokens": [*SPECIALS, "blue hair", "^_^"]}
    assert Vocab.load(tmp_path / "vocab.json").tokens == vocab.tokens
    with pytest.raises(ValueError):
        Vocab(["blue hair", *SPECIALS])


def test_selected_tags_csv_round_trip(tmp_path):
    names, cats = ["general", "blue hair", "^_^", "aoi (tagdit)"], [RATING, GENERAL, GENERAL, CHARACTER]
    write_tags_csv(tmp_path / "t.csv", names, cats, np.array([5, 4, 3, 2]))
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "tag_id,name,category,count" and lines[1] == f"{RATING_ID},general,9,5"
    assert lines[2].split(",")[1:] == ["blue_hair", "0", "4"]
    labels = TagLabels.from_csv(tmp_path / "t.csv")
    assert labels.names == names and labels.categories.tolist() == cats
    assert labels.indexes(CHARACTER).tolist() == [3]


def test_centre_box_crop_and_pad_square():
    assert centre_box(10, 4) == (3, 0, 7, 4) and centre_box(4, 9) == (0, 2, 4, 6)
    a = np.zeros((4, 10, 3), np.uint8)
    a[:, 3:7] = 200  # the centre square
    assert np.asarray(centre_crop(Image.fromarray(a), 4, Image.NEAREST)).min() == 200
    sq = np.asarray(pad_square(Image.new("RGB", (3, 6), (0, 0, 0))))  # (6, 6, 3)
    assert sq.shape == (6, 6, 3) and sq[:, 1:4].max() == 0 and sq[:, 0].min() == sq[:, 4:].min() == 255


def test_psnr_of_known_error():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.2, 0.02]).view(2, 1, 1, 1)  # errors 0.1 and 0.01 on the [0, 1] scale
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0]))


def test_checkpoint_meta_reads_back_what_checkpoints_save_writes(tmp_path):
    from tagdit.formats.checkpoints import CheckpointMeta, Checkpoints, read_checkpoint_meta

    model = torch.nn.Linear(2, 2)
    ckpt = Checkpoints(tmp_path).save(12, model=model, ema=model, config={}, state={},
                                      meta={"metrics": {"loss": 0.5, "val_loss": 0.25}, "desc": "train-dit"})
    assert read_checkpoint_meta(ckpt) == CheckpointMeta(12, {"loss": 0.5, "val_loss": 0.25}, "train-dit")


def test_checkpoint_meta_of_a_folder_without_meta_json_is_a_clear_error(tmp_path):
    from tagdit.formats.checkpoints import read_checkpoint_meta

    with pytest.raises(FileNotFoundError, match="not a checkpoint folder: it has no meta.json"):
        read_checkpoint_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="records no step"):
        read_checkpoint_meta(tmp_path)
