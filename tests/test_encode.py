import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset.tariterators import tarfile_samples

import tagdit.data.encode
import tasks.encode as enc
from models.vae import build_vae
from tagdit.config import load_config
from tagdit.data.encode import RunningMoments, latent_stats
from tagdit.files import sha256_file
from tagdit.formats.checkpoints import save_weights_only
from tagdit.formats.image_shards import decode_image, image_bytes, image_shards
from tagdit.formats.latent_shards import latent_shard_paths, npy_bytes
from tagdit.formats.trained_models import load_vae
from tests.model_fixtures import TINY_VAE, as_override
from tests.shard_fixtures import shard_record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    """A random-init VAE saved as a checkpoint folder (raw == EMA)."""
    torch.manual_seed(0)
    model = build_vae(TINY_VAE)
    ckpt = tmp_path_factory.mktemp("run") / "vae" / "ckpt-0000001"
    return save_weights_only(ckpt, model, TINY_VAE.model_dump(mode="json"), step=1)


def make_cfg(dataset: Path, *extra: str):
    return load_config(None, [f"data.root={dataset.parent}", f"data.name={dataset.name}", "data.resolution=32",
                              "latents.batch_size=3", "vae.train.device=cpu", *extra])


def samples(path: Path) -> list[dict]:
    return list(tarfile_samples([{"url": str(path)}]))


def npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b))


