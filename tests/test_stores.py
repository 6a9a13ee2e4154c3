"""Dataset and run roots on object storage: a real S3-compatible server on 127.0.0.1 (moto's server mode).

The data stages and a 2-rank DiT training write to `s3://` through local working copies; what lands in
the bucket must be byte for byte what the same run writes to local folders, a fresh machine must
find it there (its stamps checked against the bucket, nothing big downloaded), a run killed during
encode must redo no shard the bucket already holds, and a dataset grown by one image is prepared
again on a fresh machine from the units in the bucket, byte-identical to the same growth on local
folders. Training streams its shards from the bucket (kept on local disk only with `data.shard_cache=local`).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
import torch

import tasks.encode as enc
from models.vae import build_vae
from tagdit.config import PipelineConfig, load_config
from tagdit.data.preview import load_crops
from tagdit.data.preview import pick_samples as preview_rows
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.files import write_json_atomic
from tagdit.formats.checkpoints import save_weights_only
from tagdit.formats.image_shards import read_samples
from tagdit.formats.latent_shards import read_posterior
from tagdit.orchestrate.runner import checked_record, pull_roots
from tagdit.orchestrate.stage import BULK, SHARDS, StageRecord
from tagdit.store_streams import StoreStream
from tagdit.stores import StoreError, pull_tree, push_tree, remote_of, working_dir
from tagdit.train.dit import shard_urls
from tasks.crop import CROP, crop_stage
from tasks.records import shard_record
from tasks.shard import SHARD, shard_stage
from tasks.tag import TAG, tag_stage
from tasks.train_dit import TRAIN_DIT
from tests.model_fixtures import TINY_VAE
from tests.prefect_server import free_port
from tests.test_grow import encoded_keys, grow_config, make_source, prepare

pytestmark = pytest.mark.usefixtures("one_thread", "store_cache")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store_cache(tmp_path, monkeypatch) -> Path:
    """This test's own folder of working copies (TAGDIT_STORE_CACHE)."""
    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "store-cache"))
    return tmp_path / "store-cache"


def new_bucket(s3) -> str:
    """A fresh bucket's name."""
    return s3.bucket("tagdit").removeprefix("s3://")


def fs() -> s3fs.S3FileSystem:
    s3 = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.invalidate_cache()
    return s3


def objects(url: str) -> dict[str, bytes]:
    """Every object under an s3:// URL by its name relative to the URL."""
    s3, base = fs(), url.removeprefix("s3://")
    return {k[len(base) + 1:]: s3.cat_file(k) for k in s3.find(base)}


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_weights_only(tmp_path_factory.mktemp("vae") / "ckpt-0000001", build_vae(TINY_VAE),
                             TINY_VAE.model_dump(mode="json"), step=1)


def test_a_url_root_is_worked_on_in_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["data.root=s3://bkt/shards", "data.name=ds", "run.root=file:///tmp/r", "run.name=a"])
    assert cfg.dataset_dir == tmp_path / "cache/s3/bkt/shards/ds" and remote_of(cfg.dataset_dir) == "s3://bkt/shards/ds"
    assert cfg.run_dir == Path("/tmp/r/a") and remote_of(cfg.run_dir) is None  # file:// is a plain path
    assert remote_of(tmp_path / "cache/.index/s3/bkt/x.json") is None and working_dir("runs") == Path("runs")
    with pytest.raises(ValueError, match="unknown URL scheme 'ftpx'"):
        load_config(None, ["data.root=ftpx://bkt/shards"])


def test_units_upload_as_they_land_and_a_fresh_copy_pulls_them(s3_server, tmp_path, monkeypatch):
    url = f"s3://{new_bucket(s3_server)}/ds"
    root = working_dir(url)
    write_json_atomic(root / "a.json", {"a": 1})  # a finished unit: in the bucket at once
    assert objects(url) == {"a.json": (root / "a.json").read_bytes()}
    (root / "b.bin").write_bytes(b"xyz")  # written without the atomic writer: the stage's end pushes it
    (root / ".c.tmp-1").write_bytes(b"partial")  # a writer's temp file: never uploaded
    assert push_tree(root) == 1 and set(objects(url)) == {"a.json", "b.bin"}
    assert push_tree(root) == 0  # in sync: nothing uploaded again
    fs().pipe_file(f"{url.removeprefix('s3://')}/other.json", b"{}")  # another machine's object
    (root / "b.bin").unlink()
    push_tree(root)
    assert set(objects(url)) == {"a.json", "other.json"}  # ours deleted, theirs kept

    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "machine2"))  # another machine: an empty copy
    fresh = working_dir(url)
    assert fresh != root and pull_tree(fresh) == 2 and files(fresh) == objects(url)
    assert pull_tree(fresh) == 0  # unchanged: nothing downloaded
    fs().pipe_file(f"{url.removeprefix('s3://')}/a.json", b'{"a": 2}')
    assert pull_tree(fresh) == 1 and (fresh / "a.json").read_bytes() == b'{"a": 2}'


