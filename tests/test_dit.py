import pytest
import torch

from models.diffusion import cosine_alpha_bar, eps_loss, linear_alpha_bar, min_snr_weight, q_sample
from models.dit import DiT, DiTBlock, build_dit, patchify, unpatchify
from tagdit.config import DIT_PRESETS
from tagdit.formats.checkpoints import count_parameters, save_weights
from tagdit.formats.trained_models import load_dit
from tests.model_fixtures import TINY_DIT
from tests.numerics import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab=10, latent=8) -> DiT:
    torch.manual_seed(0)
    return DiT(TINY_DIT, vocab_size=vocab, latent_size=latent, in_channels=4)


def randomize(model: DiT) -> DiT:
    """Break the zero init so every part of the model influences the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 4, 8, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4 * 3, 2 * 2 * 4)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # row-major, (p, q, c)
    assert torch.equal(unpatchify(tokens, 2, 4, 3), x)


def test_output_is_exactly_zero_at_init():
    model = tiny()
    x = torch.randn(3, 4, 8, 8)
    eps = model(x, torch.tensor([0, 500, 999]), torch.tensor([[2, 3, 4, 0, 0], [2, 0, 0, 0, 0], [2, 5, 6, 7, 8]]))
    assert eps.shape == x.shape and torch.count_nonzero(eps) == 0


def test_mlp_residual_is_gated_by_gate_mlp():
    torch.manual_seed(0)
    block = DiTBlock(16, 2, 2.0, 0.0)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    lin = block.adaLN_modulation[-1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.bias[5 * 16:].fill_(1.0)  # gate_mlp = 1, gate_msa = 0: only the MLP branch contributes
        only_mlp = block(x, c)
        expected = x + block.mlp(block.norm2(x))
        lin.bias[5 * 16:].zero_()
        lin.bias[2 * 16:3 * 16].fill_(1.0)  # gate_msa = 1, gate_mlp = 0: only attention contributes
        only_attn = block(x, c)
    assert_close_to_scale(only_mlp, expected)  # addcmul vs x + y: one rounding fewer
    assert_close_to_scale(only_attn, x + block.attn(block.norm1(x)))


def test_tag_padding_is_masked_and_tags_are_a_set():
    model = randomize(tiny()).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    tags = torch.tensor([[2, 3, 4, 0, 0], [2, 5, 0, 0, 0]])
    ref = model(x, t, tags)
    assert not torch.allclose(ref, model(x, t, torch.tensor([[2, 3, 5, 0, 0], [2, 5, 0, 0, 0]])))
    assert_close_to_scale(model(x, t, tags[:, :3]), ref)  # shorter padding: same output (other shapes)
    with torch.no_grad():
        model.tag_encoder.embed.weight[0].add_(5.0)  # the pad embedding is never attended to
    assert_close_to_scale(model(x, t, tags), ref)
    assert_close_to_scale(model(x, t, torch.tensor([[2, 4, 3, 0, 0], [2, 5, 0, 0, 0]])), ref)


def test_first_query_shortcut_matches_full_tag_encoder():
    enc = randomize(tiny()).tag_encoder.eval()
    tags = torch.tensor([[2, 3, 4, 0, 0], [2, 0, 0, 0, 0]])
    x = enc.embed(tags)
    mask = (tags != 0)[:, None, None, :]
    for block in enc.blocks:
        x = block(x, mask)  # every query through every block
    assert_close_to_scale(enc(tags), x[:, 0])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny())
    x, t, tags = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([[2, 3, 0, 0, 0], [2, 4, 5, 0, 0]])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, t, tags).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_close_to_scale(grads[1], grads[0])


def test_seed_preset_has_264m_parameters():
    with torch.device("meta"):  # count without allocating
        model = DiT(DIT_PRESETS["original-264m"], vocab_size=161, latent_size=32, in_channels=4)  # 158 tags + 3
    assert count_parameters(model) == pytest.approx(264e6, rel=0.005)


def test_checkpoint_rebuilds_the_model(tmp_path):
    model = randomize(tiny())
    save_weights(tmp_path / "ckpt-0000001" / "ema.safetensors", model.state_dict(), model.config_dict())
    (tmp_path / "ckpt-0000001" / "meta.json").write_text("{}")
    (tmp_path / "latest").write_text("ckpt-0000001\n")
    loaded = load_dit(tmp_path)
    x, t, tags = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([[2, 3, 0, 0, 0]])
    assert torch.equal(loaded(x, t, tags), model.eval()(x, t, tags))
    assert count_parameters(build_dit(model.config_dict())) == count_parameters(model)



def save_checkpoint(root, model, config):
    save_weights(root / "ckpt-0000001" / "ema.safetensors", model.state_dict(), config)
    (root / "ckpt-0000001" / "meta.json").write_text("{}")
    (root / "latest").write_text("ckpt-0000001\n")


def test_checkpoint_carries_its_noise_schedule(tmp_path, caplog):
    model = DiT(TINY_DIT, vocab_size=10, latent_size=8, schedule="linear", timesteps=500)
    save_checkpoint(tmp_path / "new", model, model.config_dict())
    loaded = load_dit(tmp_path / "new", schedule="cosine", timesteps=1000)  # today's config: only a fallback
    assert (loaded.schedule, loaded.timesteps) == ("linear", 500)
    assert torch.equal(loaded.alpha_bar, linear_alpha_bar(500))

    old = {k: v for k, v in model.config_dict().items() if k not in ("schedule", "timesteps")}
    save_checkpoint(tmp_path / "old", model, old)
    with pytest.raises(ValueError, match="noise schedule"):
        load_dit(tmp_path / "old")
    with caplog.at_level("WARNING"):
        fallback = load_dit(tmp_path / "old", schedule="cosine", timesteps=1000)
    assert torch.equal(fallback.alpha_bar, cosine_alpha_bar(1000)) and "predates" in caplog.text

def test_schedules_match_the_seed():
    ab = cosine_alpha_bar(1000)
    assert ab[-1].item() == pytest.approx(0.001, rel=1e-9) and 0.998 < ab[0].item() < 0.999
    assert torch.all(ab[1:] < ab[:-1])
    lin = linear_alpha_bar(1000)
    assert lin[0].item() == pytest.approx(1 - 0.00085) and torch.all(lin[1:] < lin[:-1])
    assert lin[-1].sqrt().item() == pytest.approx(0.0397, abs=2e-4)  # the original's comment: 0.03973617


def test_q_sample_and_l_simple():
    ab = cosine_alpha_bar(1000)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 999])
    x_t = q_sample(x0, t, eps, ab)
    assert torch.allclose(x_t[1], (0.001**0.5) * x0[1] + (0.999**0.5) * eps[1], atol=1e-6)
    assert eps_loss(eps, eps).item() == 0.0 and eps_loss(torch.zeros_like(eps), eps).item() == pytest.approx(eps.square().mean().item())


def test_min_snr_weights_only_the_low_noise_steps():
    ab = cosine_alpha_bar(1000)
    t = torch.arange(1000)
    w = min_snr_weight(t, ab, 5.0)
    snr = ab / (1 - ab)
    assert torch.all(w[snr <= 5] == 1) and torch.allclose(w[snr > 5], (5 / snr[snr > 5]).float(), rtol=1e-4)
    assert w[0] < 0.01 and w[-1] == 1 and torch.all(torch.isfinite(min_snr_weight(t, torch.zeros(1000), 5.0)))
    pred, eps = torch.zeros(2, 4, 2, 2), torch.stack([torch.ones(4, 2, 2), 2 * torch.ones(4, 2, 2)])
    assert eps_loss(pred, eps, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 * 1 + 4 * 0.5) / 2)
