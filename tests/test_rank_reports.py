"""torchrun training is as visible as in-process training: progress, sample grids, and any rank's traceback."""

from __future__ import annotations

import logging

import pytest

from tagdit.train.reports import Relay, publish_grid
from tasks.train_dit import train_dit_stage
from tests.run_fixtures import config, latents_with_vae, records

pytestmark = pytest.mark.usefixtures("one_thread")


def flow_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_nproc_2_training_publishes_progress_to_100_and_every_grid(prefect_env, tmp_path):
    from prefect import flow
    from prefect.runtime import flow_run

    latents = latents_with_vae(tmp_path)
    cfg = config(tmp_path, "run.name=ranks", "dit.train.nproc=2", "dit.train.loader_workers=1", "dit.train.steps=8",
                 "dit.train.batch_size=4", "dit.train.checkpoint_every=4", "dit.train.log_every=2",
                 "dit.train.val_every=8", "dit.sample_every=4")

    @flow
    def train_in_a_flow() -> str:
        train_dit_stage(cfg, *records(latents))
        return flow_run.id

    run_id = train_in_a_flow()
    arts = flow_artifacts(run_id)
    progress = [a for a in arts if a.type == "progress"]
    assert progress and progress[-1].data == 100.0 and progress[-1].description == "train-dit"
    grids = [a for a in arts if a.key == "tagdit-train-samples-ranks"]
    assert len(grids) == 2  # steps 4 and 8, relayed from rank 0
    assert {int(a.description.split()[-1]) for a in grids} == {4, 8}
    assert all("](data:image/png;base64," in a.data for a in grids)
    assert not list((cfg.run_dir / "dit" / "reports").glob("grid-*"))  # relayed files are cleaned up


def test_a_failing_rank_shows_its_exception_and_traceback(tmp_path, caplog):
    from tests.failing_rank import TRAINER

    cfg = config(tmp_path, "dit.train.nproc=2", "dit.train.device=cpu")
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as e:  # its kind: not retried
        TRAINER.run_training(cfg, (tmp_path / "data",), out)
    assert "rank 1 failed with ValueError: rank 1 cannot read" in str(e.value)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("Traceback" in r.getMessage() and "failing_rank.py" in r.getMessage() for r in errors)


def test_the_relay_publishes_what_rank_0_wrote(tmp_path, monkeypatch):
    from PIL import Image

    import tagdit.train.reports as reports

    made = []
    monkeypatch.setattr(reports, "in_prefect_run", lambda: True)
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact", lambda **kw: made.append(kw))
    publish_grid(Image.new("RGB", (8, 8), "red"), 12, "k", report_to=tmp_path)
    relay = Relay(tmp_path)
    relay.relay()
    assert made and made[0]["key"] == "k" and "step 12" in made[0]["markdown"]
    assert not list(tmp_path.iterdir())


def test_a_rank_failure_is_raised_as_its_kind_so_the_retry_policy_sees_it():
    from tagdit.orchestrate.runner import _never_retry
    from tagdit.train.launch import raise_rank_failure
    from tagdit.train.loop import NonFiniteLossError

    def report(kind: str, rank: int = 1) -> list[dict]:
        return [{"rank": rank, "time": 1.0, "type": kind, "message": "m", "traceback": "Traceback …"}]

    for kind, raised, retried in (("NonFiniteLossError", NonFiniteLossError, False), ("KeyError", KeyError, False),
                                  ("OSError", RuntimeError, True), ("OutOfMemoryError", RuntimeError, True)):
        with pytest.raises(raised) as e:
            raise_rank_failure("tasks.train_dit", 1, report(kind))
        assert _never_retry(e.value) is not retried, kind
    with pytest.raises(RuntimeError, match="no rank reported"):
        raise_rank_failure("tasks.train_dit", -9, [])