def batches(urls: list[str]) -> list:
    from tagdit.train.stream import EpochStream

    stream = EpochStream(urls, lambda raw: torch.from_numpy(read_posterior(raw)[0].copy()), batch_size=4, seed=0,
                         shuffle_buffer=5)
    return [b for b, _ in zip(stream, range(6), strict=False)]  # more than an epoch of 10 samples


def test_shards_stream_from_the_bucket_and_stay_here_only_with_the_cache(s3_server, tmp_path):
    local = write_latent_fixture(tmp_path / "ds", n_train=10, n_val=2, per_shard=4)  # 3 train shards
    url = f"s3://{new_bucket(s3_server)}/ds/latents-fixture"
    s3_server.upload(local, url)
    copy = working_dir(url)
    pull_tree(copy, skip=SHARDS)
    assert (copy / "stats.json").is_file() and not list(copy.glob("*.tar"))
    streamed = shard_urls(copy, "train")
    assert streamed == [f"{url}/train-00000{i}.tar" for i in range(3)]
    want = batches(shard_urls(local, "train"))
    assert all(torch.equal(a, b) for a, b in zip(batches(streamed), want, strict=True))
    assert not list(copy.glob("*.tar"))  # streamed: nothing written here

    cached = shard_urls(copy, "train", cache=True)  # data.shard_cache=local: kept here on first read
    assert cached == [str(copy / f"train-00000{i}.tar") for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(batches(cached), want, strict=True))
    assert files(copy) == {k: v for k, v in objects(url).items() if k.startswith("train-") or k == "stats.json"}
    assert pull_tree(copy, skip=SHARDS) == 0 and push_tree(copy) == 0  # the cache is current: kept, nothing sent
    fs().pipe_file(f"{url.removeprefix('s3://')}/train-000001.tar", (local / "train-000000.tar").read_bytes())
    pull_tree(copy, skip=SHARDS)  # a shard changed in the bucket: its stale copy goes, the others stay
    assert sorted(p.name for p in copy.glob("*.tar")) == ["train-000000.tar", "train-000002.tar"]
    assert shard_urls(copy, "train")[1] == f"{url}/train-000001.tar"
    push_tree(copy)
    assert "train-000001.tar" in objects(url)  # forgotten here, not deleted there


def test_a_failed_read_is_tried_once_more_then_names_the_url(s3_server, monkeypatch):
    url = f"{s3_server.bucket()}/train-000000.tar"
    fs().pipe_file(url.removeprefix("s3://"), bytes(range(256)) * 64)
    real, failures = s3fs.core.S3File._fetch_range, []

    def flaky(self, start, end):
        if failures:
            failures.pop()
            raise ConnectionResetError("connection reset by peer")
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", flaky)
    failures[:] = [1]
    with StoreStream(url) as f:
        f.seek(1000)
        assert f.read(300) == (bytes(range(256)) * 64)[1000:1300] and not failures
    failures[:] = [1, 1]
    with StoreStream(url) as f, pytest.raises(StoreError, match=rf"reading {url} failed at byte 0 twice"):
        f.read(10)


