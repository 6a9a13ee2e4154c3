"""Stage train_dit: latent shards + tag vocabulary -> DiT checkpoints (raw + EMA) in `<run>/dit/`.

The Prefect contract only: the stage (its code version and config sections, the sample-grid
settings left out), its wiring into the trainer skeleton `tasks.trainer`, the stamp's DiT facts, the
`@task`, and the torchrun entry (`python -m tasks.train_dit` runs one rank). The training itself
(data, loss, validation, model) is `tagdit.train.dit.train_dit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tagdit.config import DiTConfig, PipelineConfig
from tagdit.data.vocab import Vocab
from tagdit.formats.latent_shards import LatentStats
from tagdit.orchestrate.stage import SHARDS_AND_WORK, TABLES, Stage, StageRecord, stage_cache_key
from tagdit.train.dit import dit_checkpoint_bytes, train_dit
from tasks.trainer import TRAIN_MODULES, TrainerStage

# Sample grids never change the checkpoints (tests/test_train_samples.py): out of the key and identity.
SAMPLE_FIELDS = ("sample_every", "sample_prompts", "sample_seeds", "sample_steps")

TRAIN_DIT = Stage(
    name="train-dit",
    modules=("tasks.train_dit", "tagdit.train.dit", "tagdit.formats.latent_shards",
             "tagdit.formats.image_shards:shards_in", "models.vae:AutoencoderKL", "models.dit", "models.diffusion", "tagdit.data.vocab", *TRAIN_MODULES),
    sections=tuple(f"dit.{k}" for k in DiTConfig.model_fields if k not in SAMPLE_FIELDS),
    out_dir=lambda cfg, up: cfg.run_dir / "dit",
    streams=(*SHARDS_AND_WORK, *TABLES),  # latent shards read from the store (data.shard_cache); image shards, work/, tables not read
    resumes=True,
)


def checkpoint_info(ckpt: Path, inputs: tuple[Path, ...]) -> dict[str, Any]:
    """DiT facts for the stamp: validation loss and the latents/vocabulary it was trained on."""
    from tagdit.formats.checkpoints import read_checkpoint_meta  # torch: imported when used

    latents_dir, vocab_path = inputs
    metrics = read_checkpoint_meta(ckpt).metrics
    return {"val_loss": metrics.get("val_loss"), "scale_factor": LatentStats.of_run(ckpt.parent, latents_dir).scale_factor,
            "vocab": str(Vocab.of_run(ckpt.parent, vocab_path)), "latents": str(latents_dir)}


class DiTTrainerStage(TrainerStage):
    """The trainer skeleton, with the sample-grid settings left out of the run identity."""

    def identity(self, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> dict[str, Any]:
        ident = super().identity(cfg, upstream)
        ident["dit"] = {k: v for k, v in ident["dit"].items() if k not in SAMPLE_FIELDS}
        return ident


TRAINER = DiTTrainerStage(
    stage=TRAIN_DIT,
    module="tasks.train_dit",
    section="dit",
    inputs=("latents", "vocab"),
    input_paths=lambda cfg, up: (Path(up["latents"].out_dir), cfg.dataset_dir / "vocab.json"),
    train=train_dit,
    info=checkpoint_info,
    checkpoint_bytes=lambda cfg, paths: dit_checkpoint_bytes(cfg, len(Vocab.load(paths[1])),
                                                            LatentStats.load(paths[0]).latent_shape),
)


def train_dit_stage(cfg: PipelineConfig, latents: StageRecord, shards: StageRecord, force: bool = False) -> StageRecord:
    """The stage: cached record, or train (resuming) and stamp the final checkpoint."""
    return TRAINER.run(cfg, {"latents": latents, "shards": shards}, force)


@task(name="train-dit", cache_key_fn=stage_cache_key(TRAIN_DIT), persist_result=True, tags=["gpu"])
def train_dit_task(cfg: PipelineConfig, latents: StageRecord, shards: StageRecord, force: bool = False) -> StageRecord:
    """Train the tag-conditioned DiT on the encoded latents."""
    return train_dit_stage(cfg, latents, shards, force=force)


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: one DDP rank."""
    TRAINER.main(argv)


if __name__ == "__main__":
    main()
