"""Stage train_vae: image shards -> KL-VAE checkpoints (raw + EMA) in `<run>/vae/`.

The Prefect contract only: the stage (its code version and config sections), its wiring into the
trainer skeleton `tasks.trainer`, the stamp's VAE facts (`vae_id`, validation PSNR), the `@task`, and
the torchrun entry (`python -m tasks.train_vae` runs one rank). The training itself (data, loss,
discriminator, validation) is `tagdit.train.vae.train_vae`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import PipelineConfig
from tagdit.files import sha256_file
from tagdit.orchestrate.stage import SHARDS_AND_WORK, TABLES, Stage, StageRecord, stage_cache_key
from tagdit.train.vae import perceptual_identity, train_vae, vae_checkpoint_bytes
from tasks.trainer import TRAIN_MODULES, TrainerStage

TRAIN_VAE = Stage(
    name="train-vae",
    modules=("tasks.train_vae", "tagdit.train.vae", "tagdit.formats.image_shards", "tagdit.data.metrics",
             "models.vae", "models.vae_loss", "models.perceptual", "models.discriminator", *TRAIN_MODULES),
    sections=("vae", "data.resolution"),
    out_dir=lambda cfg, up: cfg.run_dir / "vae",
    extra_inputs=lambda cfg: perceptual_identity(cfg.vae),
    streams=(*SHARDS_AND_WORK, *TABLES),  # image shards read from the store (data.shard_cache); work/ and tables not read
    resumes=True,
)


def checkpoint_info(ckpt: Path, inputs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """VAE facts for the stamp: EMA weights' sha256 and `vae_id`, validation PSNR."""
    from tagdit.formats.checkpoints import read_checkpoint_meta  # torch: imported when used

    ema_sha = sha256_file(ckpt / "ema.safetensors")
    metrics = read_checkpoint_meta(ckpt).metrics
    return {"ema_sha256": ema_sha, "vae_id": ema_sha[:12], "val_psnr": metrics.get("val_psnr")}


TRAINER = TrainerStage(
    stage=TRAIN_VAE,
    module="tasks.train_vae",
    section="vae",
    inputs=("dataset",),
    input_paths=lambda cfg, up: (Path(up["shards"].out_dir),),
    train=train_vae,
    info=checkpoint_info,
    checkpoint_bytes=lambda cfg, paths: vae_checkpoint_bytes(cfg),
    identity_extra=lambda cfg: {"resolution": cfg.data.resolution, **perceptual_identity(cfg.vae)},
)


def train_vae_stage(cfg: PipelineConfig, shards: StageRecord, force: bool = False) -> StageRecord:
    """The stage: cached record, or train (resuming) and stamp the final checkpoint."""
    return TRAINER.run(cfg, {"shards": shards}, force)


@task(name="train-vae", cache_key_fn=stage_cache_key(TRAIN_VAE), persist_result=True, tags=["gpu"])
def train_vae_task(cfg: PipelineConfig, shards: StageRecord, force: bool = False) -> StageRecord:
    """Train the KL-VAE on the image shards."""
    return train_vae_stage(cfg, shards, force=force)


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: one DDP rank."""
    TRAINER.main(argv)


if __name__ == "__main__":
    main()