def test_a_missing_bucket_or_a_dead_endpoint_fails_before_any_work(s3_server, tmp_path, monkeypatch):
    cfg = load_config(None, ["data.root=s3://no-such-bucket-here/shards"])
    with pytest.raises(StoreError, match=r"data.root=s3://no-such-bucket-here/shards: cannot use the store"):
        pull_roots(cfg)
    cfg = load_config(None, [f"run.root=s3://{new_bucket(s3_server)}/runs"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made before the change
    start = time.monotonic()
    with pytest.raises(StoreError, match="run.root=s3://.*cannot use the store"):
        pull_roots(cfg)
    assert time.monotonic() - start < 30
    s3fs.S3FileSystem.clear_instance_cache()


def encode(cfg):
    return enc.encode_latents(cfg, cfg.dataset_dir, vae_ckpt_path(cfg), cfg.dataset_dir / "latents-x", "x")


def vae_ckpt_path(cfg) -> Path:
    return Path(os.environ["TEST_VAE_CKPT"])


def train_dit(cfg, latents: Path, steps: int = 2) -> None:
    from tasks.train_dit import train_dit_stage

    cfg = load_config(None, [*ARGS(cfg), "dit.model=demo", "dit.model.patch=2", "dit.model.width=32", "dit.model.depth=1",
                             "dit.model.heads=2", "dit.model.tag_heads=2", "dit.model.max_tags=4", "dit.train.device=cpu",
                             "dit.train.nproc=2", "dit.train.batch_size=4", f"dit.train.steps={steps}",
                             "dit.train.warmup_steps=1", "dit.train.log_every=1", "dit.train.val_every=2",
                             "dit.val_samples=2"])
    shard = StageRecord(stage="shard", key="k", out_dir=str(cfg.dataset_dir), fingerprint="b")
    train_dit_stage(cfg, StageRecord(stage="encode", key="k", out_dir=str(latents), fingerprint="a"), shard)


def ARGS(cfg) -> list[str]:
    return [f"data.root={cfg.data.root}", f"data.name={cfg.data.name}", f"run.root={cfg.run.root}", "run.name=r",
            "data.resolution=32", "shards.samples_per_shard=8"]


def test_prepare_encode_and_ddp_training_on_s3_equal_the_local_run(s3_server, tmp_path, wd_model, vae_ckpt,
                                                                   monkeypatch):
    monkeypatch.setenv("TEST_VAE_CKPT", str(vae_ckpt))
    src = make_source(tmp_path / "src", folders=4, per_folder=6)
    bucket = new_bucket(s3_server)
    runs = {}
    for where, root in (("local", str(tmp_path / "local")), ("s3", f"s3://{bucket}/shards")):
        cfg, _, _ = prepare(root, src, wd_model, f"run.root={root}-runs")
        if where == "s3":  # encoded on another machine: each unit streams its image shard from the bucket
            monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "encoder"))
            pull_roots(cfg, enc.ENCODE.streams)  # what run_stage pulls before encode
        encode(cfg)
        if where == "s3":
            assert not list((tmp_path / "encoder").rglob("images/*.tar")) and (cfg.dataset_dir / "latents-x").is_dir()  # trained on another machine: the shards stay in the bucket, each rank streams its own
            monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "trainer"))
            shard_record(cfg)  # what the train-dit flow reads first: the shard stage's stamp, not its shards
            pull_roots(cfg, TRAIN_DIT.streams)  # what run_stage pulls before train-dit
        train_dit(cfg, cfg.dataset_dir / "latents-x")
        runs[where] = cfg
    trainer = runs["s3"].dataset_dir
    assert (trainer / "latents-x/stats.json").is_file() and (trainer / "vocab.json").is_file()
    assert not list((tmp_path / "trainer").rglob("*.tar"))  # data.shard_cache=none: no shard on its disk
    assert not [p for p in trainer.rglob("work/**/*") if p.is_file() and not p.name.startswith(".stage-")]  # nor
    # the data stages' chunks (the crops again) or unit records: their stamps alone, as a cache check pulls
    assert not list(trainer.rglob("*.parquet"))  # nor the dataset's tables (a manifest of every image)
    local = runs["local"].dataset_dir  # the evaluation's real images, read from the bucket
    assert list(read_samples(trainer, "val", 3)) == list(read_samples(local, "val", 3)) != []
    assert not list((tmp_path / "trainer").rglob("*.tar"))
    remote = f"s3://{bucket}/shards/g"
    stored = objects(remote)
    for part in ("images/", "latents-x/"):
        want = {k: v for k, v in files(local).items() if k.startswith(part) and k.endswith((".tar", ".json"))}
        assert len(want) >= 4 and {k: stored.get(k) for k in want} == want  # shards + records, byte for byte
    ckpt = objects(f"s3://{bucket}/shards-runs/r/dit")
    for name in ("ckpt-0000002/model.safetensors", "ckpt-0000002/ema.safetensors"):
        assert ckpt[name] == (tmp_path / "local-runs/r/dit" / name).read_bytes()
    assert ckpt["latest"] == b"ckpt-0000002\n"


