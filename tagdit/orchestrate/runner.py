"""Running a stage's Prefect task from a flow: folder lock, cache check on disk, retries, timeouts.

`run_stage` is the one way a flow calls a stage. It
  1. holds the global concurrency slot of the folder the stage writes (`tagdit.orchestrate.locks`), so two
     flow runs on one dataset or run never interleave,
  2. checks the stage's stamp on disk: outputs missing or changed -> the task runs with
     `refresh_cache=True`; on a cache hit the record checked on disk is the one returned,
  3. applies the orchestration settings (`cfg.prefect`): retries after a crash for the stages that
     resume (never after a config error, a disk too small, a non-finite loss or a cancel), optional timeouts,
     the tags that name the stage's concurrency slot (`gpu`, `eval`: limits of 1 created on first
     use, slots leaked by a server restart taken back),
  4. for a `data.root` or `run.root` on a URL: checks the store answers, brings the small files of the
     local working copies up to date (stamps, records, vocabulary) and checks the stamp against the
     store's objects, so a cache hit downloads no shard, chunk or checkpoint; a stage that computes then
     gets the rest of the copies but what it reads straight from the store (`Stage.streams`; a data
     stage, `Stage.reads_store`, gets no unit: it reads those it needs from the store), and the
     store holds the stage's folder after it (`tagdit.stores`; each finished unit was uploaded as it
     landed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tagdit.config import ConfigError, PipelineConfig
from tagdit.orchestrate.markers import SUPERSEDED
from tagdit.orchestrate.params import stage_spelling
from tagdit.orchestrate.stage import BULK, STAMPS, Stage, StageRecord
from tagdit.stores import check_reachable, is_url, pull_tree, push_tree

PIPELINE_ORDER = ("demo-world", "crop", "tag", "shard", "train-vae", "encode", "train-dit", "evaluate")
RESUMING_STAGES = ("train-vae", "encode", "train-dit")  # a retry continues where the crash stopped


def expand_force(force: list[str] | None, order: tuple[str, ...] = PIPELINE_ORDER) -> set[str]:
    """Stages to recompute: each named stage and every stage after it in `order`."""
    if not force:
        return set()
    force = [stage_spelling(s) for s in force]
    unknown = sorted(set(force) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(order)}")
    first = min(order.index(s) for s in force)
    return set(order[first:])


def _never_retry(exc: BaseException) -> bool:
    """Errors a retry cannot fix: bad settings, missing inputs, a diverged loss; and a cancel."""
    from pydantic import ValidationError

    from tagdit.train.loop import NonFiniteLossError
    from tagdit.train.stop import TrainingStopped

    return isinstance(exc, ConfigError | ValidationError | ValueError | TypeError | KeyError
                      | FileNotFoundError | NonFiniteLossError | TrainingStopped)


def retry_after_crash(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is one a retry cannot fix."""
    try:
        state.result()
    except BaseException as exc:  # the task's own exception
        return not _never_retry(exc)
    return False


def task_options(stage: Stage, cfg: PipelineConfig) -> dict[str, Any]:
    """Retries, timeout and tags for one stage's task from `cfg.prefect`."""
    pc = cfg.prefect
    opts: dict[str, Any] = {}
    if stage.name in RESUMING_STAGES and pc.retries:
        opts.update(retries=pc.retries, retry_delay_seconds=pc.retry_delay_seconds,
                    retry_condition_fn=retry_after_crash)
    timeouts = {stage_spelling(k): v for k, v in pc.timeout_seconds.items()}
    if stage.name in timeouts:
        opts["timeout_seconds"] = timeouts[stage.name]
    if stage.name == "evaluate":
        opts["tags"] = {pc.eval_tag}  # its own slot: the nightly run must not wait for training
    return opts


