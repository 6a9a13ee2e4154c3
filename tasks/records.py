"""Finding a finished run's stage records on disk.

A stage flow run alone (`python -m flows.train_dit …`), the evaluator and the sample CLI all need the
records of the stages before them. Each finished stage leaves its record in a stamp beside its
outputs (`tagdit.orchestrate.stage`); this module is the one place that knows where each stamp lives and which
flow to run when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from tagdit.config import PipelineConfig
from tagdit.orchestrate.stage import StageRecord, require_stamp
from tagdit.sampling.painter import Painter, load_painter


def shard_record(cfg: PipelineConfig) -> StageRecord:
    """The shard stage's record (image shards, vocabulary) of `cfg.dataset_dir`."""
    from tasks.shard import SHARD

    return require_stamp(SHARD.out_dir(cfg, {}), SHARD.name, "prepare-data")


def vae_record(cfg: PipelineConfig) -> StageRecord:
    """The finished VAE training of `cfg.run_dir`."""
    from tasks.train_vae import TRAIN_VAE

    return require_stamp(TRAIN_VAE.out_dir(cfg, {}), TRAIN_VAE.name, "train-vae")


def latents_record(cfg: PipelineConfig, vae: StageRecord | None = None) -> StageRecord:
    """The encode stage's record, found through the VAE run that names its latents folder."""
    from tasks.encode import ENCODE

    vae = vae or vae_record(cfg)
    return require_stamp(ENCODE.out_dir(cfg, {"vae": vae}), ENCODE.name, "encode")


def dit_record(cfg: PipelineConfig) -> StageRecord:
    """The finished DiT training of `cfg.run_dir`."""
    from tasks.train_dit import TRAIN_DIT

    return require_stamp(TRAIN_DIT.out_dir(cfg, {}), TRAIN_DIT.name, "train-dit")


def checkpoint_record(checkpoint: str | Path) -> StageRecord:
    """A record for one DiT checkpoint folder, finished training or not (the nightly evaluation).

    Its fingerprint is the EMA weights' hash, so an evaluation of the same checkpoint is cached and
    a newer checkpoint is evaluated anew.
    """
    from tagdit.files import sha256_file

    ckpt = Path(checkpoint).resolve()
    return StageRecord(stage="train_dit", key=ckpt.name, out_dir=str(ckpt.parent),
                       fingerprint=sha256_file(ckpt / "ema.safetensors"), info={"checkpoint": str(ckpt)})


def upstream_records(cfg: PipelineConfig, dit_checkpoint: str | Path | None = None) -> dict[str, StageRecord]:
    """Everything the evaluator needs: shards, VAE, latents and the DiT (finished, or one checkpoint)."""
    vae = vae_record(cfg)
    dit = checkpoint_record(dit_checkpoint) if dit_checkpoint is not None else dit_record(cfg)
    return {"shards": shard_record(cfg), "vae": vae, "latents": latents_record(cfg, vae), "dit": dit}


def painter_for_run(cfg: PipelineConfig, checkpoint: str | Path | None = None) -> Painter:
    """The run's painter: its latest DiT checkpoint (or `checkpoint`), its VAE and latents."""
    vae = vae_record(cfg)
    return load_painter(cfg, checkpoint or cfg.run_dir / "dit", vae.info["checkpoint"],
                        latents_record(cfg, vae).out_dir)
