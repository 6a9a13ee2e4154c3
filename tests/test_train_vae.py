import json
from pathlib import Path

import pytest
import torch

import tagdit.train.vae as tv
from tagdit.config import load_config
from tagdit.formats.checkpoints import load_weights
from tagdit.formats.trained_models import load_vae
from tagdit.train.loop import NonFiniteLossError
from tasks.train_vae import train_vae_stage
from tasks.trainer import TrainerStage
from tests.model_fixtures import TINY_VAE, as_override
from tests.shard_fixtures import shard_record

REAL_LOSS = tv.vae_loss
TINY = as_override("vae.model", TINY_VAE)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp_path: Path, dataset: Path, *extra: str):
    return load_config(None, [
        f"data.root={dataset.parent}", f"data.name={dataset.name}", "data.resolution=32",
        f"run.root={tmp_path / 'runs'}", TINY, "vae.w_perc=0", "vae.train.steps=8",
        "vae.train.batch_size=4", "vae.train.warmup_steps=2", "vae.train.lr=3e-3",
        "vae.train.checkpoint_every=4", "vae.train.val_every=4", "vae.train.log_every=1",
        "vae.train.shuffle_buffer=8", *extra,
    ])  # fmt: skip


class Stop(Exception):
    """Simulated kill."""


def recording_loss(monkeypatch, losses: list, stop_at: int | None = None, nan_at: int | None = None):
    def loss_fn(model, x, step, **kw):
        if step == stop_at:
            raise Stop
        loss, logs = REAL_LOSS(model, x, step, **kw)
        if step == nan_at:
            loss = loss * float("nan")
        losses.append((step, loss.item()))
        return loss, logs

    monkeypatch.setattr(tv, "vae_loss", loss_fn)


@pytest.mark.numerics
def test_resumed_training_matches_uninterrupted_losses_and_weights(tmp_path, dataset, monkeypatch):
    cfg = make_cfg(tmp_path, dataset)
    straight: list = []
    recording_loss(monkeypatch, straight)
    tv.train_vae(cfg, dataset, tmp_path / "a")

    resumed: list = []
    recording_loss(monkeypatch, resumed, stop_at=6)  # killed after step 6; last checkpoint at 4
    with pytest.raises(Stop):
        tv.train_vae(cfg, dataset, tmp_path / "b")
    assert (tmp_path / "b" / "latest").read_text().strip() == "ckpt-0000004"
    recording_loss(monkeypatch, resumed)
    tv.train_vae(cfg, dataset, tmp_path / "b")

    assert [s for s, _ in resumed] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]
    assert straight == resumed[:4] + resumed[6:]
    assert resumed[4:6] == straight[4:6]  # the redone steps repeat exactly too
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_weights(tmp_path / "a" / "ckpt-0000008" / name)[0]
        b = load_weights(tmp_path / "b" / "ckpt-0000008" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "a" / "ckpt-0000008" / "meta.json").read_text())
    assert meta["metrics"]["val_psnr"] > 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, dataset, monkeypatch):
    cfg = make_cfg(tmp_path, dataset)
    recording_loss(monkeypatch, [], nan_at=5)
    with pytest.raises(NonFiniteLossError, match="step 6"):
        tv.train_vae(cfg, dataset, tmp_path / "run")
    model, ckpt = load_vae(tmp_path / "run")
    assert ckpt.name == "ckpt-0000004"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stage_records_checkpoint_facts_and_is_reused(tmp_path, dataset, monkeypatch):
    cfg = make_cfg(tmp_path, dataset, "vae.train.steps=4")
    shards = shard_record(dataset)
    rec = train_vae_stage(cfg, shards)
    info = rec.info
    ckpt = Path(info["checkpoint"])
    assert ckpt.name == "ckpt-0000004" and info["step"] == 4
    assert info["vae_id"] == info["ema_sha256"][:12] and info["params"] > 0 and info["val_psnr"] > 0
    model, _ = load_vae(ckpt)
    assert model.downsample_factor == 8 and model.cfg.widths == [8, 16, 16]

    monkeypatch.setattr(TrainerStage, "run_training", lambda *a, **k: pytest.fail("should be cached"))
    assert train_vae_stage(cfg, shards) == rec
    monkeypatch.undo()
    # another architecture in the same run dir: the old run is moved aside, not resumed
    cfg2 = make_cfg(tmp_path, dataset, "vae.train.steps=4", "vae.model.z_channels=8")
    rec2 = train_vae_stage(cfg2, shards)
    assert load_vae(Path(rec2.info["checkpoint"]))[0].cfg.z_channels == 8
    assert len(list((tmp_path / "runs" / "demo").glob("vae.superseded-*"))) == 1


