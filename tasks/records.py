"""Finding a finished run's stage records on disk.

A stage flow run alone (`python -m flows.train_dit …`), the evaluator and the sample CLI all need the
records of the stages before them. Each finished stage leaves its record in a stamp beside its
outputs (`tagdit.orchestrate.stage`); this module is the one place that knows where each stamp lives and which
flow to run when it is missing. It also loads a run's painter (an exported folder's:
tagdit.sampling.pretrained), and finds what an export takes from a run (files, evaluation, training settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tagdit.config import PipelineConfig
from tagdit.data.vocab import Vocab
from tagdit.orchestrate.stage import StageRecord, require_stamp
from tagdit.sampling.painter import Painter, load_painter
from tagdit.stores import pull_tree


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
    return StageRecord(stage="train-dit", key=ckpt.name, out_dir=str(ckpt.parent),
                       fingerprint=sha256_file(ckpt / "ema.safetensors"), info={"checkpoint": str(ckpt)})


def upstream_records(cfg: PipelineConfig, dit_checkpoint: str | Path | None = None) -> dict[str, StageRecord]:
    """Everything the evaluator needs: shards, VAE, latents and the DiT (finished, or one checkpoint)."""
    vae = vae_record(cfg)
    dit = checkpoint_record(dit_checkpoint) if dit_checkpoint is not None else dit_record(cfg)
    return {"shards": shard_record(cfg), "vae": vae, "latents": latents_record(cfg, vae), "dit": dit}


@dataclass(frozen=True)
class RunFiles:
    """What a run draws with: a DiT checkpoint, the VAE checkpoint, the latents (`stats.json`), the vocabulary."""

    dit_checkpoint: Path
    vae_checkpoint: Path
    latents_dir: Path
    vocab: Path


def run_files(cfg: PipelineConfig, checkpoint: str | Path | None = None) -> RunFiles:
    """The run's latest DiT checkpoint (or `checkpoint`, a folder or a run's `dit/`), its VAE and latents."""
    from tagdit.formats.checkpoints import resolve_checkpoint

    vae = vae_record(cfg)
    latents = latents_record(cfg, vae)
    try:
        dit = resolve_checkpoint(checkpoint or cfg.run_dir / "dit")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: run train-dit first" if checkpoint is None else str(e)) from None
    return RunFiles(dit_checkpoint=dit, vae_checkpoint=resolve_checkpoint(vae.info["checkpoint"]),
                    latents_dir=Path(latents.out_dir), vocab=Vocab.of_run(dit.parent, cfg.dataset_dir / "vocab.json"))


def painter_for_run(cfg: PipelineConfig, checkpoint: str | Path | None = None) -> Painter:
    """The run's painter: its latest DiT checkpoint (or `checkpoint`), its VAE and latents."""
    files = run_files(cfg, checkpoint)
    return load_painter(cfg, files.dit_checkpoint, files.vae_checkpoint, files.latents_dir)


def latest_evaluation(cfg: PipelineConfig, checkpoint: Path) -> Path | None:
    """The run's newest evaluation folder of `checkpoint`, else of its latest evaluated step; None if none."""
    from tagdit.formats.eval_metrics import EvalMetrics

    pull_tree(cfg.run_dir / "eval")  # a run on a URL: its evaluations (metrics and grids) come down
    found = []
    for path in (cfg.run_dir / "eval").glob("*/metrics.json"):
        try:
            m = EvalMetrics.read(path)
        except ValueError:  # written by an older tagdit: not shown rather than refused
            continue
        found.append((m.dit_checkpoint == Path(checkpoint).name, m.dit_step or -1, path.stat().st_mtime, path.parent))
    return max(found)[-1] if found else None


def training_settings(files: RunFiles) -> dict[str, dict]:
    """What the run's DiT and VAE were trained with, as each training recorded it (`identity.json`, the
    settings a resume must share), with the steps of the checkpoint used; the architecture alone when a
    training left no record."""
    import json

    from tagdit.formats.checkpoints import load_weights, read_checkpoint_meta

    settings = {}
    for name, ckpt in (("dit", files.dit_checkpoint), ("vae", files.vae_checkpoint)):
        marker = ckpt.parent / "identity.json"
        section = json.loads(marker.read_text()).get(name, {}) if marker.is_file() else {}
        if not section:
            config = load_weights(ckpt / "ema.safetensors")[1]
            section = {"model": config["model"] if name == "dit" else config}
        step = read_checkpoint_meta(ckpt).step
        settings[name] = {"steps": step, **section}
    return settings