KILLED_ENCODE = """
import sys, time
import tagdit.data.encode as e
real = e.encode_shard
def slow(*a, **k):
    out = real(*a, **k)
    time.sleep(3)  # a shard finished: time for the test to see it in the bucket and kill us
    return out
e.encode_shard = slow
from tagdit.config import load_config
import tasks.encode as enc
cfg = load_config(None, sys.argv[1:])
enc.encode_latents(cfg, cfg.dataset_dir, enc.Path("{ckpt}"), cfg.dataset_dir / "latents-x", "x")
"""


def test_a_run_killed_during_encode_redoes_no_shard_the_bucket_holds(s3_server, tmp_path, wd_model, vae_ckpt,
                                                                    monkeypatch):
    monkeypatch.setenv("TEST_VAE_CKPT", str(vae_ckpt))
    src = make_source(tmp_path / "src", folders=4, per_folder=6)
    root = f"s3://{new_bucket(s3_server)}/shards"
    cfg, _, shard = prepare(root, src, wd_model)
    shards = shard.info["train_shards"] + shard.info["val_shards"]
    latents = f"{root}/g/latents-x"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ENCODE.replace("{ckpt}", str(vae_ckpt)), *ARGS(cfg),
                             f"tagger.path={wd_model}", "crop.workers=1", "latents.batch_size=4"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not [k for k in fs().find(latents.removeprefix("s3://")) if k.endswith(".source.json")]:
        assert proc.poll() is None and time.monotonic() < deadline, "encode ended before a shard was stored"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = {k: fs().info(f"{latents.removeprefix('s3://')}/{k}")["LastModified"] for k in objects(latents)}
    done = [k.removesuffix(".source.json") for k in stored if k.endswith(".source.json")]
    assert 1 <= len(done) < len(shards)

    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "machine2"))  # resumed on another machine
    cfg2 = cfg  # the same settings; its folders are now this machine's working copies
    crop = checked_record(CROP, cfg2, {})  # the data stages are cache hits there, checked against the bucket:
    tag = checked_record(TAG, cfg2, {"crop": crop})
    hit = checked_record(SHARD, cfg2, {"crop": crop, "tag": tag})
    assert (hit.key, hit.fingerprint, hit.out_dir) == (shard.key, shard.fingerprint, str(cfg2.dataset_dir))
    here = [p.relative_to(cfg2.dataset_dir).as_posix() for p in cfg2.dataset_dir.rglob("*") if p.is_file()]
    big = [p for p in here if p.endswith((".tar", ".parquet")) and p != "work/listing.parquet"]  # (its own listing)
    assert "vocab.json" in here and "work/crop/.stage-crop.json" in here and big == []  # nothing big pulled
    rows = preview_rows(cfg2.dataset_dir, 4)
    assert len(load_crops(cfg2.dataset_dir, rows)) == len(rows) == 4
    assert not list(cfg2.dataset_dir.rglob("*.tar"))  # the flow's preview read the manifest and shards in the bucket
    pull_roots(cfg2, enc.ENCODE.streams)  # what run_stage pulls before the encode it must run
    encoded = encoded_keys(monkeypatch)
    encode(cfg2)
    assert len(encoded) > 0
    for name in done:  # every shard the bucket held complete was kept, not encoded and uploaded again
        for k in (f"{name}.tar", f"{name}.source.json"):
            assert fs().info(f"{latents.removeprefix('s3://')}/{k}")["LastModified"] == stored[k], k
    assert sorted(k for k in objects(latents) if k.endswith(".tar")) == sorted(shards)
    chunk = next(k for k in objects(f"{root}/g/work/crop") if k.endswith(".parquet"))  # changed in the bucket,
    fs().pipe_file(f"{root.removeprefix('s3://')}/g/work/crop/{chunk}", objects(f"{root}/g/work/crop")[chunk])
    assert checked_record(CROP, cfg2, {}) is None  # same size, a new object: not the stamped chunk


