import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset.tariterators import tarfile_samples

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
    real, calls = enc.encode_shard, []

    def dying(model, src, dst, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third shard is being encoded
        calls.append(src.name)
        return real(model, src, dst, **kw)

    monkeypatch.setattr(enc, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_latents(cfg, dataset, vae_ckpt, out, "abc")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(done) == calls == ["train-000000.tar", "train-000001.tar"]

    calls.clear()
    monkeypatch.setattr(enc, "encode_shard", lambda *a, **k: (calls.append(a[1].name), real(*a, **k))[1])
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
