import pytest
import torch

from models.diffusion import cosine_alpha_bar
from models.interpolate import (
    blend_embeddings,
    interpolation_latents,
    seed_noise,
    slerp,
    slerp_noise,
)
from models.sampling import encode_prompts, sample_latents
from tests.model_fixtures import random_dit
from tests.numerics import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slerp_endpoints_are_the_inputs():
    a, b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)), seed_noise(1, (4, 8, 8))
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)


def test_slerp_keeps_unit_norm_between_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    for t in (0.1, 0.25, 0.5, 0.9):
        out = slerp(a, b, t)
        assert out.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.atan2(out[1], out[0]).item() == pytest.approx(t * torch.pi / 2, abs=1e-6)  # constant speed
    assert (0.5 * a + 0.5 * b).norm().item() == pytest.approx(2**-0.5)  # what lerp would give


def test_slerp_midpoint_is_symmetric():
    a, b = seed_noise(0, (64,)), seed_noise(1, (64,))
    a, b = a / a.norm(), b / b.norm()  # equal norms: the midpoint bisects the angle
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, slerp(b, a, 0.5), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity
    assert cos(mid, a, dim=0).item() == pytest.approx(cos(mid, b, dim=0).item(), abs=1e-6)


def test_slerp_of_near_parallel_vectors_is_finite():
    a = torch.tensor([1.0, 2.0, 3.0])
    for b in (a.clone(), a * (1 + 1e-7), a + 1e-8):
        out = slerp(a, b, 0.3)
        assert torch.isfinite(out).all() and torch.allclose(out, a, atol=1e-6)


def test_slerp_noise_runs_from_one_seed_to_the_other():
    frames = slerp_noise(3, 4, 5, (4, 8, 8))
    assert frames.shape == (5, 4, 8, 8)
    assert torch.equal(frames[0], seed_noise(3, (4, 8, 8))) and torch.allclose(frames[-1], seed_noise(4, (4, 8, 8)))
    assert torch.equal(seed_noise(3, (4, 8, 8))[None], torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_blended_embedding_endpoints_are_the_prompts():
    y_a, y_b = torch.randn(1, 16), torch.randn(1, 16)
    y = blend_embeddings(y_a, y_b, [0.0, 0.5, 1.0])
    assert y.shape == (3, 16) and y.dtype == y_a.dtype
    assert torch.equal(y[0], y_a[0]) and torch.equal(y[2], y_b[0])
    assert torch.allclose(y[1], (y_a[0] + y_b[0]) / 2)


def test_interpolation_end_frames_are_the_two_prompts_samples():
    model = random_dit()
    ab = cosine_alpha_bar(1000)
    tags_a, tags_b, null = torch.tensor([2, 3, 4, 0, 0]), torch.tensor([2, 5, 6, 7, 0]), torch.tensor([2, 0, 0, 0, 0])
    frames = interpolation_latents(model, tags_a, tags_b, null, seeds=(0, 1), frames=3, latent_shape=(4, 8, 8),
                                   alpha_bar=ab, steps=4, sampler="dpmpp_2m", scale=3.0)
    for frame, tags, seed in ((frames[0], tags_a, 0), (frames[-1], tags_b, 1)):
        ref = sample_latents(model, tags[None], null[None], alpha_bar=ab, shape=(1, 4, 8, 8), steps=4,
                             sampler="dpmpp_2m", scale=3.0, generator=torch.Generator().manual_seed(seed))
        assert_close_to_scale(frame, ref[0])  # batch of 3 vs batch of 1: other GEMM kernels
    y_a, _ = encode_prompts(model, tags_a[None], null[None])
    assert not torch.allclose(frames[1], frames[0], atol=1e-2) and y_a.shape == (1, 32)