def test_pruned_checkpoints_and_released_pins_leave_the_bucket(s3_server):
    from tagdit.files import write_bytes_atomic
    from tagdit.formats.checkpoints import Checkpoints

    url = f"s3://{new_bucket(s3_server)}/runs/r/dit"
    ckpts = Checkpoints(working_dir(url))
    for step in (1, 2, 3):
        write_json_atomic(ckpts.dir_for(step) / "meta.json", {"step": step})
        write_bytes_atomic(ckpts.root / "latest", f"{ckpts.dir_for(step).name}\n".encode())
    ckpts.keep_for(ckpts.dir_for(1), "train-dit")
    ckpts.keep_for(ckpts.dir_for(2), "train-dit")  # the record moved on: ckpt 1's pin is released
    with ckpts.pinned(ckpts.dir_for(3)):  # a live process's pin: this machine's only
        assert not [k for k in objects(url) if ".pin-" in k]
    assert ckpts.prune(1) == [ckpts.dir_for(1)]
    assert sorted(objects(url)) == ["ckpt-0000002/.kept-train-dit", "ckpt-0000002/meta.json",
                                    "ckpt-0000003/meta.json", "latest"]


def test_a_fresh_machine_downloads_only_the_checkpoints_it_loads(s3_server, tmp_path, monkeypatch):
    """Of a run's three checkpoints on a URL, a resume gets `latest` and the one its record names (the
    oldest, pruned here and so in the bucket, never comes down), an evaluation their weights without the
    optimiser state, drawing one checkpoint's weights."""
    from tagdit.files import write_bytes_atomic
    from tagdit.formats.checkpoints import Checkpoints, resolve_checkpoint

    bucket = new_bucket(s3_server)

    def machine(name: str) -> tuple[PipelineConfig, Checkpoints]:  # its own cache: its config's folders move
        monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / name))
        cfg = load_config(None, [f"run.root=s3://{bucket}/runs", "run.name=r"])
        return cfg, Checkpoints(cfg.run_dir / "dit")

    def weights(ckpts: Checkpoints) -> set[str]:
        return {f for f in files(ckpts.root) if f.endswith((".safetensors", ".pt"))}

    _, ckpts = machine("trainer")
    for step in (1, 2, 3):
        for name in ("model.safetensors", "ema.safetensors", "state.pt"):
            write_bytes_atomic(ckpts.dir_for(step) / name, f"{name} {step}".encode())
        write_json_atomic(ckpts.dir_for(step) / "meta.json", {"step": step})
        write_bytes_atomic(ckpts.root / "latest", f"{ckpts.dir_for(step).name}\n".encode())
    ckpts.keep_for(ckpts.dir_for(2), "train-dit")
    url = remote_of(ckpts.root)

    cfg, ckpts = machine("resume")
    pull_roots(cfg, small_only=True)  # what run_stage pulls, then what a train-dit that computes pulls
    pull_roots(cfg, TRAIN_DIT.streams, reads=[ckpts.root])
    assert weights(ckpts) == {f"ckpt-000000{s}/{n}" for s in (2, 3)
                              for n in ("model.safetensors", "ema.safetensors", "state.pt")}
    assert ckpts.prune(1) == [ckpts.dir_for(1)] and not [k for k in objects(url) if k.startswith("ckpt-0000001")]

    cfg, ckpts = machine("evaluate")  # a stage that loads models but resumes nothing: no optimiser state
    pull_roots(cfg, small_only=True)
    pull_roots(cfg, reads=[ckpts.root], resumes=False)
    assert weights(ckpts) == {f"ckpt-000000{s}/{n}" for s in (2, 3) for n in ("model.safetensors", "ema.safetensors")}

    _, ckpts = machine("draw")
    assert resolve_checkpoint(ckpts.root) == ckpts.dir_for(3)  # what `tagdit sample` on the run loads
    assert weights(ckpts) == {"ckpt-0000003/model.safetensors", "ckpt-0000003/ema.safetensors"}


