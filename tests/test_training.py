import json
import math

import pytest
import torch
import webdataset as wds
from torch import nn

from tagdit.config import TrainConfig
from tagdit.formats.checkpoints import Checkpoints, load_model_weights
from tagdit.train.loop import NonFiniteLossError, fit
from tagdit.train.optim import lr_factor
from tagdit.train.stream import EpochStream
from tests.numerics import assert_close_to_scale


def write_shards(root, n_shards=3, per_shard=7):
    urls = []
    for s in range(n_shards):
        path = root / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as w:
            for i in range(per_shard):
                k = s * per_shard + i
                w.write({"__key__": f"s{k:04d}", "json": json.dumps({"x": k}).encode()})
        urls.append(str(path))
    return urls


def decode(raw):
    return torch.tensor([float(json.loads(raw["json"])["x"])])


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    urls = write_shards(tmp_path)
    a = EpochStream(urls, decode, batch_size=4, seed=1, shuffle_buffer=5)
    full = take(a, 12)  # 48 samples: crosses two epoch boundaries (21 per epoch)
    b = EpochStream(urls, decode, batch_size=4, seed=1, shuffle_buffer=5)
    take(b, 7)
    state = b.state_dict()
    c = EpochStream(urls, decode, batch_size=4, seed=1, shuffle_buffer=5)
    c.load_state_dict([state])
    rest = take(c, 5)
    assert all(torch.equal(x, y) for x, y in zip(full[7:], rest, strict=True))
    first_epoch = torch.cat(full)[:21].flatten().tolist()
    assert sorted(first_epoch) == list(range(21)) and first_epoch != list(range(21))


def test_stream_splits_samples_between_ranks(tmp_path):
    urls = write_shards(tmp_path, n_shards=2, per_shard=6)
    seen = []
    for rank in range(2):
        s = EpochStream(urls, decode, batch_size=6, seed=0, rank=rank, world_size=2)
        seen.append(set(torch.cat(take(s, 1)).flatten().tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(12))


def test_lr_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    # warmup "none", as Keras' CosineDecay(1, decay_steps=90, warmup_steps=10) without warmup_target
    assert lr_factor(0, 10, 100, "none") == 1.0
    assert lr_factor(45, 10, 100, "none") == pytest.approx(0.5)
    assert lr_factor(90, 10, 100, "none") == lr_factor(99, 10, 100, "none") == pytest.approx(0.0, abs=1e-12)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def loss_fn(model, batch, step):
    x = batch / 20
    noise = torch.randn_like(x) * 0.01  # global RNG: must be restored on resume
    loss = ((model(x) - (x.sin() + noise)) ** 2).mean()
    return loss, {"mse": loss.detach()}


def run_fit(tmp_path, out, steps, urls, loss=loss_fn, grad_accum=1):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=3,
                      log_every=1, val_every=5, grad_accum=grad_accum, keep_checkpoints=None)  # keep all
    stream = EpochStream(urls, decode, batch_size=4 // grad_accum, seed=0, shuffle_buffer=5)
    return fit(model=Tiny(), loss_fn=loss, stream=stream, cfg=cfg, out_dir=out,
               model_config={"kind": "tiny"}, device=torch.device("cpu"),
               val_fn=lambda m, step, w: {"val": float(step)})


@pytest.mark.numerics
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fit_resumes_exactly(tmp_path, grad_accum):
    urls = write_shards(tmp_path)
    straight = run_fit(tmp_path, tmp_path / "a", 10, urls, grad_accum=grad_accum)
    run_fit(tmp_path, tmp_path / "b", 10, urls, grad_accum=grad_accum)
    # simulate a kill after the step-6 checkpoint: drop later checkpoints, point latest at 6
    ck = Checkpoints(tmp_path / "b")
    for d in (tmp_path / "b").glob("ckpt-*"):
        if int(d.name.split("-")[1]) > 6:
            import shutil

            shutil.rmtree(d)
    (tmp_path / "b" / "latest").write_text("ckpt-0000006\n")
    resumed = run_fit(tmp_path, tmp_path / "b", 10, urls, grad_accum=grad_accum)
    assert resumed.step == straight.step == 10
    for ema in (True, False):
        wa, cfg_a, _ = load_model_weights(tmp_path / "a", ema=ema)
        wb, _, _ = load_model_weights(tmp_path / "b", ema=ema)
        assert cfg_a == {"kind": "tiny"}
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (tmp_path / "a").glob("ckpt-*")) == [
        "ckpt-0000003", "ckpt-0000006", "ckpt-0000009", "ckpt-0000010"]
    assert ck.latest().name == "ckpt-0000010"
    assert straight.metrics["val"] == 10.0


