"""A tiny trained run on disk: fixture latents, a DiT trained for a few CPU steps, an untrained
VAE stamped as the run's VAE stage, so `painter_for_run` (sample CLI, sampling page) can load it."""

from __future__ import annotations

import json
from pathlib import Path

from tagdit.config import PipelineConfig, load_config
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.orchestrate.stage import StageRecord

TINY = ["dit.model=demo", "dit.model.patch=2", "dit.model.mlp_ratio=4", "dit.model.width=64", "dit.model.depth=2", "dit.model.heads=2", "dit.model.tag_heads=2",
        "dit.model.max_tags=4", "dit.train.device=cpu", "dit.train.batch_size=16", "dit.train.warmup_steps=10",
        "dit.train.lr=2e-3", "dit.train.weight_decay=0", "dit.train.ema_decay=0.9", "dit.val_samples=8"]


def records(latents_dir: Path) -> tuple[StageRecord, StageRecord]:
    """Fake encode and shard records pointing at fixture latents."""
    fake = {"out_dir": str(latents_dir), "key": "k", "info": {}}
    return StageRecord(stage="encode", fingerprint="lat", **fake), StageRecord(stage="shard", fingerprint="sh", **fake)


def config(root: Path, *extra: str) -> PipelineConfig:
    """The tiny DiT's config with data and runs under `root`."""
    return load_config(None, [f"data.root={root}", "data.name=ds", f"run.root={root}/runs", *TINY, *extra])


def fake_vae_run(cfg: PipelineConfig, latents: Path) -> None:
    """A tiny untrained VAE checkpoint (f = 8) and the stamps the sample command looks up."""
    from models.vae import build_vae
    from tagdit.config import VAE_PRESETS
    from tagdit.formats.checkpoints import save_weights

    vae_dir = cfg.run_dir / "vae"
    vae = build_vae(VAE_PRESETS["demo"].model_copy(update={"widths": [8, 8, 8], "groups": 4}))
    save_weights(vae_dir / "ckpt-0000001" / "ema.safetensors", vae.state_dict(), vae.cfg.model_dump())
    (vae_dir / "ckpt-0000001" / "meta.json").write_text(json.dumps({"step": 1}))
    (vae_dir / "latest").write_text("ckpt-0000001\n")
    stamp = {"record": {"stage": "train-vae", "key": "k", "out_dir": str(vae_dir), "fingerprint": "f",
                        "info": {"vae_id": "fixture", "checkpoint": str(vae_dir / "ckpt-0000001")}}, "files": {}}
    (vae_dir / ".stage-train-vae.json").write_text(json.dumps(stamp))
    stamp["record"].update(stage="encode", out_dir=str(latents))
    (latents / ".stage-encode.json").write_text(json.dumps(stamp))


def latents_with_vae(root: Path) -> Path:
    """Fixture latents whose stats.json names a tiny untrained VAE (f = 8: 64 px samples)."""
    latents = write_latent_fixture(root / "ds", n_train=12, n_val=6, per_shard=5)
    cfg = config(root)
    fake_vae_run(cfg, latents)
    from tagdit.formats.latent_shards import LatentStats

    stats = LatentStats.load(latents)
    stats.vae_checkpoint = str(cfg.run_dir / "vae" / "ckpt-0000001")
    stats.save(latents)
    return latents


def sample_args(cfg: PipelineConfig, *extra: str) -> list[str]:
    """Command-line arguments that point the sample CLI at `cfg`'s run, on CPU."""
    return ["--set", f"data.root={cfg.data.root}", "--set", "data.name=ds", "--set", f"run.root={cfg.run.root}",
            "--set", "evaluate.device=cpu", *extra]


def write_tiny_run(root: Path, steps: int = 4) -> PipelineConfig:
    """A drawable run under `root` (8 fixture latents 4x8x8, 64 px images): its config."""
    from tasks.train_dit import train_dit_stage

    latents = write_latent_fixture(root / "ds", n_train=8, n_val=8, per_shard=4)
    cfg = config(root, f"dit.train.steps={steps}", f"dit.train.log_every={steps}", f"dit.train.val_every={steps}",
                 "evaluate.device=cpu")
    train_dit_stage(cfg, *records(latents))
    fake_vae_run(cfg, latents)
    return cfg