def test_a_run_superseded_or_forced_on_a_fresh_machine_is_moved_or_cleared_in_the_bucket(s3_server, tmp_path,
                                                                                         monkeypatch):
    """A trainer's folder of another configuration is moved aside in the bucket too, with the weights
    this machine never pulled (the next push must not delete the old run); a forced one is cleared there."""
    from tagdit.files import write_bytes_atomic
    from tagdit.orchestrate.markers import prepare_out_dir, write_marker

    url = f"s3://{new_bucket(s3_server)}/runs/r/dit"
    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "trainer"))
    write_marker(working_dir(url) / "identity.json", {"lr": 1})
    for name in ("ckpt-0000001/model.safetensors", "ckpt-0000001/meta.json", "latest"):
        write_bytes_atomic(working_dir(url) / name, name.encode())
    old = objects(url)

    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "fresh"))
    out_dir = working_dir(url)
    pull_tree(out_dir, skip=("*.safetensors",))  # as a stage's pull: no weights here
    prepare_out_dir(out_dir, {"lr": 2}, force=False, what="train-dit")
    aside = next(out_dir.parent.glob("dit.superseded-*"))
    assert objects(remote_of(aside)) == old and list(objects(url)) == ["identity.json"]
    assert pull_tree(aside) == 1  # what it held stays in sync under the new name: only the weights come
    push_tree(out_dir)
    assert objects(remote_of(aside)) == old  # the push of the new run leaves the old one alone

    write_bytes_atomic(out_dir / "ckpt-0000009/model.safetensors", b"new")
    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "forced"))
    prepare_out_dir(working_dir(url), {"lr": 2}, force=True, what="train-dit")
    assert list(objects(url)) == ["identity.json"]  # the weights never pulled here are gone too


def test_a_grown_bucket_dataset_downloads_only_its_changes_on_a_fresh_machine(s3_server, tmp_path, wd_model,
                                                                              vae_ckpt, monkeypatch):
    """One image added, prepare-data and encode run again on a machine with an empty copy: it reads the
    units it needs from the bucket, writes the changed ones, and the bucket ends byte-identical to the
    same growth on local folders."""
    from PIL import Image

    monkeypatch.setenv("TEST_VAE_CKPT", str(vae_ckpt))
    src = make_source(tmp_path / "src", folders=4, per_folder=6)
    roots = {"local": str(tmp_path / "local"), "s3": f"s3://{new_bucket(s3_server)}/shards"}
    for root in roots.values():
        cfg, _, _ = prepare(root, src, wd_model)
        encode(cfg)
        push_tree(cfg.dataset_dir)  # what run_stage does when a stage ends
    Image.new("RGB", (38, 40), (250, 250, 10)).save(src / "char0" / "new.png")  # the dataset grows by one image

    cfg, _, _ = prepare(roots["local"], src, wd_model)
    encode(cfg)
    want = files(cfg.dataset_dir)
    monkeypatch.setenv("TAGDIT_STORE_CACHE", str(tmp_path / "machine2"))
    cfg = grow_config(roots["s3"], src, wd_model)
    crop = checked_record(CROP, cfg, {}) or crop_stage(cfg)  # as run_stage: no valid stamp, so it computes
    tag = checked_record(TAG, cfg, {"crop": crop}) or tag_stage(cfg, crop)
    assert checked_record(SHARD, cfg, {"crop": crop, "tag": tag}) is None
    shard_stage(cfg, crop, tag)
    pull_roots(cfg, (*enc.ENCODE.streams, *BULK))  # what run_stage pulls before an encode it computes
    encode(cfg)
    push_tree(cfg.dataset_dir)
    here = {p.relative_to(cfg.dataset_dir).as_posix() for p in cfg.dataset_dir.rglob("*") if p.is_file()}
    for folder, most in (("work/crop/", 1), ("work/tag/", 1), ("images/", 2 + 1), ("latents-x/", 2)):
        units = [p for p in here if p.startswith(folder) and p.endswith((".parquet", ".tar")) and "/." not in p]
        assert 1 <= len(units) <= most, (folder, units)  # the changed bucket's chunk, its unit's shards
    stored = objects(f"{roots['s3']}/g")
    units = {k: v for k, v in want.items() if k.endswith((".tar", ".parquet")) and not k.startswith("work/listing")}
    assert {k: stored.get(k) for k in units} == units  # every chunk, shard, latent and table, byte for byte
    assert {k for k in stored if k.endswith((".tar", ".parquet"))} == set(units) | {"work/listing.parquet"}