def test_random_flip_is_drawn_from_the_sample_seed(dataset):
    from webdataset.tariterators import tarfile_samples

    from tagdit.formats.image_shards import decode_image, image_bytes, image_shards

    raw = next(iter(tarfile_samples([{"url": str(image_shards(dataset, "train")[0])}])))
    plain = decode_image(image_bytes(raw), 32)
    assert plain.shape == (3, 32, 32) and -1 <= plain.min() and plain.max() <= 1
    flips = []
    for seed in range(16):
        x = tv.decode_train({**raw, "__seed__": seed}, 32)
        assert torch.equal(x, tv.decode_train({**raw, "__seed__": seed}, 32))  # same seed, same image
        flips.append(torch.equal(x, plain.flip(-1)))
        assert flips[-1] or torch.equal(x, plain)
    assert 0 < sum(flips) < 16


def test_train_crop_is_a_seeded_window_on_the_latent_grid(dataset):
    from webdataset.tariterators import tarfile_samples

    from tagdit.formats.image_shards import image_shards

    raw = next(iter(tarfile_samples([{"url": str(image_shards(dataset, "train")[0])}])))
    corners = set()
    for seed in range(24):
        whole = tv.decode_train({**raw, "__seed__": seed}, 32)  # same flip as the crop below
        x = tv.decode_train({**raw, "__seed__": seed}, 32, crop=16, f=4)
        assert x.shape == (3, 16, 16)
        assert torch.equal(x, tv.decode_train({**raw, "__seed__": seed}, 32, crop=16, f=4))
        hits = [(i, j) for i in range(0, 17, 4) for j in range(0, 17, 4)
                if torch.equal(x, whole[:, i : i + 16, j : j + 16])]
        assert hits, "the crop is a window of the (flipped) image at a multiple of f"
        corners.add(hits[0])
    assert len(corners) > 3


def test_train_crop_must_fit_the_latent_grid(tmp_path, dataset):
    with pytest.raises(ValueError, match="multiple of the VAE's f"):
        make_cfg(tmp_path, dataset, "vae.train_crop=12")  # TINY_VAE: f = 8


def test_training_on_crops_validates_whole_images(tmp_path, dataset):
    cfg = make_cfg(tmp_path, dataset, "vae.train_crop=16", "vae.train.steps=4")
    rec = train_vae_stage(cfg, shard_record(dataset))
    assert rec.info["val_psnr"] > 0  # PSNR over whole 32 px validation images
    model, _ = load_vae(Path(rec.info["checkpoint"]))
    assert model(torch.zeros(1, 3, 32, 32), sample=False)[0].shape == (1, 3, 32, 32)


DISC = ("vae.disc_start=2", "vae.disc_channels=8", "vae.disc_layers=2")


def disc_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["extra"]


def test_discriminator_trains_from_disc_start_and_not_before(tmp_path, dataset):
    cfg = make_cfg(tmp_path, dataset, *DISC, "vae.train.steps=3", "vae.train.checkpoint_every=1")
    tv.train_vae(cfg, dataset, tmp_path / "run")
    s1, s2, s3 = (disc_state(tmp_path / "run" / f"ckpt-000000{i}") for i in (1, 2, 3))
    assert s1["disc"].keys() == s3["disc"].keys()
    assert all(torch.equal(s1["disc"][k], s2["disc"][k]) for k in s1["disc"])  # steps 1-2: untouched
    assert not s2["d_opt"]["state"]  # never stepped
    assert any(not torch.equal(s2["disc"][k], s3["disc"][k]) for k in s2["disc"])  # step 3 (index 2): trained
    assert s3["d_opt"]["state"] and tuple(s3["d_opt"]["param_groups"][0]["betas"]) == (0.5, 0.9)


@pytest.mark.numerics
def test_resume_after_the_discriminator_started_matches_an_uninterrupted_run(tmp_path, dataset, monkeypatch):
    cfg = make_cfg(tmp_path, dataset, *DISC)
    straight: list = []
    recording_loss(monkeypatch, straight)
    tv.train_vae(cfg, dataset, tmp_path / "a")

    resumed: list = []
    recording_loss(monkeypatch, resumed, stop_at=6)  # killed in step 7; resumes from ckpt-4 (D trained since 3)
    with pytest.raises(Stop):
        tv.train_vae(cfg, dataset, tmp_path / "b")
    recording_loss(monkeypatch, resumed)
    tv.train_vae(cfg, dataset, tmp_path / "b")

    assert straight == resumed[:4] + resumed[6:]
    a, b = tmp_path / "a" / "ckpt-0000008", tmp_path / "b" / "ckpt-0000008"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_weights(a / name)[0], load_weights(b / name)[0]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    da, db = disc_state(a), disc_state(b)
    assert all(torch.equal(da["disc"][k], db["disc"][k]) for k in da["disc"])
    ea, eb = da["d_opt"]["state"], db["d_opt"]["state"]
    assert ea.keys() == eb.keys() and all(torch.equal(ea[i]["exp_avg"], eb[i]["exp_avg"]) for i in ea)
