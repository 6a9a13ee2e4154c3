import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from models.diffusion import eps_loss, make_alpha_bar, q_sample
from tagdit.data.vocab import Vocab, augment_tags
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.formats.checkpoints import load_weights
from tagdit.formats.latent_shards import LatentStats
from tagdit.formats.trained_models import load_dit
from tagdit.train.dit import decode_latent, shard_urls
from tasks.train_dit import TRAIN_DIT, train_dit_stage
from tests.run_fixtures import config, fake_vae_run, records, sample_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DiT trained to memorise 8 latents (no conditioning dropout)."""
    root = tmp_path_factory.mktemp("dit")
    latents = write_latent_fixture(root / "ds", n_train=8, n_val=8, per_shard=4)
    cfg = config(root, "dit.train.steps=250", "dit.train.log_every=50", "dit.train.val_every=250",
                 "dit.caption_drop=0", "dit.tag_drop=0")
    record = train_dit_stage(cfg, *records(latents))
    return cfg, latents, record


@pytest.mark.numerics
def test_tiny_dit_overfits_a_few_latents(trained):
    cfg, latents, record = trained
    model = load_dit(record.info["checkpoint"], ema=False)
    vocab = Vocab.load(cfg.dataset_dir / "vocab.json")
    from webdataset.tariterators import tarfile_samples

    ex = [decode_latent(r, vocab=vocab, dit=cfg.dit, augment=False) for r in tarfile_samples({"url": u} for u in shard_urls(latents, "train"))]
    z = LatentStats.load(latents).to_model(torch.stack([e["mean"] for e in ex]).float()).repeat(16, 1, 1, 1)
    tags = torch.stack([e["tags"] for e in ex]).repeat(16, 1)
    g = torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, 1000, (len(z),), generator=g), torch.randn(z.shape, generator=g)
    x_t = q_sample(z, t, eps, make_alpha_bar("cosine", 1000))
    with torch.no_grad():
        loss = eps_loss(model(x_t, t, tags), eps).item()
        loss_null = eps_loss(model(x_t, t, torch.tensor([[2, 0, 0, 0, 0]] * len(z))), eps).item()
    assert loss < 0.35  # an untrained (zero-output) model scores E[eps^2] = 1
    assert loss < 0.7 * loss_null  # and it uses the tags
    assert record.info["step"] == 250 and 0 < record.info["val_loss"] < 1.5 and record.info["params"] > 100_000


def test_finished_stage_is_reused_and_stamped(trained):
    cfg, latents, record = trained
    assert TRAIN_DIT.valid_record(cfg, dict(zip(("latents", "shards"), records(latents), strict=True))) == record
    again = train_dit_stage(cfg, *records(latents))  # no training: the stamped record comes back
    assert again == record


@pytest.mark.numerics
def test_resume_is_exact_on_cpu(tmp_path):
    latents = write_latent_fixture(tmp_path / "ds", n_train=12, n_val=4, per_shard=5)
    cfg = config(tmp_path, "dit.train.steps=8", "dit.train.checkpoint_every=4", "dit.train.log_every=1",
                 "dit.train.val_every=4", "dit.train.batch_size=4", "dit.model.dropout=0.1")
    straight = train_dit_stage(cfg, *records(latents))
    run = cfg.run_dir / "dit"
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(run / "ckpt-0000004", resumed_dir / "ckpt-0000004")  # as if killed after step 4
    shutil.copy(run / "identity.json", resumed_dir / "identity.json")
    (resumed_dir / "latest").write_text("ckpt-0000004\n")
    shutil.move(run, tmp_path / "straight")
    shutil.move(resumed_dir, run)
    resumed = train_dit_stage(cfg, *records(latents))
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_weights(tmp_path / "straight" / "ckpt-0000008" / name)[0]
        b = load_weights(run / "ckpt-0000008" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.info["loss"] == straight.info["loss"] and resumed.info["val_loss"] == straight.info["val_loss"]


def test_changed_model_config_moves_the_old_run_aside(trained, tmp_path):
    cfg, latents, _ = trained
    cfg = config(tmp_path, "dit.train.steps=2", "dit.model.depth=1")
    (tmp_path / "ds").mkdir()
    shutil.copy(latents.parent / "vocab.json", tmp_path / "ds" / "vocab.json")
    train_dit_stage(cfg, *records(latents))
    cfg2 = config(tmp_path, "dit.train.steps=2", "dit.model.depth=2")
    rec = train_dit_stage(cfg2, *records(latents))
    assert load_dit(rec.info["checkpoint"]).cfg.depth == 2
    assert len(list(tmp_path.glob("runs/demo/dit.superseded-*"))) == 1


def test_decode_flips_and_augments_from_the_sample_seed(tmp_path):
    latents = write_latent_fixture(tmp_path / "ds", n_train=1, n_val=0)
    cfg = config(tmp_path, "dit.caption_drop=0.5", "dit.tag_drop=0")
    vocab = Vocab.load(tmp_path / "ds" / "vocab.json")
    from webdataset.tariterators import tarfile_samples

    raw = next(iter(tarfile_samples([{"url": shard_urls(latents, "train")[0]}])))
    outs = [decode_latent({**raw, "__seed__": s}, vocab=vocab, dit=cfg.dit) for s in range(40)]
    again = decode_latent({**raw, "__seed__": 7}, vocab=vocab, dit=cfg.dit)
    assert torch.equal(again["mean"], outs[7]["mean"]) and torch.equal(again["tags"], outs[7]["tags"])
    flipped = [torch.equal(o["mean"], outs[0]["mean"].flip(-1)) for o in outs]
    assert 5 < sum(flipped) < 35  # the flipped posterior is picked about half the time
    null = [o["tags"].tolist() == vocab.null(4) for o in outs]
    assert 5 < sum(null) < 35  # caption dropped about half the time -> [cls] + padding
    assert all(o["tags"][0] == 2 and o["mean"].dtype == torch.float16 for o in outs)


def test_augment_tags_drops_shuffles_and_caps():
    rng = random.Random(0)
    tags = [f"t{i}" for i in range(20)]
    outs = [augment_tags(tags, rng, caption_drop=0.2, tag_drop=0.1, shuffle=True, max_tags=16) for _ in range(2000)]
    assert sum(not o for o in outs) / len(outs) == pytest.approx(0.2, abs=0.03)
    kept = [o for o in outs if o]
    assert all(len(o) <= 16 and len(set(o)) == len(o) for o in kept)
    assert sum(o[:3] != tags[:3] for o in kept) > 0.9 * len(kept)  # shuffled
    short = [augment_tags(tags[:5], rng, caption_drop=0, tag_drop=0.1, shuffle=False, max_tags=16) for _ in range(2000)]
    assert sum(map(len, short)) / (5 * 2000) == pytest.approx(0.9, abs=0.02)


def test_vocab_parses_prompts_and_reports_unknown_tags():
    vocab = Vocab.from_tags(["blue hair", "smile", "^_^"])
    known, unknown = vocab.parse_prompt("Blue_Hair, smile ,, ^_^, hat, smile, <cls>")
    assert known == ["blue hair", "smile", "^_^"] and unknown == ["hat", "<cls>"]
    assert vocab.encode(["smile", "hat"], 4) == [2, 4, 1, 0, 0]
    assert vocab.encode(["smile"] * 6, 4) == [2, 4, 4, 4, 4] and vocab.null(3) == [2, 0, 0, 0]


def test_sampling_uses_the_schedule_the_checkpoint_was_trained_with(trained, tmp_path, monkeypatch):
    import models.sampling
    from flows import sample
    from models.diffusion import linear_alpha_bar

    cfg, latents, _ = trained  # the current config says cosine
    (tmp_path / "ds").mkdir()
    shutil.copy(latents.parent / "vocab.json", tmp_path / "ds" / "vocab.json")
    linear = train_dit_stage(config(tmp_path, "dit.schedule=linear", "dit.train.steps=2"), *records(latents))
    assert load_weights(Path(linear.info["checkpoint"]) / "ema.safetensors")[1]["schedule"] == "linear"
    fake_vae_run(cfg, latents)
    seen, real = [], models.sampling.sample_latents
    monkeypatch.setattr(models.sampling, "sample_latents", lambda *a, **k: seen.append(k["alpha_bar"]) or real(*a, **k))
    assert cfg.dit.schedule == "cosine"
    sample.main(sample_args(cfg, "--prompt", "smile", "--steps", "2", "--n", "1", "--out", str(tmp_path / "o.png"),
                            "--checkpoint", linear.info["checkpoint"]))
    assert len(seen) == 1 and torch.equal(seen[0], linear_alpha_bar(1000))


def test_an_unmarked_run_folder_is_moved_aside_not_resumed(tmp_path):
    from tagdit.orchestrate.markers import prepare_out_dir

    run = tmp_path / "dit"
    (run / "ckpt-0000004").mkdir(parents=True)  # someone else's checkpoints, no identity.json
    prepare_out_dir(run, {"a": 1}, force=False, what="train-dit")
    assert len(list(tmp_path.glob("dit.superseded-*/ckpt-0000004"))) == 1
    (run / "ckpt-0000002").mkdir()
    prepare_out_dir(run, {"a": 1}, force=False, what="train-dit")  # same identity: resumed in place
    assert (run / "ckpt-0000002").is_dir() and json.loads((run / "identity.json").read_text()) == {"a": 1}


def test_a_continued_run_keeps_its_scale_factor_and_a_new_run_takes_the_grown_latents_one(tmp_path, monkeypatch,
                                                                                           caplog):
    import logging

    import tagdit.train.dit
    from tagdit.sampling.painter import load_painter

    latents = write_latent_fixture(tmp_path / "ds", n_train=8, n_val=4, per_shard=4)  # scale factor 0.5
    settings = ["dit.train.val_every=2", "dit.train.batch_size=4"]
    cfg = config(tmp_path, "dit.train.steps=2", *settings)
    used, real = [], tagdit.train.dit.dit_loss
    monkeypatch.setattr(tagdit.train.dit, "dit_loss", lambda *a, stats, **k: used.append(stats.scale_factor)
                        or real(*a, stats=stats, **k))
    first = train_dit_stage(cfg, *records(latents))
    grown = LatentStats.load(latents).model_copy(update={"scale_factor": 0.25, "std": 4.0})
    grown.save(latents)  # what the latents measure after the dataset grew
    with caplog.at_level(logging.WARNING, logger="tagdit.train.dit"):
        more = train_dit_stage(config(tmp_path, "dit.train.steps=4", *settings), *records(latents))  # it continues
    assert more.info["step"] == 4 and set(used) == {0.5} and len(used) == 4
    assert first.info["scale_factor"] == more.info["scale_factor"] == 0.5
    assert "continues with the scale factor it started with, 0.500000" in caplog.text and "0.250000" in caplog.text
    fake_vae_run(cfg, latents)
    painter = load_painter(cfg, more.info["checkpoint"], cfg.run_dir / "vae" / "ckpt-0000001", latents)
    assert painter.stats.scale_factor == 0.5  # drawn with the factor it trained with

    enc, shards = records(latents)  # a grown dataset's encode record: a new fingerprint, a new run
    new = train_dit_stage(cfg, enc.model_copy(update={"fingerprint": "grown"}), shards)
    assert new.info["scale_factor"] == 0.25 and set(used[4:]) == {0.25}
    assert len(list((tmp_path / "runs" / "demo").glob("dit.superseded-*"))) == 1
