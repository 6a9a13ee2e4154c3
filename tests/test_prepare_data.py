import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tagdit.config import load_config

REPO = Path(__file__).resolve().parents[1]

# Runs the three stages with a pause after every unit of work, so the test can kill it mid-stage.
SLOW_RUN = """
import json, sys, time
import tagdit.data.tag as T, tasks.crop as C, tasks.shard as S, tasks.tag
from tagdit.config import load_config
from tagdit.formats.image_shards import ShardFile

def slowed(f, pause):
    def g(*a, **k):
        r = f(*a, **k)
        time.sleep(pause)
        return r
    return g

C.crop_bucket = slowed(C.crop_bucket, 0.1)
T.write_tag_chunk = slowed(T.write_tag_chunk, 0.1)  # after each tag chunk is written
ShardFile.write = slowed(ShardFile.write, 0.03)
cfg = load_config(None, json.loads(sys.argv[1]))
crop = C.crop_stage(cfg)
tag = tasks.tag.tag_stage(cfg, crop)
S.shard_stage(cfg, crop, tag)
"""


def make_images(src: Path, n: int = 24) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + i, 48), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(src / f"img{i:03d}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "img003.txt").write_text("sidecar_tag\n")
    return src


@pytest.fixture(scope="module")
def world(tmp_path_factory, wd_model):
    """Plain coloured images (this module's source folder) and the shared tiny tagger."""
    return make_images(tmp_path_factory.mktemp("prep") / "src"), wd_model


def overrides(root: Path, world) -> list[str]:
    src, wd = world
    return [f"data.source={src}", f"data.root={root}", "data.name=t", "data.resolution=32", "crop.workers=1",
            f"tagger.path={wd}", "shards.samples_per_shard=3", "shards.val_fraction=0.1",
            "shards.min_tag_count=1"]


def outputs(dataset: Path) -> dict[str, bytes]:
    """Every final output file (and the work chunks) by relative path."""
    files = [p for p in dataset.rglob("*") if p.is_file() and not p.name.startswith(".stage-")]
    return {p.relative_to(dataset).as_posix(): p.read_bytes() for p in files}


def kill_when(args: list[str], ready) -> None:
    """Start the slowed pipeline and SIGKILL it as soon as `ready()` holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, json.dumps(args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run finished before the kill point: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_plain(args: list[str]):
    from tasks.crop import crop_stage
    from tasks.shard import shard_stage
    from tasks.tag import tag_stage

    cfg = load_config(None, args)
    crop = crop_stage(cfg)
    return shard_stage(cfg, crop, tag_stage(cfg, crop))


def test_sigkilled_runs_resume_to_byte_identical_outputs(tmp_path, world):
    reference = run_plain(overrides(tmp_path / "ref", world))
    args = overrides(tmp_path / "killed", world)
    ds = tmp_path / "killed" / "t"
    kill_when(args, lambda: len(list((ds / "work/crop").glob("chunk-*"))) >= 2)  # mid crop
    kill_when(args, lambda: len(list((ds / "work/tag").glob("chunk-*"))) >= 2)  # mid tag
    kill_when(args, lambda: len(list((ds / "images").glob("train-*.tar"))) >= 2)  # mid shard
    assert not (ds / "vocab.json").exists()
    resumed = run_plain(args)
    assert resumed.fingerprint == reference.fingerprint
    want, got = outputs(tmp_path / "ref" / "t"), outputs(ds)
    assert sorted(got) == sorted(want)  # no partial, temporary or duplicate files
    assert all(got[k] == want[k] for k in want)
    assert resumed.info["found"] == 25 == resumed.info["sharded"] + resumed.info["rejected"]


def stamps(dataset: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in dataset.rglob(".stage-*.json")}


def assert_shard_artifacts(dataset: str, samples: int, rejects: dict[str, int]) -> None:
    """The preview (captioned crops, embedded) and the rejects-by-reason table of the latest run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        def latest(key: str):  # other tests of the session publish under the same key
            return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)[0]

        grid = latest(f"tagdit-shards-{dataset}")
        table = latest(f"tagdit-rejects-{dataset}")
    assert f"{samples} samples" in grid.data and "data:image/jpeg;base64," in grid.data
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["reason"]: r["count"] for r in rows} == rejects


def test_flow_hits_cache_and_recomputes_what_changed(prefect_env, tmp_path, world, monkeypatch):
    from flows.prepare_data import prepare_data_flow

    src = tmp_path / "src"
    make_images(src, 8)
    args = overrides(tmp_path / "shards", (src, world[1]))
    ds = tmp_path / "shards" / "t"
    first = prepare_data_flow(overrides=args)
    s1 = stamps(ds)
    assert set(s1) == {".stage-crop.json", ".stage-tag.json", ".stage-shard.json"}
    again = prepare_data_flow(overrides=args)  # unchanged: all hits
    assert again.cached and again.fingerprint == first.fingerprint and stamps(ds) == s1
    assert_shard_artifacts("t", samples=8, rejects={"decode failed": 1})  # published on a cache hit too

    prepare_data_flow(overrides=[*args, "shards.samples_per_shard=2"])  # config: shard only
    s2 = stamps(ds)
    assert [s2[k] != s1[k] for k in (".stage-crop.json", ".stage-tag.json", ".stage-shard.json")] == [False, False, True]

    Image.new("RGB", (50, 50), (1, 2, 3)).save(src / "img005.png")  # source image: everything
    changed = prepare_data_flow(overrides=args)
    s3 = stamps(ds)
    assert all(s3[k] != s2[k] for k in s3) and changed.fingerprint != first.fingerprint

    prepare_data_flow(overrides=args, force=["tag"])  # forced: tag and after
    s4 = stamps(ds)
    assert [s4[k] != s3[k] for k in (".stage-crop.json", ".stage-tag.json", ".stage-shard.json")] == [False, True, True]

    import tagdit.orchestrate.stage

    real = tagdit.orchestrate.stage.code_version
    monkeypatch.setattr(tagdit.orchestrate.stage, "code_version", lambda *m: real(*m) + ("x" if "tasks.shard" in m else ""))
    prepare_data_flow(overrides=args)  # shard stage code changed
    s5 = stamps(ds)
    assert [s5[k] != s4[k] for k in (".stage-crop.json", ".stage-tag.json", ".stage-shard.json")] == [False, False, True]


def test_prepare_data_runs_inside_another_flow_and_as_subflow(prefect_env, tmp_path, world):
    from prefect import flow

    from flows.prepare_data import prepare_data, prepare_data_flow

    args = overrides(tmp_path / "shards", world)

    @flow
    def outer():
        records = prepare_data(load_config(None, args))
        return records, prepare_data_flow(overrides=args)

    records, sub = outer()
    assert list(records) == ["crop", "tag", "shard"] and sub.fingerprint == records["shard"].fingerprint
    assert sub.cached
    assert records["shard"].info["n_train"] + records["shard"].info["n_val"] == 24
