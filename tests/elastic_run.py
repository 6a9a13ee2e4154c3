"""One rank of the tiny torchrun run of tests/test_elastic.py: logs the keys it trains on at each step,
which checkpoints it read from disk, a checksum of the checkpoint it resumed from, and dies at step
`kill_at` (as if killed) when one is given.

    torchrun ... -m tests.elastic_run SHARDS OUT STEPS [KILL_AT]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import tagdit.train.loop as loop
import tagdit.train.resume as resume
from tagdit.config import TrainConfig
from tagdit.train.loop import fit
from tagdit.train.ranks import epoch_stream, start_rank


def decode(raw: dict) -> dict:
    return {"x": torch.tensor([json.loads(raw["json"])["x"] / 100.0]), "key": int(raw["__key__"][1:])}


def main(shards: str, out: str, steps: int, kill_at: int | None) -> None:
    torch.set_num_threads(1)
    tc = TrainConfig(steps=steps, batch_size=6, lr=1e-2, warmup_steps=1, checkpoint_every=4, log_every=1,
                     val_every=1000, device="cpu", loader_workers=0, shuffle_buffer=4)
    r = start_rank(tc, "test")
    log = open(Path(out) / f"keys-{r.world}-{r.rank}.jsonl", "a", buffering=1)  # noqa: SIM115
    real_read, real_load = resume.read_checkpoint, resume.load_checkpoint
    resume.read_checkpoint = lambda ckpt: log.write(json.dumps({"read": str(ckpt)}) + "\n") and real_read(ckpt)

    def load(*args):
        record = real_load(*args)
        if record is not None:  # a checksum of every tensor each rank got
            tensors: list[torch.Tensor] = []
            resume._split(record, tensors)
            total = sum(float(t.double().sum()) for t in tensors)
            log.write(json.dumps({"checksum": total}) + "\n")
        return record

    loop.load_checkpoint = load

    def loss_fn(model, batch, step):
        if step == kill_at:
            os._exit(9)
        log.write(json.dumps({"step": step, "keys": batch["key"].tolist()}) + "\n")
        return ((model(batch["x"]) - batch["x"].sin()) ** 2).mean(), {}

    urls = sorted(str(p) for p in Path(shards).glob("*.tar"))
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    fit(model=model, loss_fn=loss_fn, stream=epoch_stream(urls, decode, tc, r), cfg=tc, out_dir=out,
        model_config={}, device=r.device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