def pull_roots(cfg: PipelineConfig, streams: tuple[str, ...] = (), small_only: bool = False,
               reads: list[Path] | None = None, resumes: bool = True) -> None:
    """Check that the URL roots answer (naming the setting when not) and update their working copies,
    but for the dataset files a stage reads straight from the store (`streams`: `Stage.streams`);
    `small_only`: nothing of `BULK` but the stamps either (what a cache check needs); `reads`: only the
    roots that hold one of these folders (a stage's own and its upstream records'). Of a run's
    checkpoints, only the weights a stage may load come down (`unread_checkpoints`), their optimiser
    state only for a stage that `resumes`, and nothing of a run moved aside (`SUPERSEDED`)."""
    from tagdit.formats.checkpoints import unread_checkpoints  # imports torch: not at module level

    for setting, root, folder, skip in (("data.root", cfg.data.root, cfg.dataset_dir, streams),
                                        ("run.root", cfg.run.root, cfg.run_dir, ())):
        if not is_url(root) or (reads is not None and not any(r.is_relative_to(folder) for r in reads)):
            continue
        check_reachable(str(root), setting)
        if small_only:
            pull_tree(folder, skip=(*skip, *BULK), keep=STAMPS)
            continue
        if setting == "run.root":
            skip = (*(f"{c.relative_to(folder).as_posix()}/*" for c in unread_checkpoints(folder)),
                    *(() if resumes else ("*/state.pt",)), f"*{SUPERSEDED}*")
        pull_tree(folder, skip=skip)


def checked_record(stage: Stage, cfg: PipelineConfig, upstream: dict[str, StageRecord],
                   force: bool = False) -> StageRecord | None:
    """The stage's valid stamped record (None when forced or not valid), with the working copies of URL
    roots holding what the stage reads when it must compute: a cache hit pulls only the small files."""
    pull_roots(cfg, stage.streams, small_only=True)
    on_disk = None if force else stage.valid_record(cfg, upstream)
    if on_disk is None:  # the roots it reads: the run's whole, the dataset's but what it streams or reads unit by unit
        reads = [Path(stage.out_dir(cfg, upstream)), *(Path(r.out_dir) for r in upstream.values())]
        pull_roots(cfg, (*stage.streams, *BULK) if stage.reads_store else stage.streams, reads=reads,
                   resumes=stage.resumes)
    return on_disk


def run_stage(stage_task: Any, stage: Stage, cfg: PipelineConfig, force: bool = False,
              **upstream: StageRecord) -> StageRecord:
    """Call a stage's Prefect task under its folder lock, bypassing the cache when outputs are missing."""
    from prefect import get_run_logger

    from tagdit.orchestrate.locks import exclusive, prepare_tag_limits

    logger = get_run_logger()
    options = task_options(stage, cfg)
    with exclusive(stage.lock_dir(cfg, upstream), f"stage {stage.name}"):
        prepare_tag_limits(set(options.get("tags") or stage_task.tags))
        on_disk = checked_record(stage, cfg, upstream, force)
        if on_disk is None:
            why = "forced" if force else "no valid outputs on disk for this key"
            logger.info("stage %s: %s -> computing", stage.name, why)
        kwargs: dict[str, Any] = dict(upstream)
        if force:
            kwargs["force"] = True
        task = stage_task.with_options(refresh_cache=on_disk is None, **options)
        state = task(cfg, **kwargs, return_state=True)
        record = state.result()  # raises the task's error if it failed
        push_tree(record.out_dir)
    # a hit: Prefect's cache, or the task found the same stamp (a Prefect home without the cache entry)
    if on_disk is not None and (state.name == "Cached" or (record.key, record.fingerprint) == (on_disk.key, on_disk.fingerprint)):
        logger.info("stage %s: cache hit (%s, outputs in %s)", stage.name, on_disk.key, on_disk.out_dir)
        return on_disk.model_copy(update={"cached": True})
    return record.model_copy(update={"cached": False})


def cancelled(stopped: BaseException) -> Any:
    """The Cancelled state a flow returns when its training stopped for a cancel (`TrainingStopped`,
    raised once the checkpoint is written): a Cancelling run may only become Cancelled, and the worker
    that would have set it may have stopped watching (a server restart)."""
    from prefect import get_run_logger
    from prefect.states import Cancelled

    get_run_logger().warning("%s", stopped)
    return Cancelled(message=str(stopped))
