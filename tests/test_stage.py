from pathlib import Path

from prefect import flow, task

from tagdit.config import load_config
from tagdit.orchestrate.runner import run_stage
from tagdit.orchestrate.stage import Stage, StageRecord, stage_cache_key

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


@task(name="toy-checked")
def toy_checked_task(cfg, force: bool = False) -> StageRecord:
    """The toy stage as the real ones are: its stamp first (a Prefect home that lacks the cache entry)."""
    return (not force and TOY.valid_record(cfg, {})) or toy_task.fn(cfg)


@flow
def toy_checked_flow(root: str, res: int) -> StageRecord:
    return run_stage(toy_checked_task, TOY, load_config(None, [f"data.root={root}", f"data.resolution={res}"]))


def test_run_stage_reports_cache_hits(prefect_env):
    root = str(prefect_env / "shards")
    assert toy_flow(root, 40).cached is False
    assert toy_flow(root, 40).cached is True
    CALLS.clear()  # no Prefect cache entry, but the stamp is valid: a hit too
    assert toy_checked_flow(root, 40).cached is True and CALLS == []
    assert toy_checked_flow(root, 41).cached is False and CALLS == ["ran"]


def test_force_expands_to_following_stages():
    from tagdit.orchestrate.runner import expand_force

    assert expand_force(["train-dit"]) == {"train-dit", "evaluate"}
    assert expand_force(None) == set()
    import pytest

    with pytest.raises(ValueError, match="unknown stage"):
        expand_force(["nope"])


MOD_SRC = '''"""Toy stage code."""
import math

SCALE = 2  # the factor


def helper(x):
    """Unrelated helper."""
    return x - 1


def compute(x):
    """Scale x."""
    # a comment
    return math.floor(x * SCALE) + 1


class Box:
    """A box."""

    def area(self):
        return 3
'''


def _key_of(tmp_path, monkeypatch, src: str, *entries: str) -> str:
    """Write `src` as module `kv_toy` on sys.path and take the stage key of `entries`."""
    import importlib

    from tagdit.orchestrate.stage import code_version

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "kv_toy.py").write_text(src)
    importlib.invalidate_caches()
    code_version.cache_clear()  # memoised per process: a new file needs a fresh hash
    stage = Stage(name="kv", modules=entries, sections=("data.resolution",),
                  out_dir=lambda cfg, up: cfg.dataset_dir / "kv")
    return stage.key(load_config(None, []), {})


def test_code_key_ignores_comments_docstrings_and_blank_lines(tmp_path, monkeypatch):
    base = _key_of(tmp_path, monkeypatch, MOD_SRC, "kv_toy")
    cosmetic = (MOD_SRC.replace('"""Toy stage code."""', '"""Reworded module docs."""')
                .replace("# a comment", "# another comment\n\n    # and more")
                .replace('"""Scale x."""', '"""Scale x by SCALE, then add one."""')
                .replace('    """A box."""\n', "")
                .replace("SCALE = 2  # the factor", "\n\nSCALE = 2"))
    assert cosmetic != MOD_SRC
    assert _key_of(tmp_path, monkeypatch, cosmetic, "kv_toy") == base


def test_code_key_changes_with_constants_and_expressions(tmp_path, monkeypatch):
    base = _key_of(tmp_path, monkeypatch, MOD_SRC, "kv_toy")
    const = _key_of(tmp_path, monkeypatch, MOD_SRC.replace("SCALE = 2", "SCALE = 3"), "kv_toy")
    expr = _key_of(tmp_path, monkeypatch, MOD_SRC.replace("x * SCALE) + 1", "x * SCALE) - 1"), "kv_toy")
    method = _key_of(tmp_path, monkeypatch, MOD_SRC.replace("return 3", "return 4"), "kv_toy:Box")
    assert len({base, const, expr}) == 3
    assert method != _key_of(tmp_path, monkeypatch, MOD_SRC, "kv_toy:Box")


def test_code_key_narrowed_to_names_ignores_the_rest_of_the_module(tmp_path, monkeypatch):
    entries = ("kv_toy:compute", "kv_toy:SCALE")
    base = _key_of(tmp_path, monkeypatch, MOD_SRC, *entries)
    other = MOD_SRC.replace("return x - 1", "return x - 100").replace("import math", "import math, os")
    assert _key_of(tmp_path, monkeypatch, other, *entries) == base  # helper and imports not listed
    assert _key_of(tmp_path, monkeypatch, other, "kv_toy") != _key_of(tmp_path, monkeypatch, MOD_SRC, "kv_toy")
    assert _key_of(tmp_path, monkeypatch, MOD_SRC.replace("SCALE = 2", "SCALE = 5"), *entries) != base
    assert _key_of(tmp_path, monkeypatch, MOD_SRC.replace("+ 1", "+ 2"), *entries) != base


