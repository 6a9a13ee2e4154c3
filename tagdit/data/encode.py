"""The encode stage's work: image shards -> latent shards through a VAE, and the latent scale factor.

`encode_shard` turns one image shard into a latent shard with the same name and keys
(`tagdit.formats.latent_shards`), reusing the posteriors of samples whose image bytes the latent
shard it replaces was made from, and records what it was made from (`LatentSource`): posterior `mean.npy` / `logvar.npy` (float16, (z, h, w)), and
`flip_mean.npy` / `flip_logvar.npy` for the mirrored image when flipping; its images are decoded in
a thread pool ahead of batched encoding, and it is written atomically. `latent_stats` measures the
scale factor = 1 / std of posterior samples over the train split: Chan et al.'s parallel merge in
float64 of the moments each shard recorded when it was encoded (a fixed seed per shard name), so no
latent is read again and a grown dataset costs only its new shards. `loaded_vae` keeps one VAE per process. Planning the shards and stamping
the stage is `tasks.encode`. Preparing the DiT's training data from image shards is the data
library's kind of work (the VAE itself is `models.vae`), so this lives in `tagdit.data`, not in
`tagdit.train`, which trains models.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagdit.files import sha256_text
from tagdit.formats.image_shards import decode_image, image_bytes, iter_image_samples
from tagdit.formats.latent_shards import (
    LatentShardWriter,
    LatentSource,
    has_flip,
    iter_latent_samples,
    read_posterior,
)
from tagdit.store_folders import local_copy, present

log = logging.getLogger(__name__)

STATS_SEED = 0  # seed of the posterior samples behind the scale factor
STATS_CHUNK = 256  # latents per variance update


def image_batches(src: str | Path, resolution: int, batch_size: int, pool, ahead: int = 2,
                  skip: frozenset[str] = frozenset()) -> Iterator[tuple[list[dict], Any]]:
    """(raw samples, images (B, 3, R, R)) in shard order, keys in `skip` left out; `pool` decodes `ahead` batches early."""
    import torch

    def groups() -> Iterator[list[dict]]:
        group: list[dict] = []
        for raw in iter_image_samples(src):
            if raw["__key__"] in skip:
                continue
            group.append(raw)
            if len(group) == batch_size:
                yield group
                group = []
        if group:
            yield group

    pending: deque = deque()
    for group in groups():
        pending.append((group, [pool.submit(decode_image, image_bytes(r), resolution) for r in group]))
        if len(pending) > ahead:
            g, futures = pending.popleft()
            yield g, torch.stack([f.result() for f in futures])
    while pending:
        g, futures = pending.popleft()
        yield g, torch.stack([f.result() for f in futures])


def previous_posteriors(dst: Path) -> dict[str, tuple[str, tuple]]:
    """key -> (image sha256, posterior arrays) of the latent shard now at `dst`, as its `LatentSource` records."""
    record = LatentSource.load(dst)
    if record is None or not present(dst):
        return {}
    out = {}
    for raw in iter_latent_samples([local_copy(dst)]):  # a shard in the store only: downloaded, it is rewritten
        if (sha := record.images.get(raw["__key__"])) is not None:
            out[raw["__key__"]] = (sha, read_posterior(raw) + (read_posterior(raw, flipped=True) if has_flip(raw) else ()))
    return out


def encode_shard(model, src: str | Path, dst: Path, *, resolution: int, flip: bool, batch_size: int, device, pool,
                 image_shard_sha256: str = "") -> int:
    """Encode one image shard into `dst` (written atomically, then its `LatentSource`); returns the samples.

    Samples whose image bytes equal those of the latent shard already at `dst` keep its posteriors
    (the same VAE: the latents folder is that VAE's); only new or changed images are encoded.
    """
    import numpy as np
    import torch

    metas = [(raw["__key__"], raw["json"], hashlib.sha256(image_bytes(raw)).hexdigest())
             for raw in iter_image_samples(src)]
    previous = previous_posteriors(dst)
    posteriors = {k: previous[k][1] for k, _, sha in metas if k in previous and previous[k][0] == sha}
    with torch.inference_mode():
        for raws, x in image_batches(src, resolution, batch_size, pool, skip=frozenset(posteriors)):
            x = x.to(device)  # (B, 3, R, R)
            if flip:
                x = torch.cat([x, x.flip(-1)])  # (2B, 3, R, R): one encode for both
            mean, logvar = model.encode(x)  # (B or 2B, z, h, w); cache-sized chunks on a CPU
            mean = mean.float().cpu().numpy().astype(np.float16)
            logvar = logvar.float().cpu().numpy().astype(np.float16)
            for i, raw in enumerate(raws):
                j = len(raws) + i  # the mirrored image's row when flipping
                posteriors[raw["__key__"]] = (mean[i], logvar[i], *((mean[j], logvar[j]) if flip else ()))
    with LatentShardWriter(dst) as w:
        for key, meta, _ in metas:
            w.write(key, meta, *posteriors[key])
    moments = shard_moments((posteriors[k][:2] for k, _, _ in metas), shard_seed(dst.name))
    LatentSource(image_shard_sha256=image_shard_sha256, images={k: sha for k, _, sha in metas},
                 moments=moments).save(dst)
    return w.count


class RunningMoments:
    """Streaming mean and variance in float64 (Chan, Golub & LeVeque 1979 pairwise update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x) -> None:
        """Merge a batch of values (any shape) into the running moments."""
        x = x.double().flatten()
        if x.numel() == 0:
            return
        mean_b = float(x.mean())
        self.merge(x.numel(), mean_b, float((x - mean_b).pow(2).sum()))

    def merge(self, n_b: int, mean_b: float, m2_b: float) -> None:
        """Merge the moments (count, mean, sum of squared deviations) of another set of values."""
        if n_b == 0:
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5


def shard_seed(name: str, seed: int = STATS_SEED) -> int:
    """The posterior-sample seed of one latent shard: from its name, so independent of resume and of other shards."""
    return seed * 1_000_003 + int(sha256_text(name)[:8], 16)


def shard_moments(posteriors: Iterable[tuple], seed: int) -> dict[str, Any]:
    """Moments of one posterior sample z = mean + exp(logvar / 2)·eps per image of one shard (unflipped)."""
    import torch

    from models.vae import AutoencoderKL

    g = torch.Generator().manual_seed(seed)
    moments, images, shape, means, logvars = RunningMoments(), 0, None, [], []
    for p in itertools.chain(posteriors, [None]):  # None: flush
        if p is not None:
            means.append(torch.from_numpy(p[0]).float())
            logvars.append(torch.from_numpy(p[1]).float())
        if means and (p is None or len(means) == STATS_CHUNK):
            mean, logvar = torch.stack(means), torch.stack(logvars)  # (N, z, h, w)
            moments.update(AutoencoderKL.sample(mean, logvar, generator=g))
            images += len(means)
            shape = list(mean.shape[1:])
            means, logvars = [], []
    return {"seed": seed, "count": moments.count, "mean": moments.mean, "m2": moments.m2, "images": images,
            "shape": shape}


def recorded_moments(path: Path, seed: int) -> dict[str, Any] | None:
    """The moments the encode stage recorded beside latent shard `path` with this seed, or None."""
    record = LatentSource.load(path)
    m = record.moments if record is not None else None
    return m if m and m.get("seed") == seed else None


def latent_stats(shards: Iterable[Path], seed: int = STATS_SEED) -> dict[str, Any]:
    """Scale factor = 1 / std of one posterior sample per image: the exact merge (Chan et al.) of each
    shard's moments, equal to one pass over every latent to float64 rounding.

    A shard's moments come from the `LatentSource` the encode stage wrote beside it with this seed:
    with every record present no latent is read, so a grown dataset costs only its new shards. A
    shard without one (encoded before moments were recorded) is measured here, and the log says so.
    """
    total, images, shape = RunningMoments(), 0, None
    for path in shards:
        s = shard_seed(path.name, seed)
        if (m := recorded_moments(path, s)) is None:
            log.info("scale factor: %s has no recorded moments (seed %d): measuring its latents", path.name, s)
            m = shard_moments((read_posterior(raw) for raw in iter_latent_samples([path])), s)
        total.merge(m["count"], m["mean"], m["m2"])
        images += m["images"]
        shape = m["shape"] or shape
    if total.count == 0:
        raise ValueError("no training latents to measure the scale factor on")
    return {"scale_factor": 1.0 / total.std, "mean": total.mean, "std": total.std,
            "count": images, "values": total.count, "latent_shape": shape}


@dataclass(frozen=True)
class EncodeParams:
    """What an encode worker needs besides the shard: the VAE, where it runs, the settings."""

    vae_ckpt: Path
    use_ema: bool
    weights_sha: str  # part of the loaded-model key: a rewritten checkpoint is loaded again
    device: str  # where a process without a device of its own encodes: vae.train.device (auto, cpu, cuda)
    resolution: int
    flip: bool
    batch_size: int


def encode_shard_on(device: str | None, src: str | Path, dst: Path, p: EncodeParams, image_shard_sha256: str = "") -> int:
    """`encode_shard` with this process's VAE on `device` (a device worker's; None: `p.device`); returns the samples."""
    from concurrent.futures import ThreadPoolExecutor

    from tagdit.devices import unit_threads

    model, torch_device = loaded_vae(p, device)
    with ThreadPoolExecutor(unit_threads(device) or max(1, min(4, os.cpu_count() or 1))) as pool:
        return encode_shard(model, src, dst, resolution=p.resolution, flip=p.flip, batch_size=p.batch_size,
                            device=torch_device, pool=pool, image_shard_sha256=image_shard_sha256)


_VAES: dict[tuple, tuple[Any, Any]] = {}  # this process's loaded VAE and its device


def loaded_vae(p: EncodeParams, device: str | None = None) -> tuple[Any, Any]:
    """(VAE on `device`, the torch device), loaded once per process; None = `p.device` (auto/cpu/cuda)."""
    from tagdit.devices import configure_backends, unit_device
    from tagdit.formats.trained_models import load_vae

    key = (str(p.vae_ckpt), p.use_ema, p.weights_sha, p.device, device)
    if key not in _VAES:
        _VAES.clear()  # one model at a time
        device = unit_device(device, p.device)
        configure_backends(device)
        model, _ = load_vae(p.vae_ckpt, ema=p.use_ema)
        _VAES[key] = (model.to(device), device)
    return _VAES[key]


def forget_vaes() -> None:
    """Drop this process's loaded VAE."""
    _VAES.clear()
