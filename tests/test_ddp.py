"""DDP on CPU with the gloo backend: two processes match one (with and without gradient accumulation), a
stop asked on one rank stops both after the same step, and the task's torchrun path trains."""

import json

import pytest
import torch
import torch.multiprocessing as mp

from models.diffusion import eps_loss, make_alpha_bar, q_sample
from models.dit import DiT
from tagdit.config import load_config
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.formats.checkpoints import load_weights
from tagdit.orchestrate.stage import StageRecord
from tests.model_fixtures import random_dit
from tests.numerics import assert_close_to_scale


def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(8, 4, 8, 8, generator=g)
    tags = torch.randint(3, 10, (8, 5), generator=g)
    tags[:, 0], tags[:, 3:] = 2, 0
    return q_sample(z, t, eps, make_alpha_bar("cosine", 1000)), t, tags, eps


def model() -> DiT:
    return random_dit().train()  # its zero init is broken, so every parameter gets a gradient


def grads(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def _worker(rank: int, world: int, rdv: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    ddp = torch.nn.parallel.DistributedDataParallel(model())
    x_t, t, tags, eps = (a.chunk(world)[rank] for a in batch())  # this rank's half of the batch
    eps_loss(ddp(x_t, t, tags), eps).backward()
    if rank == 0:
        torch.save(grads(ddp.module), out)
    del ddp  # its reducer holds the group: the group must go in destroy_process_group, not at exit
    end_gloo_rank()


def end_gloo_rank() -> None:
    """A rank's clean end: meet at a barrier, destroy the group while Python is whole, then leave without
    interpreter teardown, where gloo's threads aborted a rank in about 1 of 100 CI runs ("terminate called
    without an active exception") after its work was done and checked."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.numerics
def test_ddp_gloo_two_processes_match_single_process_gradients(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path / "g.pt")), nprocs=2, join=True)
    single = model()
    x_t, t, tags, eps = batch()
    eps_loss(single(x_t, t, tags), eps).backward()
    ddp_grads = torch.load(tmp_path / "g.pt", weights_only=True)
    assert_close_to_scale(ddp_grads, grads(single))  # all-reduced halves vs one batch
    assert grads(single).abs().sum() > 0


def test_train_task_runs_torchrun_ddp_when_nproc_is_2(tmp_path):
    from tasks.train_dit import train_dit_stage

    latents = write_latent_fixture(tmp_path / "ds", n_train=16, n_val=4, per_shard=8)
    cfg = load_config(None, [
        f"data.root={tmp_path}", "data.name=ds", f"run.root={tmp_path}/runs", "dit.model=demo", "dit.model.patch=2", "dit.model.width=32",
        "dit.model.depth=1", "dit.model.heads=2", "dit.model.tag_heads=2", "dit.model.max_tags=4",
        "dit.train.device=cpu", "dit.train.nproc=2", "dit.train.batch_size=8", "dit.train.steps=4",
        "dit.train.warmup_steps=1", "dit.train.log_every=1", "dit.train.val_every=4", "dit.val_samples=4"])
    fake = {"key": "k", "out_dir": str(latents), "info": {}}
    record = train_dit_stage(cfg, StageRecord(stage="encode", fingerprint="a", **fake),
                             StageRecord(stage="shard", fingerprint="b", **fake))
    meta = json.loads((cfg.run_dir / "dit" / "ckpt-0000004" / "meta.json").read_text())
    assert record.info["step"] == 4 and meta["metrics"]["loss"] > 0 and record.info["val_loss"] > 0
    weights = load_weights(cfg.run_dir / "dit" / "ckpt-0000004" / "model.safetensors")[0]
    assert weights["final_layer.linear.weight"].abs().sum() > 0  # trained away from the zero init


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def mse(model, x, step):
    return ((model(x) - x.sin()) ** 2).mean(), {}


GLOBAL_BATCH = 8


class Slices:
    """Step s's global batch data[8s : 8s+8], dealt to the ranks, each rank's share to its micro-batches."""

    def __init__(self, rank: int, world: int, grad_accum: int):
        self.data = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
        self.rank, self.world, self.grad_accum = rank, world, grad_accum
        self.batch_size = GLOBAL_BATCH // (world * grad_accum)

    def __iter__(self):
        for s in range(len(self.data) // GLOBAL_BATCH):
            for m in range(self.grad_accum):
                start = s * GLOBAL_BATCH + (self.rank * self.grad_accum + m) * self.batch_size
                yield self.data[start:start + self.batch_size]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def fit_tiny(out: str, rank: int, world: int, grad_accum: int) -> None:
    from tagdit.config import TrainConfig
    from tagdit.train.loop import fit

    torch.manual_seed(0)
    cfg = TrainConfig(steps=4, batch_size=GLOBAL_BATCH, lr=1e-2, warmup_steps=1, checkpoint_every=4,
                      grad_accum=grad_accum)
    fit(model=Tiny(), loss_fn=mse, stream=Slices(rank, world, grad_accum), cfg=cfg, out_dir=out, model_config={},
        device=torch.device("cpu"))


def noisy_mse(model, x, step):
    """A loss drawing from each rank's own RNG: resuming must restore every rank's RNG state."""
    return ((model(x) - x.sin() - 0.01 * torch.randn_like(x)) ** 2).mean(), {}


def decode_x(raw):
    return torch.tensor([json.loads(raw["json"])["x"] / 20])


def fit_stream(out: str, urls: list[str], rank: int, world: int, loss_fn=None) -> None:
    """4 steps of a global batch of 8 in 2 micro-batches per rank, from shard-split streams; checkpoints at 2 and 4."""
    from tagdit.config import TrainConfig
    from tagdit.train.loop import fit
    from tagdit.train.stream import EpochStream

    torch.manual_seed(0)
    cfg = TrainConfig(steps=4, batch_size=GLOBAL_BATCH, lr=1e-2, warmup_steps=1, checkpoint_every=2, grad_accum=2)
    stream = EpochStream(urls, decode_x, batch_size=GLOBAL_BATCH // (2 * world), seed=0, shuffle_buffer=3,
                         rank=rank, world_size=world)
    fit(model=Tiny(), loss_fn=loss_fn or noisy_mse, stream=stream, cfg=cfg, out_dir=out, model_config={},
        device=torch.device("cpu"))


def fit_stopped_by_rank_0(out: str, urls: list[str], rank: int, world: int) -> None:
    """Only rank 0 is asked to stop, during step 3: every rank must stop after it (rank 1 alone would hang)."""
    from pathlib import Path

    from tagdit.train.stop import TrainingStopped, clear_stop, request_stop

    def loss(model, x, step):
        if rank == 0 and step == 2:
            request_stop("test")
        return noisy_mse(model, x, step)

    try:
        fit_stream(out, urls, rank, world, loss)
    except TrainingStopped as e:
        Path(out, f"stopped-rank{rank}.txt").write_text(str(e))
    finally:
        clear_stop()


def _ddp_worker(rank: int, world: int, root: str, urls: list[str]) -> None:
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rdv", rank=rank, world_size=world)
    try:
        fit_tiny(f"{root}/accum", rank, world, grad_accum=2)
        fit_stream(f"{root}/straight", urls, rank, world)
        fit_stream(f"{root}/killed", urls, rank, world)
        dist.barrier()
        if rank == 0:  # as if killed after the step-2 checkpoint
            shutil.rmtree(Path(root, "killed", "ckpt-0000004"))
            Path(root, "killed", "latest").write_text("ckpt-0000002\n")
        dist.barrier()
        fit_stream(f"{root}/killed", urls, rank, world)
        fit_stopped_by_rank_0(f"{root}/stopped", urls, rank, world)
    except BaseException:
        dist.destroy_process_group()
        raise
    end_gloo_rank()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two gloo ranks: a grad-accumulation run, a stream run straight through and resumed mid-way, and
    one that rank 0 alone is asked to stop."""
    from tests.test_training import write_shards

    root = tmp_path_factory.mktemp("ddp")
    urls = write_shards(root, n_shards=4, per_shard=7)
    mp.spawn(_ddp_worker, args=(2, str(root), urls), nprocs=2, join=True)
    return root


@pytest.mark.numerics
def test_ddp_with_grad_accum_matches_one_process_on_the_same_global_batch(ddp_runs, tmp_path):
    from tagdit.formats.checkpoints import load_model_weights

    fit_tiny(str(tmp_path / "one"), rank=0, world=1, grad_accum=1)
    ddp, one = load_model_weights(ddp_runs / "accum", ema=False)[0], load_model_weights(tmp_path / "one", ema=False)[0]
    torch.manual_seed(0)
    start = Tiny().state_dict()
    for k in one:
        assert_close_to_scale(ddp[k], one[k])
    assert not all(torch.allclose(one[k], start[k]) for k in one)  # it trained


@pytest.mark.numerics
def test_ddp_resume_with_grad_accum_is_exact(ddp_runs):
    from tagdit.formats.checkpoints import load_model_weights

    straight, resumed = (load_model_weights(ddp_runs / d, ema=False)[0] for d in ("straight", "killed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = torch.load(ddp_runs / "killed" / "ckpt-0000002" / "state.pt", weights_only=True)
    assert [r["stream"]["world"] for r in state["ranks"]] == [2, 2]
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])  # each rank's own


def test_a_stop_asked_on_one_rank_stops_every_rank_after_the_same_step(ddp_runs):
    said = [(ddp_runs / "stopped" / f"stopped-rank{r}.txt").read_text() for r in (0, 1)]
    assert all("stopped at step 3 of 4" in s for s in said), said
    assert (ddp_runs / "stopped" / "latest").read_text().strip() == "ckpt-0000003"  # not a regular one (2, 4)
