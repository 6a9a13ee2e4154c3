"""The runner's orchestration policy: which failures are retried, options per stage, force names."""

from __future__ import annotations

import pytest
from prefect import flow, task

from tagdit.config import ConfigError, load_config
from tagdit.orchestrate.runner import expand_force, retry_after_crash, task_options
from tagdit.train.loop import NonFiniteLossError
from tasks.encode import ENCODE
from tasks.evaluate import EVALUATE
from tasks.shard import SHARD

ATTEMPTS: list[str] = []


def failing(exc: BaseException):
    """A task that raises `exc` on its first attempt and succeeds after."""

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_after_crash)
    def job() -> str:
        ATTEMPTS.append("try")
        if len(ATTEMPTS) == 1:
            raise exc
        return "done"

    @flow
    def run_job() -> str:
        return job()

    return run_job


@pytest.mark.parametrize("exc, retried", [
    (RuntimeError("torchrun exited with code -9"), True),
    (OSError("disk hiccup"), True),
    (NonFiniteLossError("loss became nan"), False),
    (ConfigError("unknown key"), False),
    (FileNotFoundError("no shards: run prepare-data first"), False),
])
def test_crashes_are_retried_but_config_errors_and_nan_losses_are_not(prefect_env, exc, retried):
    ATTEMPTS.clear()
    if retried:
        assert failing(exc)() == "done" and len(ATTEMPTS) == 2
    else:
        with pytest.raises(type(exc)):
            failing(exc)()
        assert len(ATTEMPTS) == 1


def test_only_resuming_stages_retry_and_evaluation_has_its_own_slot():
    cfg = load_config(None, ["prefect.retries=2", "prefect.timeout_seconds={encode: 60}", "prefect.eval_tag=nightly"])
    enc = task_options(ENCODE, cfg)
    assert enc["retries"] == 2 and enc["timeout_seconds"] == 60 and enc["retry_condition_fn"] is retry_after_crash
    assert "retries" not in task_options(SHARD, cfg)
    assert task_options(EVALUATE, cfg)["tags"] == {"nightly"}
    assert "retries" not in task_options(ENCODE, load_config(None, ["prefect.retries=0"]))


def test_force_names_a_stage_and_everything_after_it():
    assert expand_force(["train-dit"]) == {"train-dit", "evaluate"}
    assert expand_force(["train_dit"]) == {"train-dit", "evaluate"}  # the earlier spelling, still understood
    assert expand_force(["crop"], ("crop", "tag", "shard")) == {"crop", "tag", "shard"}
    with pytest.raises(ValueError, match="unknown stage"):
        expand_force(["train-vae"], ("crop", "tag", "shard"))
