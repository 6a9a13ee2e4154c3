"""Training the KL-VAE: image shards -> VAE checkpoints (raw + EMA).

Loss `models.vae_loss` (`w_l1·L1 + w_perc·VGG19 perceptual + w_kl·KL`, every term a mean; from
`vae.disc_start` also a PatchGAN hinge term, its discriminator updated after each step), trained
with `tagdit.train.loop.fit` on a resumable `EpochStream` of the image shards with a random
horizontal flip (and an optional crop) seeded per sample. Validation: PSNR of the EMA model's
reconstructions (from the posterior mean) on the val shards, plus a few reconstructions in TensorBoard.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagdit.config import PipelineConfig, VAEConfig
from tagdit.data.metrics import psnr
from tagdit.formats.image_shards import ShardIndex, decode_image, image_bytes, shard_sources

if TYPE_CHECKING:
    from tagdit.train.ranks import Rank

log = logging.getLogger(__name__)

VAL_LIMIT = 512  # validation images kept in memory (uint8) for PSNR
VAL_SHOW = 8  # reconstructions written to TensorBoard


def decode_train(raw: dict[str, Any], resolution: int, crop: int | None = None, f: int = 1):
    """Training example: the image with a horizontal flip (and a `crop`-pixel square at a multiple of
    f, when given) drawn from the sample's own seed."""
    rng = random.Random(raw.get("__seed__", 0))
    x = decode_image(image_bytes(raw), resolution, rng.random() < 0.5)  # (3, R, R)
    if crop is None or crop >= resolution:
        return x
    i, j = (rng.randrange((resolution - crop) // f + 1) * f for _ in range(2))
    return x[:, i : i + crop, j : j + crop].contiguous()  # (3, crop, crop)


def build_perceptual_loss(vae: VAEConfig) -> Any:
    """The VGG19 `vae.perceptual_network` names: torchvision's, Keras' (the original's), or auto (Keras' if found)."""
    from models.perceptual import VGGWeightsMissing, build_keras_perceptual, build_perceptual

    if vae.perceptual_network != "torchvision":
        try:
            loss = build_keras_perceptual(vae.keras_vgg_weights, vae.keras_vgg_repo)
            log.info("perceptual loss: Keras' VGG19 (Caffe weights, BGR 0-255 input), as the original")
            return loss
        except VGGWeightsMissing as e:
            if vae.perceptual_network == "keras":
                raise
            log.warning("vae.perceptual_network=auto: %s\nFalling back to torchvision's VGG19 (ImageNet "
                        "mean/std RGB input): a different network at a different feature scale than the "
                        "original's", e)
    return build_perceptual(vae.vgg_weights, vae.vgg_repo, vae.vgg_revision)


def perceptual_identity(vae: VAEConfig) -> dict[str, str]:
    """Which VGG19 `auto` resolves to (and Keras' file hash): part of the train-vae key and run identity,
    so a run that fell back to torchvision's network never resumes with Keras' once its file appears."""
    from models.perceptual import VGGWeightsMissing, find_keras_vgg19_weights
    from tagdit.files import file_fingerprint

    if vae.w_perc == 0 or vae.perceptual_network == "torchvision":
        return {}
    try:
        return {"perceptual": f"keras:{file_fingerprint(find_keras_vgg19_weights(vae.keras_vgg_weights, vae.keras_vgg_repo))}"}
    except VGGWeightsMissing:
        if vae.perceptual_network == "keras":
            raise
        return {"perceptual": "torchvision (auto: Keras' weights not found)"}


def build_vae_loss(vae: VAEConfig) -> Any:
    """The loss `vae` describes: VGG19 weights resolved when w_perc > 0, a PatchGAN when disc_start is set."""
    from models.discriminator import PatchDiscriminator
    from models.vae_loss import VAELoss

    perceptual = build_perceptual_loss(vae) if vae.w_perc > 0 else None
    if perceptual is None:
        log.warning("perceptual loss is OFF (vae.w_perc=0): training with L1 + KL only")
    disc = None
    if vae.disc_start is not None:
        disc = PatchDiscriminator(vae.disc_channels, vae.disc_layers)
    return VAELoss(vae.w_l1, vae.w_perc, vae.w_kl, perceptual=perceptual, discriminator=disc,
                   w_disc=vae.w_disc, disc_start=vae.disc_start)


def vae_loss(model, x, step: int, *, criterion, last_layer=None, stash: dict | None = None):
    """The VAE objective (`models.vae_loss.VAELoss`) on one batch x (B, 3, H, W) in [-1, 1].

    `stash["recon"]` keeps the detached reconstruction for the discriminator step that follows.
    """
    recon, mean, logvar = model(x)  # (B, 3, H, W), (B, z, h, w) x2
    if stash is not None:
        stash["recon"] = recon.detach()
    return criterion(x, recon, mean, logvar, step, last_layer=last_layer)


def discriminator_step(criterion, r: Rank, lr: float, stash: dict):
    """(extra, after_step) for `fit`: the PatchGAN, its AdamW (β 0.5/0.9, taming-transformers) and its update.

    `after_step(x, step)` trains D on x and the generator step's stashed reconstruction, on the
    same steps the generator's GAN term is on (`step` counts steps taken, so the generator's was step − 1).
    Under DDP the update runs through a DDP wrapper sharing D's parameters, so every rank's D stays equal.
    """
    import torch

    disc = criterion.discriminator
    d_opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    ddp_disc = None
    if r.world > 1:
        ddp_disc = torch.nn.parallel.DistributedDataParallel(
            disc, device_ids=[r.device.index] if r.device.type == "cuda" else None)

    def after_step(x, step: int) -> dict[str, Any]:
        if not criterion.disc_active(step - 1):
            return {}
        d_loss, logs = criterion.discriminator_loss(x, stash.pop("recon"), disc=ddp_disc)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        return logs

    return {"disc": disc, "d_opt": d_opt}, after_step


def load_val_images(dataset_dir: Path, resolution: int, limit: int = VAL_LIMIT, cache: bool = False):
    """Up to `limit` validation images as a uint8 tensor (N, 3, R, R) (empty if there are none), in shard
    order; read from the store when streamed (`cache`: kept here)."""
    import torch

    from tagdit.train.tar_samples import tar_samples

    urls = shard_sources(Path(dataset_dir) / "images", "val", cache)
    raws = itertools.islice(itertools.chain.from_iterable(tar_samples(u) for u in urls), limit)
    xs = [((decode_image(image_bytes(raw), resolution) + 1) * 127.5).round().to(torch.uint8) for raw in raws]
    return torch.stack(xs) if xs else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)


def make_val_fn(val_images, batch_size: int, device):
    """val_fn for `fit`: mean PSNR of EMA reconstructions (posterior mean) + a TensorBoard image."""
    import torch

    def val_fn(ema_model, step: int, writer) -> dict[str, float]:
        scores, shown = [], None
        for i in range(0, len(val_images), batch_size):
            x = val_images[i : i + batch_size].to(device).float() / 127.5 - 1.0  # (B, 3, H, W)
            recon, _, _ = ema_model(x, sample=False)
            recon = recon.float().clamp(-1, 1)
            scores.append(psnr(recon, x).cpu())
            if shown is None:
                shown = torch.cat([x[:VAL_SHOW], recon[:VAL_SHOW]]).cpu()  # originals, then reconstructions
        if writer is not None and shown is not None:
            writer.add_images("val/reconstructions", (shown + 1) / 2, step)
        return {"val_psnr": float(torch.cat(scores).mean())}

    return val_fn


def vae_checkpoint_bytes(cfg: PipelineConfig) -> int:
    """One checkpoint's size (VAE + EMA + moments, and a PatchGAN's weights + moments when on), on the meta device."""
    import torch

    from models.discriminator import PatchDiscriminator
    from models.vae import build_vae
    from tagdit.train.disk import state_bytes

    with torch.device("meta"):
        modules = [build_vae(cfg.vae.model)]
        if cfg.vae.disc_start is not None:
            modules.append(PatchDiscriminator(cfg.vae.disc_channels, cfg.vae.disc_layers))
        return state_bytes(*modules)


def image_shard_counter(dataset_dir: Path) -> Callable[[str], int]:
    """A shard's number of samples: from `images/shards.json` (the shard stage records it), else from its
    tar headers (a streamed shard is then read once just to count it)."""
    from tagdit.train.tar_samples import tar_sample_count

    recorded = ShardIndex(Path(dataset_dir) / "images").samples()
    return lambda url: recorded.get(url.rsplit("/", 1)[-1]) or tar_sample_count(url)


def train_vae(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path):
    """Train in this process: alone, or as one rank under torchrun. Returns fit's TrainResult."""
    from models.vae import build_vae
    from tagdit.formats.checkpoints import count_parameters
    from tagdit.train.loop import fit
    from tagdit.train.ranks import epoch_stream, start_rank

    tc, res = cfg.vae.train, cfg.data.resolution
    r = start_rank(tc, "vae")
    cache = cfg.data.shard_cache == "local"
    urls = shard_sources(Path(dataset_dir) / "images", "train", cache)
    if not urls:
        raise FileNotFoundError(f"no training shards under {dataset_dir}/images: run prepare-data first")
    model = build_vae(cfg.vae.model)
    if r.is_main:
        log.info("VAE: %.2fM parameters, f=%d, z=%d", count_parameters(model) / 1e6,
                 model.downsample_factor, cfg.vae.model.z_channels)
    criterion = build_vae_loss(cfg.vae).to(r.device)
    stash: dict[str, Any] = {}
    extra, after_step = {}, None
    if criterion.discriminator is not None:
        extra, after_step = discriminator_step(criterion, r, tc.lr, stash)
    val_fn = None
    if r.is_main:
        val_images = load_val_images(dataset_dir, res, cache=cache)
        if len(val_images):
            val_fn = make_val_fn(val_images, tc.batch_size, r.device)
        else:
            log.warning("no validation shards in %s: validation PSNR is off", dataset_dir)
    loss_fn = partial(vae_loss, criterion=criterion, last_layer=model.last_layer,
                      stash=stash if after_step is not None else None)
    decode = partial(decode_train, resolution=res, crop=cfg.vae.train_crop, f=model.downsample_factor)
    return fit(model=model, loss_fn=loss_fn, stream=epoch_stream(urls, decode, tc, r, image_shard_counter(dataset_dir)),
               cfg=tc, out_dir=out_dir, model_config=cfg.vae.model.model_dump(mode="json"), device=r.device,
               val_fn=val_fn, extra=extra, after_step=after_step, desc="train-vae")
