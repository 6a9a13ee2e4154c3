import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tagdit.data.vocab import Vocab
from tagdit.demo.stand_in_latents import TAGS, write_latent_fixture
from tagdit.formats.checkpoints import load_weights
from tagdit.train.reports import publish_grid
from tagdit.train.samples import artifact_key, sample_prompts
from tasks.train_dit import TRAIN_DIT, TRAINER, train_dit_stage
from tests.run_fixtures import config, latents_with_vae, records

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["dit.train.steps=8", "dit.train.checkpoint_every=4", "dit.train.log_every=4", "dit.train.val_every=4",
       "dit.train.batch_size=4", "dit.model.dropout=0.1", "evaluate.cfg_scale=3"]


def grids(run_dir: Path) -> dict[int, bytes]:
    """step -> PNG bytes of the `samples/grid` images in the run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    ea.Reload()
    if "samples/grid" not in ea.Tags()["images"]:
        return {}
    return {e.step: e.encoded_image_string for e in ea.Images("samples/grid")}


def weights(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_weights(ckpt / name)[0] for name in ("model.safetensors", "ema.safetensors")}


def assert_same(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


@pytest.mark.numerics
def test_sampling_leaves_checkpoints_bit_identical_and_resumes_exactly(tmp_path):
    latents = latents_with_vae(tmp_path)
    off = config(tmp_path, *RUN, "run.name=plain")
    on = config(tmp_path, *RUN, "run.name=sampled", "dit.sample_every=3", "dit.sample_seeds=[0, 5]")
    rec_off = train_dit_stage(off, *records(latents))
    rec_on = train_dit_stage(on, *records(latents))
    for step in ("ckpt-0000004", "ckpt-0000008"):
        assert_same(weights(off.run_dir / "dit" / step), weights(on.run_dir / "dit" / step))
    assert rec_on.info["loss"] == rec_off.info["loss"] and rec_on.info["val_loss"] == rec_off.info["val_loss"]
    straight = grids(on.run_dir / "dit")
    assert sorted(straight) == [3, 6, 8] and grids(off.run_dir / "dit") == {}
    assert straight[3] != straight[8]  # the EMA weights moved
    grid = Image.open(io.BytesIO(straight[8]))
    assert grid.width >= 2 * 64 and grid.height >= 64  # two seed columns of 64 px tiles

    # killed after step 4, resumed: same checkpoint, and the same grid at step 8
    run = on.run_dir / "dit"
    shutil.move(run, tmp_path / "straight")
    run.mkdir()
    shutil.copytree(tmp_path / "straight" / "ckpt-0000004", run / "ckpt-0000004")
    shutil.copy(tmp_path / "straight" / "identity.json", run / "identity.json")
    (run / "latest").write_text("ckpt-0000004\n")
    train_dit_stage(on, *records(latents))
    assert_same(weights(tmp_path / "straight" / "ckpt-0000008"), weights(run / "ckpt-0000008"))
    resumed = grids(run)
    assert sorted(resumed) == [6, 8] and resumed[8] == straight[8] and resumed[6] == straight[6]


def test_sample_settings_are_not_part_of_the_cache_key_or_run_identity(tmp_path):
    latents = write_latent_fixture(tmp_path / "ds", n_train=4, n_val=2)
    ups = dict(zip(("latents", "shards"), records(latents), strict=True))
    a = config(tmp_path)
    b = config(tmp_path, "dit.sample_every=5", "dit.sample_prompts=[smile]", "dit.sample_seeds=[3]",
               "dit.sample_steps=7")
    assert TRAIN_DIT.key(a, ups) == TRAIN_DIT.key(b, ups) and TRAINER.identity(a, ups) == TRAINER.identity(b, ups)
    c = config(tmp_path, "dit.caption_drop=0.3")  # a training setting still is
    assert TRAIN_DIT.key(a, ups) != TRAIN_DIT.key(c, ups) and TRAINER.identity(a, ups) != TRAINER.identity(c, ups)


def test_sampling_without_a_vae_fails_at_start(tmp_path):
    latents = write_latent_fixture(tmp_path / "ds", n_train=4, n_val=2)  # stats.json names no VAE
    cfg = config(tmp_path, "dit.train.steps=2", "dit.sample_every=1")
    with pytest.raises(FileNotFoundError, match="sample_every"):
        train_dit_stage(cfg, *records(latents))
    assert not list((cfg.run_dir / "dit").glob("ckpt-*"))


def test_default_prompts_are_frequent_val_captions_and_explicit_ones_are_parsed(tmp_path, caplog):
    latents = write_latent_fixture(tmp_path / "ds", n_train=4, n_val=12, per_shard=5)
    vocab = Vocab.load(tmp_path / "ds" / "vocab.json")
    prompts = sample_prompts(config(tmp_path), vocab, latents)
    assert 1 <= len(prompts) <= 4 and all(p and set(p) <= set(TAGS) for p in prompts)
    assert len({frozenset(p) for p in prompts}) == len(prompts)
    val_tags = {t for line in _val_jsons(latents) for t in line["tags"]}
    assert {t for p in prompts for t in p} <= val_tags
    explicit = sample_prompts(config(tmp_path, "dit.sample_prompts=['smile, Red_Hair, purple cape', '']"), vocab, latents)
    assert explicit == [["smile", "red hair"], []] and "purple cape" in caplog.text


def _val_jsons(latents: Path) -> list[dict]:
    from webdataset.tariterators import tarfile_samples

    from tagdit.formats.latent_shards import latent_shard_paths

    return [json.loads(r["json"]) for r in tarfile_samples({"url": str(u)} for u in latent_shard_paths(latents, "val"))]


def test_grid_artifact_is_published_only_inside_a_prefect_run(monkeypatch):
    import prefect.artifacts
    from prefect.context import TaskRunContext

    made = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    grid = Image.new("RGB", (40, 20), "red")
    assert not publish_grid(grid, 3, "k") and not made  # outside a run: nothing
    monkeypatch.setattr(TaskRunContext, "get", classmethod(lambda cls: object()))
    assert publish_grid(grid, 3, artifact_key("My Run_2"))
    assert made[0]["key"] == "tagdit-train-samples-my-run-2"
    assert "step 3" in made[0]["markdown"] and "](data:image/png;base64," in made[0]["markdown"]
