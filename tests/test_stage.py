from pathlib import Path

from prefect import flow, task

from tagdit.config import load_config
from tagdit.stage import Stage, StageRecord, run_stage, stage_cache_key

CALLS: list[str] = []

TOY = Stage(
    name="toy",
    modules=("tests.test_stage",),
    sections=("data.resolution",),
    out_dir=lambda cfg, up: cfg.dataset_dir / "toy",
)


@task(name="toy", cache_key_fn=stage_cache_key(TOY), persist_result=True)
def toy_task(cfg, force: bool = False) -> StageRecord:
    CALLS.append("ran")
    out = TOY.out_dir(cfg, {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "a.txt").write_text(f"res={cfg.data.resolution}")
    return TOY.write_stamp(cfg, {}, [out / "a.txt"], {"n": 1})


@flow
def toy_flow(root: str, res: int, force: bool = False) -> StageRecord:
    cfg = load_config(None, [f"data.root={root}", f"data.resolution={res}"])
    return run_stage(toy_task, TOY, cfg, force=force)


def test_stage_hits_cache_across_runs_and_recomputes_when_outputs_change(prefect_env):
    root = str(prefect_env / "shards")
    CALLS.clear()
    r1 = toy_flow(root, 32)
    assert CALLS == ["ran"]
    r2 = toy_flow(root, 32)  # new flow run, same inputs: cache hit
    assert CALLS == ["ran"] and r2.fingerprint == r1.fingerprint
    toy_flow(root, 48)  # config change: miss
    assert CALLS == ["ran", "ran"]
    toy_flow(root, 32)  # outputs on disk now belong to res 48 (stamp key differs): recompute
    assert len(CALLS) == 3
    Path(r1.out_dir, "a.txt").unlink()  # deleted output: the cached record is not trusted
    toy_flow(root, 32)
    assert len(CALLS) == 4
    Path(r1.out_dir, "a.txt").write_text("res=99")  # same size, different bytes: not trusted
    toy_flow(root, 32)
    assert len(CALLS) == 5
    toy_flow(root, 32, force=True)
    assert len(CALLS) == 6
    toy_flow(root, 32)
    assert len(CALLS) == 6


def test_run_stage_reports_cache_hits(prefect_env):
    root = str(prefect_env / "shards")
    assert toy_flow(root, 40).cached is False
    assert toy_flow(root, 40).cached is True


def test_force_expands_to_following_stages():
    from tagdit.stage import expand_force

    assert expand_force(["train_dit"]) == {"train_dit", "evaluate"}
    assert expand_force(None) == set()
    import pytest

    with pytest.raises(ValueError, match="unknown stage"):
        expand_force(["nope"])
