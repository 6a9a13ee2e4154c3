import math

import pytest
import torch

from models.diffusion import cosine_alpha_bar, make_alpha_bar
from models.dit import DiT
from models.sampling import CFGDenoiser, ddim_timesteps, sample_ddim, sample_latents
from tagdit.config import DiTModelConfig

TINY = DiTModelConfig(width=32, depth=2, heads=2, tag_heads=2, mlp_ratio=2.0, dropout=0.0, max_tags=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(TINY, vocab_size=10, latent_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_timesteps_run_from_999_to_0():
    assert ddim_timesteps(50).tolist()[:3] == [999, 979, 958] and ddim_timesteps(50)[-1] == 0
    assert ddim_timesteps(1).tolist() == [999]
    assert ddim_timesteps(1000).tolist() == list(range(999, -1, -1))


def test_batched_cfg_equals_two_separate_passes():
    model = random_dit()
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 400)
    cond = torch.tensor([[2, 3, 4, 0, 0]] * 3)
    neg = torch.tensor([[2, 5, 0, 0, 0]])  # negative prompt, batch 1: broadcast
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return model(*args)

    with torch.no_grad():
        guided = CFGDenoiser(counted, cond, neg, scale=4.0)(x, t)
        e_cond, e_neg = model(x, t, cond), model(x, t, neg.expand(3, -1))
    assert calls == [6]  # one forward over the doubled batch
    assert torch.allclose(guided, e_neg + 4.0 * (e_cond - e_neg), atol=1e-5)


def test_ddim_eta0_is_deterministic_for_a_seed():
    model = random_dit()
    ab = make_alpha_bar("cosine", 1000)
    tags, null = torch.tensor([[2, 3, 4, 0, 0]] * 2), torch.tensor([[2, 0, 0, 0, 0]] * 2)

    def run(seed, eta=0.0):
        g = torch.Generator().manual_seed(seed)
        return sample_latents(model, tags, null, alpha_bar=ab, shape=(2, 4, 8, 8), steps=8, eta=eta, scale=3.0, generator=g)

    a, b = run(0), run(0)
    assert torch.equal(a, b) and not torch.allclose(a, run(1))
    assert torch.equal(run(5, eta=1.0), run(5, eta=1.0)) and not torch.allclose(run(5, eta=1.0), run(5))


def test_seeds_batched_with_one_generator_each_match_separate_runs():
    model = random_dit()
    ab = make_alpha_bar("cosine", 1000)
    tags, null = torch.tensor([[2, 3, 4, 0, 0]] * 2), torch.tensor([[2, 0, 0, 0, 0]] * 2)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        n = len(seeds)
        return sample_latents(model, tags.repeat(n, 1), null.repeat(n, 1), alpha_bar=ab, shape=(2 * n, 4, 8, 8),
                              steps=6, eta=1.0, scale=3.0, generator=gens)

    together = run([7, 8])
    assert torch.allclose(together[:2], run([7]), atol=1e-5) and torch.allclose(together[2:], run([8]), atol=1e-5)
    with pytest.raises(ValueError, match="equal per-generator chunks"):
        sample_latents(model, tags[:1].repeat(3, 1), null[:1].repeat(3, 1), alpha_bar=ab, shape=(3, 4, 8, 8), steps=2,
                       generator=[torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("eta,steps", [(0.0, 200), (1.0, 500)])
def test_sampler_reproduces_a_gaussian_with_the_exact_denoiser(eta, steps):
    """Data x_0 ~ N(mu, s^2): E[eps | x_t] is known in closed form; samples must have mean mu, std s."""
    ab = cosine_alpha_bar(1000)
    mu, s = 0.7, 0.4

    def exact_eps(x, t):
        a = ab[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    g = torch.Generator().manual_seed(0)
    a_T = ab[-1].item()  # start from the exact marginal q(x_T) (ᾱ_T = 0.001, not 0)
    x_T = a_T**0.5 * mu + (a_T * s**2 + 1 - a_T) ** 0.5 * torch.randn(10000, 1, 2, 2, generator=g)
    out = sample_ddim(exact_eps, x_T, ab, steps=steps, eta=eta, generator=g)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.015)
    assert math.isfinite(out.abs().max().item())
