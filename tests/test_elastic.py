"""Elastic resume: a run stopped mid-epoch on 2 ranks and resumed on 3 reads each sample of the epoch
once; the checkpoint is read by rank 0 alone; the ranks' noise is seeded with (seed, step, rank)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tagdit.train.dit import StepNoise
from tests.test_stream import write_shards

ROOT = Path(__file__).resolve().parents[1]
SIZES = [13, 11, 12, 9, 15]  # 60 samples: 10 steps of a global batch of 6


def torchrun(nproc: int, shards: Path, out: Path, steps: int, kill_at: int | None = None) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tests.elastic_run", str(shards), str(out), str(steps), *([str(kill_at)] if kill_at else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120).returncode


def records(out: Path, world: int, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"keys-{world}-{rank}.jsonl").read_text().splitlines()]


def test_two_ranks_killed_mid_epoch_and_resumed_as_three_read_each_sample_once(tmp_path):
    write_shards(tmp_path, SIZES)
    out = tmp_path / "run"
    out.mkdir()
    assert torchrun(2, tmp_path, out, steps=10, kill_at=5) != 0  # killed after the step-4 checkpoint
    assert torchrun(3, tmp_path, out, steps=10) == 0
    before = [k for r in range(2) for rec in records(out, 2, r) if rec.get("step", 99) < 4 for k in rec["keys"]]
    after = [k for r in range(3) for rec in records(out, 3, r) if "keys" in rec for k in rec["keys"]]
    assert len(before) == 24 and len(after) == 36
    assert sorted(before + after) == sorted(100 * s + i for s, n in enumerate(SIZES) for i in range(n))
    reads = [[rec["read"] for rec in records(out, 3, r) if "read" in rec] for r in range(3)]
    assert reads == [[str(out / "ckpt-0000004")], [], []]  # rank 0 read it, the others got it broadcast
    sums = [[rec["checksum"] for rec in records(out, 3, r) if "checksum" in rec] for r in range(3)]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 1 and sums[0][0] != 0  # all got the same record
    state = torch.load(out / "ckpt-0000010" / "state.pt", weights_only=True)
    rngs = [r["rng"]["torch"] for r in state["ranks"]]
    assert not torch.equal(rngs[1], rngs[2])  # no rank's RNG state copied to another


def test_noise_is_seeded_with_seed_step_and_rank():
    def draw(noise: StepNoise, step: int) -> torch.Tensor:
        return torch.randn(4, generator=noise.at(step, torch.device("cpu")))

    rank0 = StepNoise(7, 0)
    first = draw(rank0, 5)
    assert not torch.equal(draw(rank0, 5), first)  # the step's next micro-batch draws on
    assert torch.equal(draw(StepNoise(7, 0), 5), first)  # a resume at step 5 draws the same
    assert not torch.equal(draw(StepNoise(7, 1), 5), first) and not torch.equal(draw(StepNoise(7, 0), 6), first)


def test_checkpoint_minutes_adds_timed_checkpoints_and_their_write_time_is_logged(tmp_path, caplog):
    import logging

    from tagdit.config import TrainConfig
    from tagdit.train.loop import fit
    from tagdit.train.stream import EpochStream
    from tests.test_training import decode
    from tests.test_training import write_shards as write_x_shards

    urls = write_x_shards(tmp_path)

    def mse(model, x, step):
        return ((model(x) - x) ** 2).mean(), {}

    def run(out: str, minutes: float | None) -> list[str]:
        cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=1000, checkpoint_minutes=minutes)
        fit(model=torch.nn.Linear(1, 1), loss_fn=mse, stream=EpochStream(urls, decode, 4, seed=0), cfg=cfg,
            out_dir=tmp_path / out, model_config={}, device=torch.device("cpu"))
        return sorted(p.name for p in (tmp_path / out).glob("ckpt-*"))

    assert run("steps", None) == ["ckpt-0000003"]
    with caplog.at_level(logging.INFO, logger="tagdit.train.loop"):
        assert run("timed", 1e-9) == ["ckpt-0000001", "ckpt-0000002", "ckpt-0000003"]  # due at every step
    assert "wrote ckpt-0000001 in" in caplog.text


def test_a_latent_shards_count_comes_from_its_source_record_else_its_headers(tmp_path):
    from tagdit.demo.stand_in_latents import write_latent_fixture
    from tagdit.formats.latent_shards import LatentSource
    from tagdit.train.dit import latent_sample_count, shard_urls
    from tagdit.train.tar_samples import tar_sample_count

    url = shard_urls(write_latent_fixture(tmp_path, n_train=6, n_val=2, per_shard=6), "train")[0]
    assert latent_sample_count(url) == tar_sample_count(url) == 6
    LatentSource(image_shard_sha256="", images={f"k{i}": "" for i in range(5)}).save(Path(url))
    assert latent_sample_count(url) == 5  # the record is read, not the shard
