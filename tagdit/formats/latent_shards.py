"""Latent shards: `<dataset>/latents-<vae_id>/{train,val}-UUUUU-PP.tar` + `stats.json`, written by encode.

Each latent shard is named as the image shard it was made from, and its `<name>.source.json`
(`LatentSource`) records that image shard's sha256 and each sample's image sha256: a latent shard
whose image shard changed is encoded again, reusing the posteriors of samples whose image did not.

A sample has the image shard's key and `json`, the VAE posterior as float16 `.npy` arrays
(z, h, w) `mean.npy` / `logvar.npy`, and `flip_mean.npy` / `flip_logvar.npy` for the mirrored
image when encoded with flips. `stats.json` (`LatentStats`) holds the latent scale factor: the DiT
works on `to_model(z)` = scale · z, and the VAE decodes `to_vae(z)` = z / scale. A DiT run keeps a
copy in its folder (`LatentStats.of_run`): the factor it started with, whatever the latents measure later.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tagdit.files import atomic_path, write_json_atomic
from tagdit.formats.image_shards import shards_in

STATS_FILE = "stats.json"
FLIP = "flip_"  # member prefix of the mirrored image's posterior


def latent_shard_paths(latents_dir: Path, split: str) -> list[Path]:
    """The latent shards of one split, in order (named as the image shards they were made from)."""
    return shards_in(latents_dir, split)


def npy_bytes(a) -> bytes:
    """A numpy array as .npy file bytes."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[Any, tuple[int, ...]]] = {}  # .npy header bytes -> (dtype, shape)


def read_npy(raw: bytes):
    """`.npy` bytes -> array; each distinct header is parsed once (np.load's header parsing dominates)."""
    import numpy as np

    size = 10 + int.from_bytes(raw[8:10], "little") if raw[6] == 1 else 12 + int.from_bytes(raw[8:12], "little")
    head = raw[:size]
    if head not in _NPY_HEADERS:
        f = io.BytesIO(raw)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return np.load(io.BytesIO(raw))
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or dtype.hasobject or len(_NPY_HEADERS) > 64:
            return np.load(io.BytesIO(raw))
        _NPY_HEADERS[head] = (dtype, shape)
    dtype, shape = _NPY_HEADERS[head]
    return np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=size).reshape(shape).copy()


def latent_shard_name(split: str, index: int) -> str:
    """`train-000003.tar`: the name of a split's shard `index`."""
    return f"{split}-{index:06d}.tar"


def _latent_sample(key: str, meta: bytes, mean, logvar, flip_mean=None, flip_logvar=None) -> dict[str, Any]:
    """One shard sample from (z, h, w) posterior arrays (stored as float16); flips when given."""
    import numpy as np

    def fp16(a) -> bytes:
        return npy_bytes(np.asarray(a, dtype=np.float16))

    sample = {"__key__": key, "mean.npy": fp16(mean), "logvar.npy": fp16(logvar), "json": meta}
    if flip_mean is not None:
        sample[FLIP + "mean.npy"], sample[FLIP + "logvar.npy"] = fp16(flip_mean), fp16(flip_logvar)
    return sample


class LatentShardWriter:
    """Writes one latent shard: a temporary file renamed into place on a clean exit, fixed mtimes
    (the same posteriors give the same bytes).

        with LatentShardWriter(dst) as w:
            w.write(key, meta_json_bytes, mean, logvar[, flip_mean, flip_logvar])
    """

    def __init__(self, dst: str | Path):
        self.dst = Path(dst)

    def __enter__(self) -> LatentShardWriter:
        import webdataset as wds

        self._atomic = atomic_path(self.dst)
        tmp = self._atomic.__enter__()
        self._tar = wds.TarWriter(str(tmp), mtime=0)
        self.count = 0
        return self

    def write(self, key: str, meta: bytes, mean, logvar, flip_mean=None, flip_logvar=None) -> None:
        self._tar.write(_latent_sample(key, meta, mean, logvar, flip_mean, flip_logvar))
        self.count += 1

    def __exit__(self, *exc) -> None:
        self._tar.close()
        self._atomic.__exit__(*exc)


def iter_latent_samples(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Raw samples of latent shards in order (read them with `read_posterior`, `read_meta`)."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples({"url": str(p)} for p in paths)


def read_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample's json (the image shard's: tags, scores, source)."""
    return json.loads(raw["json"])


def has_flip(raw: dict[str, Any]) -> bool:
    """Whether a raw sample stores the mirrored image's posterior."""
    return FLIP + "mean.npy" in raw


def read_posterior(raw: dict[str, Any], flipped: bool = False):
    """(mean, logvar) float16 arrays (z, h, w) of a raw sample, or of its mirrored image."""
    prefix = FLIP if flipped else ""
    return read_npy(raw[prefix + "mean.npy"]), read_npy(raw[prefix + "logvar.npy"])


class LatentSource(BaseModel):
    """`<shard>.source.json`: what a latent shard was made from (written after the shard, so never ahead of it)."""

    image_shard_sha256: str
    images: dict[str, str]  # sample key -> sha256 of its encoded image bytes
    moments: dict[str, Any] | None = None  # its posterior samples' moments for the scale factor (tagdit.data.encode)

    @staticmethod
    def path(shard: Path) -> Path:
        return Path(shard).with_suffix(".source.json")

    @classmethod
    def load(cls, shard: Path) -> LatentSource | None:
        """The record beside `shard`, or None when there is none (or it is unreadable)."""
        try:
            return cls.model_validate_json(cls.path(shard).read_text())
        except (OSError, ValueError):
            return None

    def save(self, shard: Path) -> None:
        write_json_atomic(self.path(shard), self.model_dump(mode="json"))


class LatentStats(BaseModel):
    """`stats.json`: the latent scale factor, how it was measured, and which VAE made the latents."""

    scale_factor: float  # 1 / std: scaled latents have unit variance
    mean: float  # of the posterior samples
    std: float
    count: int  # train images measured (one posterior sample each)
    values: int  # latent elements measured
    latent_shape: list[int]  # (z, h, w)
    vae_checkpoint_sha256: str
    vae_id: str
    vae_checkpoint: str
    weights: str  # "ema" or "raw"
    seed: int  # of the posterior samples
    samples: str  # what was measured, in words

    @classmethod
    def load(cls, latents_dir: str | Path) -> LatentStats:
        return cls.model_validate_json((Path(latents_dir) / STATS_FILE).read_text())

    def save(self, latents_dir: str | Path) -> Path:
        path = Path(latents_dir) / STATS_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def of_run(cls, run_dir: str | Path, latents_dir: str | Path) -> LatentStats:
        """The stats a DiT run trains and draws with: the copy in its folder (the latents' when it
        started), else the latents' own (a run from before runs kept one)."""
        return cls.load(run_dir) if (Path(run_dir) / STATS_FILE).is_file() else cls.load(latents_dir)

    def to_model(self, z):
        """VAE latent -> the DiT's unit-variance latent space."""
        return z * self.scale_factor

    def to_vae(self, z):
        """DiT-space latent -> what the VAE decodes."""
        return z / self.scale_factor