def test_stage_version_changes_the_key_and_bad_entries_fail_clearly(tmp_path, monkeypatch):
    import pytest

    cfg = load_config(None, [])
    v1 = Stage(name="kv", modules=("tagdit.files",), sections=(), out_dir=lambda cfg, up: cfg.dataset_dir)
    v2 = Stage(name="kv", modules=("tagdit.files",), sections=(), out_dir=lambda cfg, up: cfg.dataset_dir,
               version=2)
    assert v1.version == 1 and v1.key(cfg, {}) != v2.key(cfg, {}) and v1.code_key() != v2.code_key()
    with pytest.raises(ValueError, match="nope"):
        _key_of(tmp_path, monkeypatch, MOD_SRC, "kv_toy:nope")
    with pytest.raises(ValueError, match="not found"):
        _key_of(tmp_path, monkeypatch, MOD_SRC, "kv_toy_missing")


def test_two_folders_with_equal_settings_get_their_own_keys_and_records(prefect_env):
    a, b = str(prefect_env / "a"), str(prefect_env / "b")
    CALLS.clear()
    ra, rb = toy_flow(a, 32), toy_flow(b, 32)
    assert CALLS == ["ran", "ran"] and ra.key != rb.key
    again = toy_flow(a, 32)
    assert again.cached and CALLS == ["ran", "ran"]
    assert Path(again.out_dir).is_relative_to(Path(a).resolve()) or Path(again.out_dir).is_relative_to(Path(a))


def test_a_moved_or_copied_project_keeps_its_caches(tmp_path, monkeypatch, wd_model):
    """Keys name folders relative to the working directory: a renamed clone and a copy (mtimes kept, as
    `cp -a`, rsync -a or a restored CI cache keep them) find every data stage's outputs valid."""
    import shutil

    from tasks.crop import CROP, crop_stage
    from tasks.shard import SHARD, shard_stage
    from tasks.tag import TAG, tag_stage
    from tests.test_grow import make_source

    project = tmp_path / "clone"
    make_source(project / "images", folders=2, per_folder=4)
    monkeypatch.chdir(project)
    cfg = load_config(None, ["data.source=images", "data.root=shards", "data.name=g", "data.resolution=32",
                             "crop.workers=1", f"tagger.path={wd_model}", "shards.samples_per_shard=8",
                             "shards.min_tag_count=1"])
    crop = crop_stage(cfg)
    tag = tag_stage(cfg, crop)
    shard = shard_stage(cfg, crop, tag)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(project, tmp_path / "copy", symlinks=True)  # copy2: mtimes kept
    (project).rename(tmp_path / "renamed")
    for where in ("copy", "renamed"):
        monkeypatch.chdir(tmp_path / where)
        assert CROP.valid_record(cfg, {}) == crop
        assert TAG.valid_record(cfg, {"crop": crop}) == tag
        assert SHARD.valid_record(cfg, {"crop": crop, "tag": tag}) == shard


def test_a_record_read_elsewhere_points_into_its_new_folder():
    from tagdit.orchestrate.stage import relocated

    rec = StageRecord(stage="train-vae", key="k", out_dir="/old/runs/r/vae", fingerprint="f",
                      info={"checkpoint": "/old/runs/r/vae/ckpt-0000006", "other": "/old/runs/r/vaex",
                            "grids": ["/old/runs/r/vae/g.png"], "steps": 6})
    moved = relocated(rec, "/new/runs/r/vae")
    assert moved.out_dir == "/new/runs/r/vae" and moved.info == {
        "checkpoint": "/new/runs/r/vae/ckpt-0000006", "other": "/old/runs/r/vaex", "grids": ["/new/runs/r/vae/g.png"],
        "steps": 6}
    assert relocated(rec, "/old/runs/r/vae") is rec


def test_re_stamping_hashes_only_the_files_that_changed(tmp_path, monkeypatch):
    import os

    import tagdit.files as files

    cfg = load_config(None, [f"data.root={tmp_path}", "data.name=h"])
    stage = Stage(name="h", modules=("tagdit.files",), sections=(), out_dir=lambda cfg, up: cfg.dataset_dir)
    out = cfg.dataset_dir
    out.mkdir(parents=True)
    paths = [out / f"chunk-{i}.bin" for i in range(4)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 1000)
    first = stage.write_stamp(cfg, {}, paths)
    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    monkeypatch.setattr(files, "_FILE_HASHES", {})  # a new process: nothing memoised
    paths[2].write_bytes(b"changed" * 100)
    os.utime(paths[2], ns=(1, 1))
    second = stage.write_stamp(cfg, {}, paths)
    assert hashed == ["chunk-2.bin"] and second.fingerprint != first.fingerprint
    monkeypatch.setattr(files, "_FILE_HASHES", {})
    assert stage.valid_record(cfg, {}) is not None and hashed == ["chunk-2.bin"]
    monkeypatch.setattr(files, "_FILE_HASHES", {})
    stage.write_stamp(cfg, {}, paths)  # the same files again: the stamp's hashes, nothing read
    assert hashed == ["chunk-2.bin"]
