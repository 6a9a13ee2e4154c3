"""The GPU code paths, run on CPU where torch allows: bf16 autocast and torch.compile (inductor)."""

import math

import pytest
import torch

import tagdit.train.dit
from tagdit.config import TrainConfig
from tagdit.demo.stand_in_latents import write_latent_fixture
from tagdit.devices import autocast, autocast_dtype
from tagdit.formats.checkpoints import load_weights
from tagdit.train.loop import _wrap_model
from tasks.train_dit import train_dit_stage
from tests.run_fixtures import config, records

pytestmark = pytest.mark.usefixtures("one_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
RUN = ["dit.train.batch_size=4", "dit.train.log_every=1", "dit.train.val_every=3", "dit.train.checkpoint_every=3"]


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert autocast_dtype(CUDA) == torch.bfloat16 and autocast_dtype(CPU) is None
    assert autocast_dtype(CPU, "bf16") == torch.bfloat16 and autocast_dtype(CUDA, "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(CPU, "fp16")
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.numerics
def test_bf16_autocast_trains_a_tiny_dit_on_cpu(tmp_path, monkeypatch):
    latents = write_latent_fixture(tmp_path / "ds", n_train=12, n_val=4, per_shard=5)
    seen, real = [], tagdit.train.dit.dit_loss

    def spy(model, batch, step, **kw):
        loss, logs = real(model, batch, step, **kw)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), loss.item()))
        return loss, logs

    monkeypatch.setattr(tagdit.train.dit, "dit_loss", spy)
    cfg = config(tmp_path, *RUN, "dit.train.steps=6", "dit.train.precision=bf16")
    rec = train_dit_stage(cfg, *records(latents))
    assert len(seen) == 6 and all(on and dtype == torch.bfloat16 for on, dtype, _ in seen)
    assert all(math.isfinite(loss) for *_, loss in seen) and math.isfinite(rec.info["val_loss"])
    state, _ = load_weights(rec.info["checkpoint"] + "/model.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())  # master weights stay fp32


def test_compile_applies_on_cpu_too():
    model = torch.nn.Linear(2, 2)
    assert _wrap_model(model, TrainConfig(compile=False), CPU, 1) is model
    compiled = _wrap_model(model, TrainConfig(compile=True), CPU, 1)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model


@pytest.mark.numerics
@pytest.mark.slow  # inductor's first CPU compile of the step takes ~60 s on 2 cores (cached afterwards: ~5 s)
def test_compiled_training_on_cpu_matches_eager(tmp_path):
    latents = write_latent_fixture(tmp_path / "ds", n_train=12, n_val=4, per_shard=5)
    recs = {}
    for mode in ("eager", "compiled"):
        cfg = config(tmp_path, *RUN, "dit.train.steps=3", f"run.name={mode}", "dit.model.dropout=0", "dit.model.depth=1",
                     f"dit.train.compile={'true' if mode == 'compiled' else 'false'}")
        recs[mode] = train_dit_stage(cfg, *records(latents))
    a, b = (load_weights(recs[m].info["checkpoint"] + "/model.safetensors")[0] for m in ("eager", "compiled"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)
    assert recs["compiled"].info["loss"] == pytest.approx(recs["eager"].info["loss"], rel=1e-3)
    assert recs["compiled"].info["val_loss"] == pytest.approx(recs["eager"].info["val_loss"], rel=1e-3)
