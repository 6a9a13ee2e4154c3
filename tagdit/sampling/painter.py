"""A trained run, ready to draw: DiT checkpoint + VAE + vocabulary + latent statistics.

The evaluation stage, the sample CLI, the sampling page and anything else that turns tag prompts
into images load a run through `load_painter` (explicit files) or `painter_for_run` (a run's
finished records), then call `draw` (prompts x seeds), `sample`, `img2img` or `interpolate`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from tagdit.config import PipelineConfig, SamplerConfig
from tagdit.formats.latent_shards import LatentStats

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 4096  # init images: larger ones are refused before their pixels are decoded

if TYPE_CHECKING:
    from models.sampling import StepCallback


def to_pil(x: Any) -> list[Image.Image]:
    """Images (B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def read_image(data: bytes, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """Encoded image bytes -> a decoded PIL image; ValueError for anything unreadable or too large.

    The size is checked from the header, before any pixel is decoded, so a decompression bomb never
    expands; Pillow's own pixel limit stays on as a second guard."""
    too_large = f"at most {max_side}x{max_side} is accepted"
    try:
        img = Image.open(io.BytesIO(data))
        if max(img.size) > max_side:
            raise ValueError(f"image is {img.width}x{img.height}; {too_large}")
        img.load()
    except Image.DecompressionBombError as e:  # Pillow refuses at open() past twice its pixel limit
        raise ValueError(f"image is too large ({e}); {too_large}") from None
    except (OSError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    return img


@dataclass
class Painter:
    """Everything needed to turn tag lists into images; `checkpoint` names the DiT weights used."""

    dit: Any
    vae: Any
    vocab: Any
    stats: LatentStats  # latent shape and scale factor
    device: Any
    checkpoint: Path

    @property
    def max_tags(self) -> int:
        return self.dit.cfg.max_tags

    @property
    def resolution(self) -> int:
        """Side of the square images the VAE decodes the DiT's latents to (the dataset's crops)."""
        return self.stats.latent_shape[-1] * self.vae.downsample_factor

    def ids(self, tags: list[str]) -> Any:
        """(1, max_tags + 1) token ids of a tag list."""
        import torch

        return torch.tensor([self.vocab.encode(tags, self.max_tags)], dtype=torch.long)

    def parse(self, prompt: str) -> tuple[Any, list[str]]:
        """"blue hair, smile" -> its token ids (1, max_tags + 1) and the tags the vocabulary does not
        know, which are encoded as <unk> (as in training), never silently dropped."""
        known, unknown = self.vocab.parse_prompt(prompt)
        if len(known) + len(unknown) > self.max_tags:
            log.warning("prompt %r has %d tags; the model reads the first %d", prompt, len(known) + len(unknown),
                        self.max_tags)
        return self.ids(known + unknown), unknown

    def generator(self, seed: int) -> Any:
        """A torch generator on the painter's device: a seed means the same noise as in `sample`."""
        import torch

        return torch.Generator(device=self.device).manual_seed(seed)

    def generators(self, seed: int | list[int], n: int) -> Any:
        """Noise for n images: an int draws all of it from one generator (the sample CLI's way); a list
        of n seeds gives each image its own, so image i is `sample(…, seeds[i], n=1)` alone."""
        if isinstance(seed, int):
            return self.generator(seed)
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for {n} images")
        return [self.generator(s) for s in seed]

    def encode_image(self, image: Image.Image) -> Any:
        """Any image -> scaled latent (1, C, h, w): centre crop at the dataset's resolution, saved and
        decoded as the crop and encode stages do, VAE posterior mean, scaled for the DiT."""
        import torch

        from tagdit.formats.image_shards import decode_image
        from tagdit.formats.wd_image import centre_crop

        buf = io.BytesIO()
        centre_crop(image, self.resolution).save(buf, "PNG")
        x = decode_image(buf.getvalue(), self.resolution)[None].to(self.device)  # (1, 3, R, R) in [-1, 1]
        with torch.no_grad():
            mean, _ = self.vae.encode(x)  # (1, C, h, w)
        return self.stats.to_model(mean.float())

    def decode(self, z: Any) -> list[Image.Image]:
        """Scaled latents (B, C, h, w) -> images."""
        return to_pil(self.vae.decode(self.stats.to_vae(z.float())))

    def draw(self, conds: list[list[str]], negs: list[list[str]], sampler: SamplerConfig,
             cfg_scale: float, seeds: int | list[int], callback: StepCallback | None = None) -> list[Image.Image]:
        """One image per (cond, neg) row and seed, seed-major (all rows of the first seed, then the
        next), in one batch; each seed's noise is what sampling its rows alone would draw.
        `callback(i, n)` hears of each sampler step and may raise to stop (models.sampling)."""
        import torch

        from models.sampling import sample_latents
        from tagdit.devices import autocast

        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        tags = torch.cat([self.ids(c) for c in conds]).repeat(len(seeds), 1)  # (S·B, L)
        neg = torch.cat([self.ids(n) for n in negs]).repeat(len(seeds), 1)
        noise = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        with autocast(self.device):
            z = sample_latents(self.dit, tags, neg, alpha_bar=self.dit.alpha_bar,
                               shape=(len(tags), *self.stats.latent_shape), steps=sampler.steps,
                               eta=sampler.eta, scale=cfg_scale, generator=noise, sampler=sampler.sampler,
                               callback=callback)
            return self.decode(z)

    def sample(self, cond: Any, neg: Any, sampler: SamplerConfig, cfg_scale: float, seed: int | list[int],
               n: int, callback: StepCallback | None = None) -> list[Image.Image]:
        """`n` images for one prompt (ids (1, L)), their noise from `seed` (see `generators`)."""
        import torch

        from models.sampling import sample_latents
        from tagdit.devices import autocast

        with torch.no_grad(), autocast(self.device):
            z = sample_latents(self.dit, cond, neg, alpha_bar=self.dit.alpha_bar, shape=(n, *self.stats.latent_shape),
                               steps=sampler.steps, eta=sampler.eta, scale=cfg_scale, generator=self.generators(seed, n),
                               sampler=sampler.sampler, progress=n * sampler.steps >= 200, callback=callback)
            return self.decode(z)

    def img2img(self, image: Image.Image, cond: Any, neg: Any, sampler: SamplerConfig, cfg_scale: float,
                strength: float, seed: int | list[int], n: int, shorten: bool = False,
                callback: StepCallback | None = None) -> list[Image.Image]:
        """`n` variations of `image` for one prompt (SDEdit): strength 0 returns the VAE round trip of
        its crop, 1 is exactly `sample` with the same seed. All `sampler.steps` run over the noised
        range, as the original; `shorten` runs ⌈strength·steps⌉ (see `img2img_latents`)."""
        import torch

        from models.sampling import img2img_latents
        from tagdit.devices import autocast

        z0 = self.encode_image(image).repeat(n, 1, 1, 1)  # (n, C, h, w)
        with torch.no_grad(), autocast(self.device):
            z = img2img_latents(self.dit, z0, cond, neg, strength=strength, alpha_bar=self.dit.alpha_bar,
                                steps=sampler.steps, sampler=sampler.sampler, eta=sampler.eta, scale=cfg_scale,
                                generator=self.generators(seed, n), progress=n * sampler.steps >= 200,
                                shorten=shorten, callback=callback)
            return self.decode(z)

    def interpolate(self, cond_a: Any, cond_b: Any, neg: Any, sampler: SamplerConfig, cfg_scale: float,
                    seeds: tuple[int, int], frames: int, callback: StepCallback | None = None) -> list[Image.Image]:
        """`frames` images from (prompt a, seeds[0]) to (prompt b, seeds[1]): noise slerped, tag
        embeddings blended linearly; the end frames are `sample(…, seed, n=1)` of each end.

        The same recipe as models.interpolate.interpolation_latents, with each seed's noise drawn on
        the painter's device so the end frames match `sample` on a GPU too."""
        import torch

        from models.interpolate import blend_embeddings, frame_weights, slerp
        from models.sampling import encode_prompts, sample_from_embeddings
        from tagdit.devices import autocast

        if sampler.eta != 0:
            raise ValueError("interpolation needs a deterministic sampler (eta = 0): fresh noise would differ per frame")
        w = frame_weights(frames)
        a, b = (torch.randn((1, *self.stats.latent_shape), generator=self.generator(s), device=self.device)
                for s in seeds)
        x_T = torch.cat([slerp(a, b, float(t)) for t in w])  # (frames, C, h, w)
        with torch.no_grad(), autocast(self.device):
            y_a, y_neg = encode_prompts(self.dit, cond_a, neg)  # (1, W) each
            y_b, _ = encode_prompts(self.dit, cond_b, neg)
            z = sample_from_embeddings(self.dit, x_T, blend_embeddings(y_a, y_b, w), y_neg,
                                       alpha_bar=self.dit.alpha_bar, steps=sampler.steps, sampler=sampler.sampler,
                                       scale=cfg_scale, progress=frames * sampler.steps >= 200, callback=callback)
            return self.decode(z)


def load_painter(cfg: PipelineConfig, checkpoint: str | Path, vae_checkpoint: str | Path,
                 latents_dir: str | Path) -> Painter:
    """A painter from explicit files; the DiT's noise schedule comes from its checkpoint, its scale factor
    from its run (`LatentStats.of_run`)."""
    from tagdit.data.vocab import Vocab
    from tagdit.devices import select_device
    from tagdit.formats.checkpoints import resolve_checkpoint
    from tagdit.formats.trained_models import load_dit, load_vae

    device = select_device(cfg.evaluate.device)
    ckpt = resolve_checkpoint(checkpoint)
    vocab_path = Vocab.of_run(ckpt.parent, cfg.dataset_dir / "vocab.json")
    vocab = Vocab.load(vocab_path)
    dit = load_dit(ckpt, map_location=device, schedule=cfg.dit.schedule, timesteps=cfg.dit.timesteps)  # fallback only
    if dit.vocab_size != len(vocab):
        raise ValueError(f"{ckpt} was trained with {dit.vocab_size} tokens, {vocab_path} has {len(vocab)}")
    vae, _ = load_vae(Path(vae_checkpoint))
    return Painter(dit=dit, vae=vae.to(device).eval(), vocab=vocab, stats=LatentStats.of_run(ckpt.parent, latents_dir),
                   device=device, checkpoint=ckpt)