def test_latents_round_trip_through_shards_with_flips(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "latents"
    stats = enc.encode_latents(make_cfg(dataset), dataset, vae_ckpt, out, "abc")
    model, _ = load_vae(vae_ckpt)
    n = 0
    for src in image_shards(dataset, "train") + image_shards(dataset, "val"):
        raws, lats = samples(src), samples(out / src.name)
        assert [r["__key__"] for r in raws] == [s["__key__"] for s in lats]
        for raw, lat in zip(raws, lats, strict=True):
            assert lat["json"] == raw["json"]
            x = decode_image(image_bytes(raw), 32)[None]  # (1, 3, 32, 32)
            with torch.no_grad():
                mean, logvar = model.encode(torch.cat([x, x.flip(-1)]))
            for prefix, i in (("", 0), ("flip_", 1)):
                m, lv = npy(lat[prefix + "mean.npy"]), npy(lat[prefix + "logvar.npy"])
                assert m.dtype == lv.dtype == np.float16 and m.shape == (4, 4, 4)
                np.testing.assert_allclose(m, mean[i].numpy(), rtol=2e-3, atol=2e-3)
                np.testing.assert_allclose(lv, logvar[i].numpy(), rtol=2e-3, atol=2e-3)
            n += 1
    assert n == 18
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats.model_dump(mode="json")
    assert on_disk["count"] == 14 and on_disk["latent_shape"] == [4, 4, 4] and on_disk["vae_id"] == "abc"
    assert on_disk["vae_checkpoint_sha256"] == sha256_file(vae_ckpt / "ema.safetensors")


def test_without_flip_only_the_posterior_is_stored(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "latents"
    enc.encode_latents(make_cfg(dataset, "latents.flip=false"), dataset, vae_ckpt, out, "abc")
    lat = samples(out / "val-000000.tar")[0]
    assert {k for k in lat if not k.startswith("__")} == {"mean.npy", "logvar.npy", "json"}


def test_the_cpu_heap_keeps_freed_activations_on_glibc():
    import platform

    from tagdit.devices import retain_cpu_heap

    assert retain_cpu_heap() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.numerics
def test_running_moments_are_exact_on_chunks_far_from_zero():
    rng = np.random.default_rng(0)
    x = 1e6 + rng.normal(0, 0.5, 10_001)  # naive sum-of-squares variance loses everything here
    m = RunningMoments()
    for chunk in np.array_split(x, [1, 7, 500, 4000]):
        m.update(torch.from_numpy(chunk))
    assert m.count == x.size
    assert m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.std == pytest.approx(x.std(), rel=1e-9)


@pytest.mark.numerics
def test_scale_factor_is_one_over_the_std_of_posterior_samples(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    sigma = 0.3  # posterior std; the means spread with std 2: total std = sqrt(4 + 0.09)
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"train-{shard:06d}.tar"), mtime=0) as w:
            for i in range(100):
                mean = rng.normal(1.0, 2.0, (4, 8, 8)).astype(np.float16)
                logvar = np.full((4, 8, 8), np.log(sigma**2), np.float16)
                w.write({"__key__": f"k{shard}-{i}", "mean.npy": npy_bytes(mean), "logvar.npy": npy_bytes(logvar), "json": b"{}"})
    stats = latent_stats(latent_shard_paths(tmp_path, "train"))
    assert stats["count"] == 300 and stats["values"] == 300 * 256 and stats["latent_shape"] == [4, 8, 8]
    assert stats["scale_factor"] == pytest.approx(1 / (4 + sigma**2) ** 0.5, rel=0.02)
    assert stats["mean"] == pytest.approx(1.0, abs=0.05)
    assert stats["scale_factor"] == 1 / stats["std"]
    assert latent_stats(latent_shard_paths(tmp_path, "train")) == stats  # fixed seed


@pytest.mark.numerics
def test_encoding_resumes_per_shard_and_gives_identical_bytes(tmp_path, dataset, vae_ckpt, monkeypatch):
    cfg = make_cfg(dataset)
    ref = tmp_path / "ref"
    enc.encode_latents(cfg, dataset, vae_ckpt, ref, "abc")

    out = tmp_path / "out"
    real, calls = tagdit.data.encode.encode_shard, []

    def dying(model, src, dst, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third shard is being encoded
        calls.append(Path(src).name)
        return real(model, src, dst, **kw)

    monkeypatch.setattr(tagdit.data.encode, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_latents(cfg, dataset, vae_ckpt, out, "abc")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(done) == calls == ["train-000000.tar", "train-000001.tar"]

    calls.clear()
    monkeypatch.setattr(tagdit.data.encode, "encode_shard", lambda *a, **k: (calls.append(Path(a[1]).name), real(*a, **k))[1])
    enc.encode_latents(cfg, dataset, vae_ckpt, out, "abc")
    assert calls == ["train-000002.tar", "val-000000.tar"]  # complete shards are skipped
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in done.items())
    for p in ref.glob("*.tar"):
        assert p.read_bytes() == (out / p.name).read_bytes()
    assert (ref / "stats.json").read_bytes() == (out / "stats.json").read_bytes()
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_train_vae_and_encode_latents_flows_run_and_cache(prefect_env, dataset):
    from flows.encode import encode_flow
    from flows.train_vae import train_vae_flow

    shard_record(dataset)  # the stamp prepare-data would have left
    overrides = [f"data.root={dataset.parent}", f"data.name={dataset.name}", "data.resolution=32",
                 f"run.root={prefect_env / 'runs'}", as_override("vae.model", TINY_VAE),
                 "vae.w_perc=0", "vae.train.steps=2", "vae.train.batch_size=4", "vae.train.warmup_steps=1",
                 "latents.batch_size=4"]
    vae = train_vae_flow(overrides=overrides)
    latents = encode_flow(overrides=overrides)
    assert Path(latents.out_dir).name == f"latents-{vae.info['vae_id']}"
    stats = json.loads(Path(latents.info["stats"]).read_text())
    assert stats["scale_factor"] == latents.info["scale_factor"] > 0
    again = encode_flow(overrides=overrides)
    assert again.cached and again.fingerprint == latents.fingerprint


class DeviceRuns(list):
    per_task_run: list[int]

    def __init__(self):
        super().__init__()
        self.per_task_run = []


def unit_runs(monkeypatch, module) -> list:
    """Every DeviceRun the stage's task runs return from now on (run_units wrapped in `module`), and each
    task run's count of them in `runs.per_task_run`."""
    real, runs = module.run_units, DeviceRuns()

    def wrapped(*a, **k):
        out = real(*a, **k)
        runs.per_task_run += [len(r) for r in out]
        runs.extend(r for task_run in out for r in task_run)
        return out

    monkeypatch.setattr(module, "run_units", wrapped)
    return runs


def assert_a_worker_per_device(runs: list, devices: set[str]) -> None:
    """Each device used by one process of its own, and no two units on one device at once."""
    assert {r.device for r in runs} == devices and os.getpid() not in {r.pid for r in runs}
    assert len({(r.device, r.pid) for r in runs}) == len(devices) == len({r.pid for r in runs})
    for a in runs:
        for b in runs:
            if a is not b and a.started < b.finished and b.started < a.finished:
                assert a.device != b.device, (a, b)


@pytest.mark.numerics  # the default run's one torch thread vs each worker's one thread: same kernels
def test_encode_runs_a_worker_per_fake_device_and_writes_the_single_device_bytes(tmp_path, dataset, vae_ckpt,
                                                                                 monkeypatch):
    one = tmp_path / "one"
    enc.encode_latents(make_cfg(dataset), dataset, vae_ckpt, one, "abc")  # auto on a CPU: in this process
    runs = unit_runs(monkeypatch, enc)
    two = tmp_path / "two"
    enc.encode_latents(make_cfg(dataset, "prefect.devices=[cpu:0,cpu:1]"), dataset, vae_ckpt, two, "abc")
    assert len(runs) == 4 and sum(r.value for r in runs) == 18
    assert_a_worker_per_device(runs, {"cpu:0", "cpu:1"})
    names = sorted(p.name for p in one.iterdir() if p.name != "encode.json")
    assert names == sorted(p.name for p in two.iterdir() if p.name != "encode.json") and len(names) == 9
    for name in names:  # 4 shards, their source records, stats.json
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def serial_pass(paths: list[Path]) -> tuple[float, float, int]:
    """(mean, std, values) of one posterior sample per image over every latent at once, in float64
    (each shard's samples drawn as the encode stage draws them: its own seed, one chunk of <= 256)."""
    from models.vae import AutoencoderKL
    from tagdit.data.encode import shard_seed
    from tagdit.formats.latent_shards import iter_latent_samples, read_posterior

    zs = []
    for p in paths:
        means, logvars = zip(*(read_posterior(raw) for raw in iter_latent_samples([p])), strict=True)
        mean, logvar = (torch.from_numpy(np.stack(a)).float() for a in (means, logvars))
        g = torch.Generator().manual_seed(shard_seed(p.name))
        zs.append(AutoencoderKL.sample(mean, logvar, generator=g).double().flatten())
    z = torch.cat(zs)
    return z.mean().item(), z.std(unbiased=False).item(), z.numel()


def no_latent_reads(monkeypatch) -> list:
    """Latent shards read by the scale-factor pass from now on (recorded, and still read)."""
    import tagdit.data.encode as lib

    real, reads = lib.iter_latent_samples, []
    monkeypatch.setattr(lib, "iter_latent_samples", lambda paths: (reads.extend(paths), real(paths))[1])
    return reads


@pytest.mark.numerics
def test_scale_factor_merges_recorded_moments_without_reading_latents_and_equals_the_serial_pass(
        tmp_path, dataset, vae_ckpt, monkeypatch, caplog):
    import logging

    from tagdit.formats.latent_shards import LatentSource

    out = tmp_path / "latents"
    enc.encode_latents(make_cfg(dataset), dataset, vae_ckpt, out, "abc")
    train = latent_shard_paths(out, "train")
    reads = no_latent_reads(monkeypatch)
    merged = latent_stats(train)
    assert reads == [] and merged == {k: v for k, v in json.loads((out / "stats.json").read_text()).items()
                                      if k in merged}
    mean, std, values = serial_pass(train)
    assert merged["values"] == values and merged["count"] == 14
    assert merged["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert merged["std"] == pytest.approx(std, rel=1e-12) and merged["scale_factor"] == pytest.approx(1 / std, rel=1e-12)

    record = LatentSource.load(train[1])
    LatentSource(image_shard_sha256=record.image_shard_sha256, images=record.images).save(train[1])  # no moments
    with caplog.at_level(logging.INFO, logger="tagdit.data.encode"):
        assert latent_stats(train) == merged and reads == [train[1]]  # measured: the same moments
    assert f"{train[1].name} has no recorded moments" in caplog.text


def test_a_grown_dataset_updates_the_scale_factor_reading_no_old_latents(tmp_path, dataset, vae_ckpt, monkeypatch):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    late = ds / "images" / "train-000002.tar"
    late.rename(tmp_path / late.name)  # the dataset before it grew: two train shards
    out = tmp_path / "latents"
    before = enc.encode_latents(make_cfg(ds), ds, vae_ckpt, out, "abc")
    (tmp_path / late.name).rename(late)
    reads = no_latent_reads(monkeypatch)
    after = enc.encode_latents(make_cfg(ds), ds, vae_ckpt, out, "abc")
    assert reads == []  # neither the old shards' latents nor the new one's are read again
    assert (before.count, after.count) == (10, 14) and after.scale_factor != before.scale_factor
    _, std, _ = serial_pass(latent_shard_paths(out, "train"))
    assert after.scale_factor == pytest.approx(1 / std, rel=1e-12)
