"""A long run in small: SIGKILLed twice and resumed, it ends identical to an uninterrupted run
(tagdit.train.rehearsal; benchmarks/long_run_rehearsal.py times the same at 2,000 steps)."""

from __future__ import annotations

from tagdit.config import load_config
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.train.rehearsal import compare, train_to_end
from tests.run_fixtures import TINY


def test_a_run_killed_twice_ends_identical_to_an_uninterrupted_one(tmp_path):
    latents = write_latent_fixture(tmp_path / "data", n_train=64, n_val=8)
    cfg = load_config(None, [*TINY, "dit.model.dropout=0", "dit.train.loader_workers=1", "dit.train.steps=160",
                             "dit.train.checkpoint_every=20", "dit.train.keep_checkpoints=2", "dit.train.log_every=5",
                             "dit.train.val_every=20"])
    config = tmp_path / "config.json"
    config.write_text(cfg.model_dump_json())
    vocab = tmp_path / "data" / "vocab.json"
    train_to_end(config, latents, vocab, tmp_path / "straight", [])
    train_to_end(config, latents, vocab, tmp_path / "killed", [40, 100])
    assert compare(tmp_path / "straight", tmp_path / "killed", keep=2) == []
    assert sorted(p.name for p in (tmp_path / "killed").glob("ckpt-*")) == ["ckpt-0000140", "ckpt-0000160"]
