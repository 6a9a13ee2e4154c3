"""Stage evaluate: the DiT checkpoint a training record names -> grids + metrics.json (tagdit.evaluation.run).

Outputs under `<run>/eval/<dit checkpoint>-<key>/`; the key holds the tagger's and the Inception
weights' hashes. The task has its own concurrency slot (tag `eval`), so a nightly evaluation runs
beside training; the flow publishes the result as Prefect artifacts.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tagdit.config import PipelineConfig
from tagdit.evaluation.run import evaluate_checkpoint
from tagdit.formats.checkpoints import Checkpoints
from tagdit.orchestrate.stage import SHARDS_AND_WORK, TABLES, Stage, StageRecord, stage_cache_key
from tagdit.sampling.painter import load_painter


def _extra_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The tagger's resolved commit and file hashes (resolved once per process: no Hub request here),
    and the Inception-v3 weights' sha256 when they are found (they decide whether the Inception KIDs exist)."""
    from models.inception import find_inception_weights
    from tagdit.data.tagger import resolve_tagger
    from tagdit.files import file_fingerprint

    inputs = resolve_tagger(cfg.tagger).key_inputs()
    if (weights := find_inception_weights(cfg.evaluate.inception_weights)) is not None:
        inputs["inception_v3"] = file_fingerprint(weights)
    return inputs


EVALUATE = Stage(
    name="evaluate",
    modules=("tasks.evaluate", "tagdit.evaluation.run", "tagdit.evaluation.fidelity", "tagdit.evaluation.kid", "tagdit.sampling.painter",
             "tagdit.sampling.prompts", "tagdit.sampling.grid", "models.sampling", "models.interpolate",
             "models.diffusion", "models.dit", "models.vae", "models.config", "models.kid", "models.inception", "tagdit.data.vocab",
             "tagdit.data.tagger:TagResult", "tagdit.data.tagger:mcut_threshold", "tagdit.data.tagger:select_tags",
             "tagdit.formats.image_shards", "tagdit.formats.latent_shards", "tagdit.formats.wd_image",
             "tagdit.formats.selected_tags", "tagdit.formats.eval_metrics", "tagdit.formats.checkpoints",
             "tagdit.formats.trained_models", "tagdit.devices", "tagdit.data.metrics"),
    sections=("evaluate", "tagger"),
    out_dir=lambda cfg, up: cfg.run_dir / "eval",
    extra_inputs=_extra_inputs,
    streams=(*SHARDS_AND_WORK, *TABLES),  # val image shards read from the store; latent shards, work/ and tables not read
)


def evaluate(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
             dit: StageRecord, force: bool = False) -> StageRecord:
    """The stage: the stamped record, or evaluate the DiT checkpoint `dit` names and stamp its grids and metrics."""
    import torch

    upstream = {"shards": shards, "vae": vae, "latents": latents, "dit": dit}
    if not force and (rec := EVALUATE.valid_record(cfg, upstream)):
        return rec
    torch.manual_seed(0)
    painter = load_painter(cfg, dit.info["checkpoint"], vae.info["checkpoint"], latents.out_dir)
    out = EVALUATE.out_dir(cfg, upstream) / f"{painter.checkpoint.name}-{EVALUATE.key(cfg, upstream)[-8:]}"
    m = evaluate_checkpoint(cfg, painter, out, force)
    info = {"dir": str(out), "metrics": str(out / "metrics.json"), "grids": m.grids, "dit_checkpoint": m.dit_checkpoint,
            "tag_recall_ratio": m.tag_recall_ratio, "tag_recall_ratio_se": m.tag_recall_ratio_se,
            "samples_per_prompt": m.samples_per_prompt, "vae_psnr_db": m.vae_psnr_db, "kid_tagger": m.kid_tagger,
            "kid": {name: {"mean": k.mean, "std": k.std, "weights": k.weights, "generated": k.generated}
                    for name, k in m.kid.items()},
            "recall": {k: getattr(m, k).recall for k in ("cfg", "unconditional", "real", "reconstructed")},
            "sampler_recall": {name: r.recall for name, r in m.sampler_recall.items()}}
    record = EVALUATE.write_stamp(cfg, upstream, [*(Path(g) for g in m.grids.values()), out / "metrics.json"], info)
    Checkpoints(painter.checkpoint.parent).keep_for(painter.checkpoint, EVALUATE.name)  # the record names it
    return record


@task(name="evaluate", cache_key_fn=stage_cache_key(EVALUATE), persist_result=True, tags=["eval"])
def evaluate_task(cfg: PipelineConfig, shards: StageRecord, vae: StageRecord, latents: StageRecord,
                  dit: StageRecord, force: bool = False) -> StageRecord:
    """Sample grids + tag-fidelity metrics for the DiT checkpoint `dit` names (its own slot: tag `eval`)."""
    return evaluate(cfg, shards, vae, latents, dit, force=force)
