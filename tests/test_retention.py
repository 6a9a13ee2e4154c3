"""Checkpoint retention keeps what a record names: a finished stage's stamp or an evaluation's record."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.formats.checkpoints import Checkpoints
from tagdit.train import disk
from tagdit.train.disk import peak_new
from tests.run_fixtures import config, fake_vae_run, records

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ("dit.train.checkpoint_every=2", "dit.train.keep_checkpoints=1", "dit.train.log_every=2",
       "dit.train.val_every=100", "dit.val_samples=2")


def names(d: Path) -> list[str]:
    return sorted(c.name for c in d.glob("ckpt-*"))


def fake_evaluation(cfg, shards, vae, latents, dit, monkeypatch) -> dict:
    """Run the evaluate stage with the sampling and scoring stubbed out (its record and pin are real)."""
    import tasks.evaluate as ev

    def stub(cfg, painter, out, force):
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.png").write_bytes(b"png")
        (out / "metrics.json").write_text("{}")
        r = SimpleNamespace(recall=1.0)
        return SimpleNamespace(grids={"cfg": str(out / "grid.png")}, dit_checkpoint=painter.checkpoint.name,
                               tag_recall_ratio=1.0, tag_recall_ratio_se=0.0, samples_per_prompt=1, vae_psnr_db=0.0,
                               kid_tagger=None, kid={}, cfg=r, unconditional=r, real=r, reconstructed=r,
                               sampler_recall={})

    monkeypatch.setattr(ev, "evaluate_checkpoint", stub)
    monkeypatch.setattr(ev, "EVALUATE", dataclasses.replace(ev.EVALUATE, extra_inputs=lambda cfg: {}))
    return ev.evaluate(cfg, shards, vae, latents, dit, force=True).info


def test_a_resumed_run_keeps_the_checkpoints_the_records_name(tmp_path, monkeypatch):
    from tagdit.formats.trained_models import load_dit
    from tasks.records import vae_record
    from tasks.train_dit import train_dit_stage

    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=2, per_shard=4)
    cfg = config(tmp_path, "dit.train.steps=4", *RUN, "evaluate.device=cpu")
    first = train_dit_stage(cfg, *records(latents))
    fake_vae_run(cfg, latents)
    dit_dir = cfg.run_dir / "dit"
    assert Path(first.info["checkpoint"]).name == "ckpt-0000004" and names(dit_dir) == ["ckpt-0000004"]
    evaluated = fake_evaluation(cfg, records(latents)[1], vae_record(cfg), records(latents)[0], first, monkeypatch)
    assert evaluated["dit_checkpoint"] == "ckpt-0000004"

    # a longer run resumes and saves 4 checkpoints past the retention window (keep 1)
    more = config(tmp_path, "dit.train.steps=12", *RUN, "evaluate.device=cpu")
    projected = []
    real_check = disk.check_disk_space
    monkeypatch.setattr(disk, "check_disk_space", lambda *a, **kw: projected.append(kw) or real_check(*a, **kw))
    second = train_dit_stage(more, *records(latents))
    assert projected[0]["pinned"] == 1  # the disk projection counts the pinned checkpoint beside the kept one
    assert Path(second.info["checkpoint"]).name == "ckpt-0000012"
    assert names(dit_dir) == ["ckpt-0000004", "ckpt-0000012"]  # 6, 8, 10 were pruned; 4 is named
    assert Checkpoints.kept_by(dit_dir / "ckpt-0000004") == ["evaluate"]  # train-dit's pin moved to 12
    assert Checkpoints.kept_by(dit_dir / "ckpt-0000012") == ["train-dit"]
    load_dit(first.info["checkpoint"])  # the first record's checkpoint still loads
    again = fake_evaluation(cfg, records(latents)[1], vae_record(cfg), records(latents)[0], first, monkeypatch)
    assert again["dit_checkpoint"] == "ckpt-0000004"  # evaluate --force of the first record works

    # once no record names it, retention takes it
    fake_evaluation(cfg, records(latents)[1], vae_record(cfg), records(latents)[0], second, monkeypatch)
    train_dit_stage(config(tmp_path, "dit.train.steps=14", *RUN), *records(latents))
    assert names(dit_dir) == ["ckpt-0000012", "ckpt-0000014"]


def test_a_stamp_written_before_pins_existed_is_pinned_when_the_run_resumes(tmp_path, monkeypatch):
    from tasks.train_dit import train_dit_stage

    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=2, per_shard=4)
    first = train_dit_stage(config(tmp_path, "dit.train.steps=2", *RUN), *records(latents))
    ckpt = Path(first.info["checkpoint"])
    (ckpt / ".kept-train-dit").unlink()  # as an older version left it
    pruned: list[str] = []
    prune = Checkpoints.prune

    def spy(self: Checkpoints, keep: int) -> list[Path]:
        gone = prune(self, keep)
        pruned.extend(c.name for c in gone)
        return gone

    monkeypatch.setattr(Checkpoints, "prune", spy)
    train_dit_stage(config(tmp_path, "dit.train.steps=8", *RUN), *records(latents))
    assert pruned == ["ckpt-0000004", "ckpt-0000006"]  # never 2, which the old stamp named
    assert names(ckpt.parent) == ["ckpt-0000002", "ckpt-0000008"] and not Checkpoints.kept_by(ckpt)


def test_the_disk_projection_counts_pinned_checkpoints_beside_the_kept_ones(tmp_path, monkeypatch):
    from collections import namedtuple

    for name in ("ckpt-0000004", "ckpt-0000008"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 0))
    with pytest.raises(disk.DiskSpaceError, match=r"4 x .*3 kept \+ 2 a record names \+ the one being written"):
        disk.check_disk_space(tmp_path, 1000, step=8, steps=100, every=4, keep=3, section="dit", what="train-dit",
                              pinned=2)  # 2 pinned + 3 kept + 1 being written = 6 on disk, 2 there now
    assert peak_new(0, 10, 3) == 4
    assert peak_new(2, 10, 3, pinned=2) == 4  # 2 pinned stay + 3 kept + 1 being written = 6 on disk
    assert peak_new(5, 10, 3, pinned=2) == 1
    assert peak_new(1, 1, 1, pinned=1) == 1