def test_fit_stops_on_nan_and_keeps_last_good_checkpoint(tmp_path):
    urls = write_shards(tmp_path)

    def exploding(model, batch, step):
        loss, logs = loss_fn(model, batch, step)
        return (loss * math.nan if step == 4 else loss), logs

    with pytest.raises(NonFiniteLossError, match="step 5"):
        run_fit(tmp_path, tmp_path / "n", 10, urls, loss=exploding)
    assert Checkpoints(tmp_path / "n").latest().name == "ckpt-0000003"


@pytest.mark.numerics
def test_no_grad_clip_trains_unclipped(tmp_path):
    urls = write_shards(tmp_path)

    def final_weights(out, clip):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=6, grad_clip=clip)
        fit(model=Tiny(), loss_fn=loss_fn, stream=EpochStream(urls, decode, batch_size=4, seed=0), cfg=cfg,
            out_dir=tmp_path / out, model_config={}, device=torch.device("cpu"))
        return load_model_weights(tmp_path / out, ema=False)[0]

    none, huge, tiny = final_weights("none", None), final_weights("huge", 1e9), final_weights("tiny", 1e-3)
    assert all(torch.equal(none[k], huge[k]) for k in none)
    assert not all(torch.equal(none[k], tiny[k]) for k in none)


class Counter:
    """A second trainable thing's stand-in: state saved in every checkpoint, updated after each step."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def test_after_step_hook_runs_each_step_and_its_state_resumes(tmp_path):
    urls = write_shards(tmp_path)
    seen = []

    def run(counter, steps):
        def after_step(batch, step):
            counter.n += 1
            seen.append(step)
            return {"aux": float(counter.n)}

        cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=1, checkpoint_every=3, log_every=1)
        return fit(model=Tiny(), loss_fn=loss_fn, stream=EpochStream(urls, decode, batch_size=4, seed=0), cfg=cfg,
                   out_dir=tmp_path / "run", model_config={}, device=torch.device("cpu"),
                   extra={"counter": counter}, after_step=after_step)

    run(Counter(), 4)
    (tmp_path / "run" / "latest").write_text("ckpt-0000003\n")  # as if killed after step 3
    resumed = Counter()
    run(resumed, 5)
    assert seen == [1, 2, 3, 4, 4, 5] and resumed.n == 5


def mse(model, batch, step):
    """A loss without randomness: micro-batches and the full batch see exactly the same function."""
    x = batch / 20
    return ((model(x) - x.sin()) ** 2).mean(), {"mse": torch.tensor(0.0)}


@pytest.mark.numerics
def test_grad_accum_update_equals_one_step_on_the_full_batch(tmp_path):
    urls = write_shards(tmp_path)

    def train(out, grad_accum):
        torch.manual_seed(0)
        model, grads = Tiny(), []
        cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=1, checkpoint_every=3, grad_clip=None,
                          grad_accum=grad_accum)
        stream = EpochStream(urls, decode, batch_size=8 // grad_accum, seed=0, shuffle_buffer=5)
        fit(model=model, loss_fn=mse, stream=stream, cfg=cfg, out_dir=tmp_path / out, model_config={},
            device=torch.device("cpu"),
            after_step=lambda batch, step: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()])) or {})
        return load_model_weights(tmp_path / out, ema=False)[0], grads

    (full, full_grads), (accum, accum_grads) = train("full", 1), train("accum", 2)
    for a, b in zip(full_grads, accum_grads, strict=True):
        assert_close_to_scale(b, a)  # two half-batch sums vs one: another summation order
    for k in full:
        assert_close_to_scale(accum[k], full[k])
    assert not torch.equal(full_grads[0], full_grads[1])


def test_a_batch_that_does_not_split_into_micro_batches_is_a_clear_error():
    from tagdit.train.ranks import start_rank

    with pytest.raises(ValueError, match="multiple of 4"):
        start_rank(TrainConfig(batch_size=6, grad_accum=4, device="cpu"), "dit")
    assert start_rank(TrainConfig(batch_size=8, grad_accum=4, device="cpu"), "dit").world == 1
