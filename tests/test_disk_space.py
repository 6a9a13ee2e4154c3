"""Checkpoints that fit the disk: the projection at a trainer's start, and a write that fails on a full disk."""

from __future__ import annotations

import errno
import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tagdit.config import load_config
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.formats.checkpoints import Checkpoints, load_weights
from tagdit.train import disk
from tagdit.train.disk import DiskSpaceError, future_checkpoints, peak_new
from tasks.train_dit import train_dit_stage
from tests.run_fixtures import config, records

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["dit.train.steps=6", "dit.train.checkpoint_every=2", "dit.train.log_every=2", "dit.train.val_every=6",
       "dit.train.batch_size=4"]
Usage = namedtuple("Usage", "total used free")


def test_checkpoint_counts_follow_the_schedule_and_retention():
    assert future_checkpoints(0, 437_500, 5000) == 88  # 87 multiples + the last step
    assert future_checkpoints(0, 10, 5) == 2 and future_checkpoints(10, 10, 5) == 0
    assert future_checkpoints(4, 10, 4) == 2  # 8 and the last step, 10
    assert peak_new(0, 88, 3) == 4  # 3 kept + the one being written
    assert peak_new(3, 10, 3) == 1 and peak_new(5, 10, 3) == 1  # an old run's extra ones are pruned after the next
    assert peak_new(0, 2, 3) == 2 and peak_new(0, 88, None) == 88 and peak_new(4, 0, 3) == 0


def test_the_original_preset_fits_a_64_gib_disk_by_its_own_projection():
    from tagdit.train.dit import dit_checkpoint_bytes
    from tagdit.train.vae import vae_checkpoint_bytes

    cfg = load_config("configs/original-256.yaml")
    for section, per_ckpt in (("dit", dit_checkpoint_bytes(cfg, vocab_size=cfg.shards.max_vocab + 4,
                                                           latent_shape=(4, 32, 32))),
                              ("vae", vae_checkpoint_bytes(cfg))):
        tc = getattr(cfg, section).train
        assert tc.keep_checkpoints == 3 and tc.checkpoint_every == 5000
        n = peak_new(0, future_checkpoints(0, tc.steps, tc.checkpoint_every), tc.keep_checkpoints)
        assert n * per_ckpt < 64 * 2**30, (section, n, per_ckpt)
    assert 4.0e9 < dit_checkpoint_bytes(cfg, vocab_size=1004, latent_shape=(4, 32, 32)) < 4.5e9  # 264M x 16 B
    assert cfg.dit.train.grad_clip is None and cfg.vae.train.grad_clip is None  # the original clipped nothing
    assert cfg.dit.sample_every == 5000


def test_a_run_that_cannot_fit_is_refused_before_training_with_the_numbers(tmp_path, monkeypatch):
    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=4, per_shard=4)
    cfg = config(tmp_path, *RUN, "dit.train.keep_checkpoints=2")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 50_000, 50_000))
    with pytest.raises(DiskSpaceError) as e:
        train_dit_stage(cfg, *records(latents))
    msg = str(e.value)
    assert "3 x" in msg and "dit.train.keep_checkpoints=2" in msg and "0.00 GB free" in msg
    assert "dit.train.checkpoint_every" in msg and "run.root" in msg
    assert not list((cfg.run_dir / "dit").glob("ckpt-*"))  # refused before the first step
    keep_all = config(tmp_path, *RUN)
    keep_all.dit.train.keep_checkpoints = None
    with pytest.raises(DiskSpaceError, match=r"3 x .*keep_checkpoints is unset"):
        train_dit_stage(keep_all, *records(latents))


def test_a_tight_disk_warns_and_trains(tmp_path, monkeypatch, caplog):
    from tasks.train_dit import TRAINER

    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=4, per_shard=4)
    cfg = config(tmp_path, *RUN, "dit.train.keep_checkpoints=1")
    need = 2 * TRAINER.checkpoint_bytes(cfg, (latents, tmp_path / "ds" / "vocab.json"))
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10**12, 0, int(need * 1.05)))
    with caplog.at_level(logging.WARNING, logger="tagdit.train.disk"):
        rec = train_dit_stage(cfg, *records(latents))
    assert rec.info["step"] == 6 and "less than 10% to spare" in caplog.text
    assert [c.name for c in (cfg.run_dir / "dit").glob("ckpt-*")] == ["ckpt-0000006"]


def test_a_full_disk_mid_write_keeps_latest_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    import tagdit.formats.checkpoints as checkpoints

    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=4, per_shard=4)
    straight = config(tmp_path, *RUN, "run.name=straight")
    train_dit_stage(straight, *records(latents))

    cfg = config(tmp_path, *RUN, "run.name=full")
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *a, **kw):  # the 2nd checkpoint's state.pt hits ENOSPC half-written
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_the_disk_fills)
    with pytest.raises(OSError, match="No space left") as e:
        train_dit_stage(cfg, *records(latents))
    assert "ckpt-0000004" in str(e.value) and "latest is still ckpt-0000002" in str(e.value)
    run = cfg.run_dir / "dit"
    assert Checkpoints(run).latest() == run / "ckpt-0000002"
    assert sorted(p.name for p in run.iterdir() if "ckpt" in p.name) == ["ckpt-0000002"]  # no temp folder left
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    rec = train_dit_stage(cfg, *records(latents))  # the retry: resumes from step 2
    assert rec.info["step"] == 6
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_weights(straight.run_dir / "dit" / "ckpt-0000006" / name)[0]
        b = load_weights(run / "ckpt-0000006" / name)[0]
        assert all(torch.equal(a[k], b[k]) for k in a), name  # same process, kernels and shapes: exact


def test_a_real_small_file_system_refuses_up_front(tmp_path):
    """On a 2 MiB tmpfs (root only) the projection sees the real free space."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=4, per_shard=4)
        cfg = config(tmp_path, *RUN, f"run.root={mnt}/runs", "dit.model.width=128", "dit.model.depth=4")
        with pytest.raises(DiskSpaceError, match=f"{mnt}"):
            train_dit_stage(cfg, *records(latents))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)
