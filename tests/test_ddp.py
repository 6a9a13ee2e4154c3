"""DDP on CPU with the gloo backend: two processes match one, and the task's torchrun path trains."""

import json

import torch
import torch.multiprocessing as mp

from models.diffusion import eps_loss, make_alpha_bar, q_sample
from models.dit import DiT
from tagdit.config import load_config
from tagdit.stage import StageRecord
from tagdit.train.checkpoints import load_weights
from tests.latent_fixtures import write_latent_fixture
from tests.model_fixtures import random_dit


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
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process_gradients(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path / "g.pt")), nprocs=2, join=True)
    single = model()
    x_t, t, tags, eps = batch()
    eps_loss(single(x_t, t, tags), eps).backward()
    ddp_grads = torch.load(tmp_path / "g.pt", weights_only=True)
    assert torch.allclose(ddp_grads, grads(single), rtol=1e-4, atol=1e-6)
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
