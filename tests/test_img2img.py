import pytest
import torch

from models.diffusion import cosine_alpha_bar
from models.sampling import img2img_latents, sample_ddim, sample_dpmpp_2m, sample_latents
from tests.model_fixtures import random_dit

AB = cosine_alpha_bar(1000)
TAGS, NULL = torch.tensor([[2, 3, 4, 0, 0]] * 2), torch.tensor([[2, 0, 0, 0, 0]])

pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianDenoiser(torch.nn.Module):
    """A stand-in DiT whose ε is exact for data x_0 ~ N(mu, s²), whatever the tags (records each t)."""

    def __init__(self, mu: float = 0.7, s: float = 0.4):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.mu, self.s, self.seen = mu, s, []

    def encode_tags(self, tags):
        return torch.zeros(len(tags), 1)

    def forward_with_cond(self, x, t, y):
        self.seen.append(int(t[0]))
        a = AB[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def test_strength_0_returns_the_latents_unchanged():
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = img2img_latents(random_dit(), z0, TAGS, NULL, strength=0.0, alpha_bar=AB, steps=10)
    assert torch.equal(out, z0)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_strength_1_is_text_to_image_for_the_same_seed(sampler, eta):
    model = random_dit()
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(alpha_bar=AB, steps=6, sampler=sampler, eta=eta, scale=3.0)
    t2i = sample_latents(model, TAGS, NULL, shape=(2, 4, 8, 8), generator=torch.Generator().manual_seed(3), **kw)
    i2i = img2img_latents(model, z0, TAGS, NULL, strength=1.0, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(t2i, i2i)


@pytest.mark.parametrize("sampler,first", [(sample_ddim, 300), (sample_dpmpp_2m, 300)])
def test_samplers_started_at_t_start_visit_only_later_steps(sampler, first):
    seen = []

    def eps_fn(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    sampler(eps_fn, torch.zeros(1, 1, 2, 2), AB, steps=5, t_start=first)
    assert seen[0] == first and max(seen) == first and len(seen) == 5 and seen == sorted(seen, reverse=True)


def test_img2img_starts_where_the_original_does_and_runs_all_steps_unless_shortened():
    z0 = torch.full((2, 1, 2, 2), 3.0)  # far outside N(0.7, 0.4²)
    kw = dict(alpha_bar=AB, steps=20, scale=1.0)
    model = GaussianDenoiser()
    img2img_latents(model, z0, TAGS, NULL, strength=0.35, generator=torch.Generator().manual_seed(0), **kw)
    assert model.seen[0] == 349 and len(model.seen) == 20  # as.integer(0.35·1000 - 1), all 20 steps
    assert model.seen == [349 * (19 - i) // 19 for i in range(20)]  # linspace(349, 0, 20), truncated
    short = GaussianDenoiser()
    img2img_latents(short, z0, TAGS, NULL, strength=0.35, shorten=True, generator=torch.Generator().manual_seed(0),
                    **kw)
    assert short.seen[0] == 349 and len(short.seen) == 7  # ⌈0.35·20⌉
    tiny = GaussianDenoiser()
    img2img_latents(tiny, z0, TAGS, NULL, strength=0.005, generator=torch.Generator().manual_seed(0), **kw)
    assert tiny.seen == [4, 3, 2, 1, 0]  # t0 = 4: at most one step per timestep


def test_img2img_moves_further_from_the_input_as_strength_grows():
    z0 = torch.full((64, 1, 2, 2), 3.0)  # far outside N(0.7, 0.4²)

    def dist(strength, sampler):
        out = img2img_latents(GaussianDenoiser(), z0, TAGS[:1], NULL, strength=strength, alpha_bar=AB, steps=20,
                              sampler=sampler, scale=1.0, generator=torch.Generator().manual_seed(0))
        return (out - z0).abs().mean().item()

    for sampler in ("ddim", "dpmpp_2m"):
        d = [dist(s, sampler) for s in (0.05, 0.3, 0.6, 1.0)]
        assert d[0] < 0.25 and d == sorted(d) and d[-1] > 2.0, (sampler, d)  # measured 0.16 … 2.30: S = 1 lands near 0.7
