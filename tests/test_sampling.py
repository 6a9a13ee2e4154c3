import math

import pytest
import torch

from models.diffusion import cosine_alpha_bar, make_alpha_bar
from models.sampling import (
    CFGDenoiser,
    ddim_timesteps,
    dpm_timesteps,
    get_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_latents,
)
from tests.model_fixtures import random_dit
from tests.numerics import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_exact_eps(ab, mu, s):
    """E[ε | x_t] for data x_0 ~ N(mu, s²): (√(1-ᾱ) (x - √ᾱ mu)) / (ᾱ s² + 1 - ᾱ)."""

    def eps_fn(x, t):
        a = ab[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return eps_fn


def test_timesteps_run_from_999_to_0():
    # the original truncates linspace(999, 0, 50) = 999, 978.6, 958.2, …: 999, 978, 958
    assert ddim_timesteps(50).tolist()[:3] == [999, 978, 958] and ddim_timesteps(50)[-1] == 0
    assert ddim_timesteps(20).tolist()[:4] == [999, 946, 893, 841]  # 946.42, 893.84, 841.26
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
    assert_close_to_scale(guided, e_neg + 4.0 * (e_cond - e_neg))


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
    assert_close_to_scale(together[:2], run([7]))  # a batch of 4 vs 2: other GEMM kernels
    assert_close_to_scale(together[2:], run([8]))
    with pytest.raises(ValueError, match="equal per-generator chunks"):
        sample_latents(model, tags[:1].repeat(3, 1), null[:1].repeat(3, 1), alpha_bar=ab, shape=(3, 4, 8, 8), steps=2,
                       generator=[torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("eta,steps", [(0.0, 200), (1.0, 500)])
def test_sampler_reproduces_a_gaussian_with_the_exact_denoiser(eta, steps):
    """Data x_0 ~ N(mu, s^2): E[eps | x_t] is known in closed form; samples must have mean mu, std s."""
    ab = cosine_alpha_bar(1000)
    mu, s = 0.7, 0.4
    exact_eps = gaussian_exact_eps(ab, mu, s)
    g = torch.Generator().manual_seed(0)
    a_T = ab[-1].item()  # start from the exact marginal q(x_T) (ᾱ_T = 0.001, not 0)
    x_T = a_T**0.5 * mu + (a_T * s**2 + 1 - a_T) ** 0.5 * torch.randn(10000, 1, 2, 2, generator=g)
    out = sample_ddim(exact_eps, x_T, ab, steps=steps, eta=eta, generator=g)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.015)
    assert math.isfinite(out.abs().max().item())


def test_dpm_timesteps_use_diffusers_linspace_spacing():
    assert dpm_timesteps(20).tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549,
                                          500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert dpm_timesteps(4, t_start=300).tolist() == [300, 225, 150, 75]
    assert ddim_timesteps(4, t_start=300).tolist() == [300, 200, 100, 0]
    with pytest.raises(ValueError, match="t_start"):
        dpm_timesteps(4, t_start=1000)


def test_dpmpp_2m_at_20_steps_is_closer_to_the_exact_ode_solution_than_ddim():
    """Data N(mu, s²): the probability-flow ODE maps x_T = √ᾱ_T mu + √(ᾱ_T s² + 1 - ᾱ_T) z to mu + s z."""
    ab = cosine_alpha_bar(1000)
    mu, s = 0.7, 0.4
    z = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a_T = ab[-1].item()
    x_T, exact = a_T**0.5 * mu + (a_T * s**2 + 1 - a_T) ** 0.5 * z, mu + s * z
    eps_fn = gaussian_exact_eps(ab, mu, s)
    err_dpm = (sample_dpmpp_2m(eps_fn, x_T, ab, steps=20) - exact).abs().max().item()
    err_ddim = (sample_ddim(eps_fn, x_T, ab, steps=20) - exact).abs().max().item()
    assert err_dpm < 0.05  # measured 0.045; DDIM: 0.142
    assert err_dpm < err_ddim / 2
    assert (sample_dpmpp_2m(eps_fn, x_T, ab, steps=50) - exact).abs().max().item() < err_dpm / 2  # converges


def test_dpmpp_2m_matches_diffusers_multistep_scheduler():
    diffusers = pytest.importorskip("diffusers")
    ab = cosine_alpha_bar(1000)
    eps_fn = gaussian_exact_eps(ab, 0.7, 0.4)
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])  # reproduces our ᾱ as ∏(1 - β)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=betas.numpy())
    sched.set_timesteps(20)
    x = x_T = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(eps_fn(x, t.expand(len(x))), t, x).prev_sample
    assert_close_to_scale(sample_dpmpp_2m(eps_fn, x_T, ab, steps=20), x)


def test_dpmpp_2m_through_cfg_is_deterministic_and_differs_from_ddim():
    model = random_dit()
    ab = make_alpha_bar("cosine", 1000)
    tags, null = torch.tensor([[2, 3, 4, 0, 0]] * 2), torch.tensor([[2, 0, 0, 0, 0]])

    def run(seed, sampler="dpmpp_2m"):
        return sample_latents(model, tags, null, alpha_bar=ab, shape=(2, 4, 8, 8), steps=6, sampler=sampler,
                              scale=3.0, generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert torch.equal(a, run(0))  # same kernels, same shapes: bit for bit
    assert not torch.allclose(a, run(1)) and not torch.allclose(a, run(0, "ddim"))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    direct = sample_dpmpp_2m(CFGDenoiser(model, tags, null, scale=3.0), x_T, ab, steps=6)
    assert_close_to_scale(a, direct)


def test_sampler_registry_rejects_unknown_names_and_stochastic_dpm():
    assert get_sampler("ddim") is sample_ddim and get_sampler("dpmpp_2m") is sample_dpmpp_2m
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="deterministic"):
        sample_dpmpp_2m(lambda x, t: x, torch.zeros(1, 1, 2, 2), cosine_alpha_bar(1000), steps=2, eta=1.0)
