"""The data stages on a Dask LocalCluster of two worker processes write the same bytes as locally."""

import os
import sys
from pathlib import Path

import pytest
import torch

from tagdit.config import ConfigError, PrefectConfig, load_config
from tagdit.orchestrate.chunks import chunk_runner, offload, run_units, unit_task
from tests.test_prepare_data import make_images, outputs, overrides

DASK = ["prefect.task_runner=dask", "prefect.dask_workers=2"]


@unit_task(name="where", run_name="where {i}")
def where(i: int) -> tuple[bool, int]:
    """(inside a Prefect task run?, pid of the process that did the work)."""
    from prefect.context import TaskRunContext

    return TaskRunContext.get() is not None, offload(os.getpid)


def test_local_runner_runs_units_as_task_runs_on_forked_processes(prefect_env):
    from prefect import flow

    @flow
    def units() -> list[tuple[bool, int]]:
        with chunk_runner(PrefectConfig(), threads=2, processes=2) as runner:
            return run_units(runner, where, [{"i": i} for i in range(6)], "units")

    in_flow = units()
    with chunk_runner(PrefectConfig(), threads=2, processes=2) as runner:  # a library call: no API
        plain = run_units(runner, where, [{"i": i} for i in range(6)], "units")
    for results, task_runs in ((in_flow, True), (plain, False)):
        assert {r[0] for r in results} == {task_runs}
        pids = {r[1] for r in results}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_dask_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import fails
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[dask\]"'):
        with chunk_runner(PrefectConfig(task_runner="dask")):
            pass


@pytest.fixture
def dask_runners(monkeypatch):
    """Every runner `chunk_runner` got from `dask_runner` (a spy)."""
    import tagdit.orchestrate.chunks

    made, real = [], tagdit.orchestrate.chunks.dask_runner
    monkeypatch.setattr(tagdit.orchestrate.chunks, "dask_runner", lambda pc: made.append(real(pc)) or made[-1])
    return made


def vae_checkpoint(folder: Path) -> Path:
    """A random-init tiny VAE saved as a checkpoint folder (raw == EMA)."""
    from models.vae import build_vae
    from tagdit.formats.checkpoints import save_weights_only
    from tests.model_fixtures import TINY_VAE

    torch.manual_seed(0)
    model = build_vae(TINY_VAE)
    return save_weights_only(folder, model, TINY_VAE.model_dump(mode="json"), step=1)


# A local Dask cluster per stage: about 90 s on 2 cores. One torch thread here, like a Dask worker
# (its nanny sets OMP_NUM_THREADS=1): CPU convolutions round differently with other thread counts.
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_dask_cluster_writes_byte_identical_shards_and_latents(prefect_env, tmp_path, wd_model, dask_runners):
    from prefect import flow

    pytest.importorskip("prefect_dask")

    import tasks.encode as enc
    from flows.prepare_data import prepare_data_flow

    src = make_images(tmp_path / "src", 25)
    world = (src, wd_model)
    local = [*overrides(tmp_path / "local", world), "crop.workers=2"]  # the forked process pool too
    on_dask = [*overrides(tmp_path / "dask", world), *DASK]
    a, b = prepare_data_flow(overrides=local), prepare_data_flow(overrides=on_dask)
    assert [type(r).__name__ for r in dask_runners] == ["DaskTaskRunner"] * 3  # crop, tag, shard
    assert a.fingerprint == b.fingerprint and a.info["found"] == 26
    want, got = outputs(tmp_path / "local" / "t"), outputs(tmp_path / "dask" / "t")
    assert {"vocab.json", "manifest.parquet", "rejects.parquet", "tags.parquet"} <= set(want)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)

    ckpt, ds = vae_checkpoint(tmp_path / "vae"), tmp_path / "local" / "t"
    settings = ["data.resolution=32", "latents.batch_size=4", "vae.train.device=cpu"]

    @flow
    def encode_both() -> tuple[Path, Path]:
        for name, extra in (("lat-local", []), ("lat-dask", DASK)):
            enc.encode_latents(load_config(None, [*settings, *extra]), ds, ckpt, tmp_path / name, "x")
        return tmp_path / "lat-local", tmp_path / "lat-dask"

    lat_local, lat_dask = encode_both()
    assert len(dask_runners) == 4
    tars = sorted(p.name for p in lat_local.glob("*.tar"))
    assert tars and tars == sorted(p.name for p in lat_dask.glob("*.tar"))
    for name in [*tars, "stats.json"]:
        assert (lat_local / name).read_bytes() == (lat_dask / name).read_bytes(), name


@unit_task(name="on-device", run_name="on device {i}")
def on_a_device(i: int):
    """The device and worker a unit's work ran on."""
    from tagdit.devices import unit_threads
    from tagdit.orchestrate.device_workers import on_devices

    return on_devices(unit_threads, [()])[0]  # a fake device's worker: 1 thread


def test_local_runner_runs_device_units_as_task_runs_on_a_worker_per_device(prefect_env):
    from prefect import flow

    @flow
    def units() -> list:
        with chunk_runner(PrefectConfig(devices=["cpu:0", "cpu:1"]), devices=["cpu:0", "cpu:1"]) as runner:
            return run_units(runner, on_a_device, [{"i": i} for i in range(4)], "units")

    runs = units()  # tiny units: one worker may finish them all before the next is submitted
    assert len(runs) == 4 and {r.device for r in runs} <= {"cpu:0", "cpu:1"} and {r.value for r in runs} == {1}
    assert len({(r.pid, r.device) for r in runs}) == len({r.pid for r in runs}) and os.getpid() not in {r.pid for r in runs}


def test_pack_units_makes_few_task_runs_at_scale_and_keeps_every_worker_busy():
    from tagdit.orchestrate.chunks import pack_units

    sizes = {b: 1000 for b in range(100_000)}  # 100M files in 100k buckets
    runs = pack_units(list(sizes), most=20_000, parts=8, sizes=sizes)
    assert len(runs) == 5000 and [b for r in runs for b in r] == list(sizes)  # consecutive, each once
    assert len(pack_units(list(range(40)), most=20, parts=8)) == 8  # small: still a run per worker and more
    assert pack_units([3, 5], most=20_000, parts=1, sizes={3: 50_000, 5: 10}) == [[3], [5]]  # a big unit alone


def _busy(device, seconds):
    import time

    time.sleep(seconds)
    return device


def test_one_task_runs_units_are_queued_on_every_device_worker_at_once():
    from tagdit.orchestrate.chunks import LocalTaskRunner
    from tagdit.orchestrate.device_workers import on_devices

    with LocalTaskRunner(devices=["cpu:0", "cpu:1"]):
        runs = on_devices(_busy, [(0.5,)] * 4)  # one task run's pack of units
    assert [r.value for r in runs] == [r.device for r in runs] and {r.device for r in runs} == {"cpu:0", "cpu:1"}
    assert max(r.finished for r in runs) - min(r.started for r in runs) < 1.9  # two at a time, not four in a row
