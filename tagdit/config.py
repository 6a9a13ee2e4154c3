"""Typed pipeline configuration: one pydantic model per stage, composed into `PipelineConfig`.

Load with `load_config(path, overrides)`; YAML presets live in `configs/`. Every model forbids
unknown keys, so a typo fails loudly with the key's dotted name. The section base and the folder type
live in `tagdit.config_base`, the `prefect` and `launch` sections in `tagdit.config_orchestration`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.config import (
    DIT_PRESETS,
    VAE_PRESETS,
    VGG_REPO,
    VGG_REVISION,
    DiTModelConfig,
    VAEModelConfig,
)
from tagdit.config_base import Location, Section
from tagdit.config_orchestration import LaunchConfig, PrefectConfig
from tagdit.overrides import ConfigError, apply_override, parse_override, rename_keys
from tagdit.presets import preset_path
from tagdit.stores import working_dir

# ---------------------------------------------------------------- data stages


class DataConfig(Section):
    # input images: a folder or URL walked recursively, or a manifest file (.parquet/.csv/.jsonl) of them
    source: Location = Path("shards/demo-world/images")
    name: str = "demo"  # dataset name: shards land in <root>/<name>/
    root: Location = Path("shards")  # shards root: a folder or a URL
    resolution: int = Field(64, ge=16)  # square crop size; the original trained at 256
    # hash buckets a source file's key falls in: the unit of crop, tag, shard and encode, so an added
    # file re-does one bucket. None = chosen on the first prepare (power of two >= files / samples_per_shard)
    # and kept in <dataset>/dataset.json while the dataset grows; a set value wins
    buckets: int | None = Field(None, ge=1)
    # training on a `root` URL reads the shards straight from the store (no copy of the dataset first):
    # none = every epoch streams them again, nothing on local disk; local = the first read of each shard
    # keeps it in the working copy (TAGDIT_STORE_CACHE: room for every shard a node reads), later ones read it there
    shard_cache: Literal["none", "local"] = "none"


class CropConfig(Section):
    mode: Literal["center", "pad"] = "center"  # centre crop, or pad with white like the tagger
    min_size: int = Field(32, ge=1)  # reject images whose short side is smaller than this
    max_pixels: int | None = 178_956_970  # decompression-bomb limit (Pillow's default x2)
    workers: int = Field(0, ge=0)  # processes; 0 = one per core
    unit_files: int = Field(20_000, ge=1)  # files per task run at most (whole buckets): ~5,000 runs at 100M files


class TaggerConfig(Section):
    repo: str = "SmilingWolf/wd-v1-4-moat-tagger-v2"  # Hugging Face repo of the real tagger
    revision: str = "main"  # branch, tag or commit of `repo`; resolved once per run, the commit recorded
    path: Path | None = None  # local folder with model.onnx + selected_tags.csv (wins over repo)
    general_threshold: float = Field(0.35, ge=0, le=1)
    character_threshold: float = Field(0.85, ge=0, le=1)
    mcut: bool = False  # MCut thresholding instead of the fixed thresholds
    exclude: list[str] = []  # tags never kept
    sidecar: Literal["merge", "sidecar", "tagger"] = "merge"  # how `name.txt` tags combine
    # images per run when the model's batch dimension is dynamic (a fixed batch is the model's), on a
    # GPU; on a CPU one single-threaded run per core goes at once, each of `cpu_batch_size` images: a
    # small batch keeps a run's activations in cache (ConvNeXt-T-sized tagger on 2 cores: 4.2-4.6 img/s
    # at 1-4 per run, 3.1-3.3 at 8; docs/benchmarks.md)
    batch_size: int = Field(16, ge=1)
    cpu_batch_size: int = Field(2, ge=1)
    # The reference recipe resizes with Pillow's BICUBIC: the default, bit for bit. `torch` is an opt-in
    # speed setting (antialiased bicubic, ~1.4 ms instead of 4-44 ms of one core per image): pixels
    # within 2 levels, scores within ~0.002 on pixel-sensitive test taggers, 1-2 tag decisions in 10^5
    # flipped (docs/design.md §6).
    resize: Literal["pillow", "torch"] = "pillow"
    # Opt-in: decode large sources reduced (JPEG DCT scaling, then Image.reduce) while the square stays
    # >= the tagger's size: ~half the decode + resize time. NOT identical to the reference (box filter
    # before the bicubic: edge pixels move by up to ~100 levels; scores by up to 0.44, ~5 tag decisions
    # in 10^4 flipped on the same taggers).
    pre_shrink: bool = False


class ShardsConfig(Section):
    image_format: Literal["jpg", "png"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(1000, ge=1)
    val_fraction: float = Field(0.01, ge=0, lt=1)  # the original's 1% validation split
    min_tag_count: int = Field(5, ge=1)  # tags rarer than this stay out of the DiT vocabulary
    max_vocab: int = Field(1000, ge=3)  # vocabulary cap, special ids included


# ---------------------------------------------------------------- models and training


class TrainConfig(Section):
    """Optimisation settings shared by the VAE and the DiT trainers."""

    batch_size: int = Field(16, ge=1)  # global batch of one optimizer step (all ranks, all accumulated micro-batches)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step: each rank's is batch_size / (nproc * grad_accum)
    steps: int = Field(1000, ge=1)  # total optimizer steps (the original counted epochs)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)  # linear warm-up, then cosine decay to zero
    # "none": the original's schedule as Keras ran it (CosineDecay with warmup_steps but no
    # warmup_target skips the warm-up: peak lr from step 0, zero after steps - warmup_steps)
    warmup: Literal["linear", "none"] = "linear"
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm; None = no clipping, as the original
    checkpoint_every: int = Field(500, ge=1)
    checkpoint_minutes: float | None = Field(None, gt=0)  # also checkpoint when this long has passed since the last
    log_every: int = Field(50, ge=1)
    val_every: int = Field(250, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: int = Field(1, ge=1)  # >1 launches torchrun DDP
    compile: bool = False  # torch.compile the training forward (inductor; CPU needs a C compiler)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # autocast dtype; auto = bf16 on CUDA, fp32 on CPU
    shuffle_buffer: int = Field(1000, ge=1)  # runs of this many samples are shuffled together in each epoch's order
    loader_workers: int = Field(2, ge=0)  # decoding processes per rank, each with its own piece of the order; 0 = in a thread
    # keep the newest N (plus those an evaluation pins); None = keep all. A checkpoint is ~16 bytes per
    # parameter (weights, EMA, two AdamW moments): 4.2 GB for the original DiT, so keeping all 88 needs 370 GB
    keep_checkpoints: int | None = Field(3, ge=1)
    # resume this run although its input data changed (a grown dataset) instead of starting over; for
    # the VAE with unchanged steps: keep the trained VAE (nothing trained), so encode redoes new shards only
    continue_on_new_data: bool = False


class VAETrainConfig(TrainConfig):
    """The original's VAE optimisation: AdamW 1e-4, wd 0.01, 6000 warm-up steps, EMA 0.999, batch 16."""

    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(6000, ge=0)


class DiTTrainConfig(TrainConfig):
    """The original's DiT optimisation: AdamW 5e-5, wd 1e-4, 10k warm-up steps, EMA 0.999, batch 32."""

    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(10_000, ge=0)


class VAEConfig(Section):
    """The VAE stage: architecture, the original's loss weights (each term a mean), optional PatchGAN."""

    model: VAEModelConfig = VAE_PRESETS["original"]
    w_l1: float = Field(10.0, ge=0)  # mean |x - x_rec| over pixels
    w_perc: float = Field(1.0, ge=0)  # VGG19 perceptual loss; 0 disables it (no weights needed)
    w_kl: float = Field(1e-5, ge=0)  # KL(q(z|x) || N(0, I)) averaged over latent elements
    # torchvision's ImageNet VGG19 (vgg_*), the original's Keras/Caffe VGG19 (keras_vgg_*), or auto: Keras' if found
    perceptual_network: Literal["torchvision", "keras", "auto"] = "torchvision"
    vgg_weights: Path | None = None  # local VGG19 file (.safetensors or torchvision .pth); wins over the Hub
    vgg_repo: str = VGG_REPO  # Hub re-host of torchvision's vgg19-dcbb9e9d.pth
    vgg_revision: str = VGG_REVISION  # pinned: the weights never change
    keras_vgg_weights: Path | None = None  # local vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5; wins
    keras_vgg_repo: str | None = None  # a Hub repo hosting that file (Keras serves it from GCS); else ~/.keras
    disc_start: int | None = Field(None, ge=0)  # PatchGAN hinge loss from this step; None = off (the original)
    w_disc: float = Field(0.5, ge=0)  # times the adaptive weight ||grad L_rec|| / ||grad L_g||
    disc_channels: int = Field(64, ge=1)  # PatchGAN base width (taming-transformers: 64)
    disc_layers: int = Field(3, ge=1)  # PatchGAN stride-2 layers (70x70 receptive field at 3)
    # train on a random square crop of each image (a multiple of f; None or >= the resolution = the
    # whole image): convolutions see the same statistics at a fraction of the cost (with attention,
    # fewer positions). Validation always reconstructs whole images.
    train_crop: int | None = Field(None, ge=1)
    train: VAETrainConfig = VAETrainConfig()

    @model_validator(mode="after")
    def _crop_fits_latent_grid(self) -> VAEConfig:
        f = 2 ** len(self.model.widths)
        if self.train_crop is not None and self.train_crop % f:
            raise ValueError(f"vae.train_crop={self.train_crop} must be a multiple of the VAE's f = {f}")
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        return _resolve_preset(v, VAE_PRESETS, "vae.model")


class LatentsConfig(Section):
    flip: bool = True  # also store the horizontally flipped image's posterior
    batch_size: int = Field(64, ge=1)
    use_ema: bool = True


class DiTConfig(Section):
    model: DiTModelConfig = DIT_PRESETS["original-264m"]
    schedule: Literal["cosine", "linear"] = "cosine"
    timesteps: int = 1000
    caption_drop: float = Field(0.2, ge=0, le=1)  # whole caption dropped -> null condition (CFG)
    tag_drop: float = Field(0.1, ge=0, le=1)  # each remaining tag dropped
    shuffle_tags: bool = True
    min_snr_gamma: float | None = Field(None, gt=0)  # Min-SNR-γ loss weighting; None = L_simple (the original)
    val_samples: int = Field(64, ge=1)  # fixed (latent, t, noise) triples for validation loss
    # sample grids from the EMA weights while training (TensorBoard samples/grid + Prefect artifact);
    # they never change the checkpoints, so these four stay out of the cache key and the run identity
    sample_every: int | None = Field(None, ge=1)  # steps between grids; None = off
    sample_prompts: list[str] = []  # empty = a few frequent captions of the val latents, fixed at start
    sample_seeds: list[int] = [0, 1]  # grid columns
    sample_steps: int = Field(20, ge=1)  # DDIM steps (CFG scale: evaluate.cfg_scale)
    train: DiTTrainConfig = DiTTrainConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        return _resolve_preset(v, DIT_PRESETS, "dit.model")


class SamplerConfig(Section):
    name: str  # label used in file names
    sampler: Literal["ddim", "dpmpp_2m"] = "ddim"  # generalised DDIM, or DPM-Solver++(2M) (deterministic)
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0)  # DDIM only: 0 = DDIM, 1 = DDPM-like
    recall: bool = False  # also report its CFG samples' tag recall beside the first sampler's (always there)

    @model_validator(mode="after")
    def _eta_is_ddims(self) -> SamplerConfig:
        if self.sampler != "ddim" and self.eta != 0:
            raise ValueError(f"eta={self.eta} applies to the ddim sampler only; {self.sampler} is deterministic")
        return self


class EvaluateConfig(Section):
    prompts: list[str] = []  # empty = frequent tag combinations of the dataset
    n_prompts: int = Field(6, ge=1)  # how many default prompts to draw
    negative_example: tuple[str, str] | None = None  # (prompt, negative); None = derived
    seeds: list[int] = [0, 1, 2, 3]
    cfg_scale: float = Field(4.0, ge=0)  # classifier-free guidance scale of every evaluation sample
    samplers: list[SamplerConfig] = [
        SamplerConfig(name="ddim50", steps=50, eta=0.0),
        SamplerConfig(name="ddpm250", steps=250, eta=1.0),
    ]
    # generated images per prompt for tag fidelity: the recall's standard error shrinks as 1/sqrt of it
    metric_samples: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Inception KIDs (models.kid): which variants, and the images they score. The generated images are
    # drawn for captions of random validation images, as the original drew 10,000 with DDIM 20; a KID
    # over fewer than ~1,000 images says little. 0 = no Inception KID.
    kid_variants: list[Literal["original", "standard"]] = ["original", "standard"]
    kid_images: int = Field(1024, ge=0)  # 32 whole batches of 32: the original variant scores all of them
    kid_real_images: int = Field(10000, ge=2)  # validation images (at most) as the real set
    kid_sampler: SamplerConfig = SamplerConfig(name="ddim20", steps=20, eta=0.0)  # KID_measure.R's sampler
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID weights) or torchvision's inception_v3_google-0cc3c7bd.pth;
    # None = torch hub's cache (FID weights first) if a file is there, else KIDs not computed (never downloaded)
    inception_weights: Path | None = None


class DemoConfig(Section):
    enabled: bool = False  # build the demo world + demo tagger before the pipeline runs
    out: Path = Path("shards/demo-world")  # images/ + labels.json land here
    tagger_out: Path = Path("shards/demo-tagger")  # model.onnx + selected_tags.csv + report.json
    n_images: int = Field(2000, ge=10)
    seed: int = 0
    # the demo tagger's training cost (its own image stream, each image seen whole and as a 64 px
    # crop); the defaults reach >= 95% per-tag precision/recall in about a minute on 2 cores
    tagger_images: int = Field(2000, ge=16)
    tagger_epochs: int = Field(5, ge=1)


class RunConfig(Section):
    name: str = "demo"  # checkpoints, logs and grids go to <root>/<name>/
    root: Location = Path("runs")  # a folder or a URL


class PipelineConfig(Section):
    data: DataConfig = DataConfig()
    crop: CropConfig = CropConfig()
    tagger: TaggerConfig = TaggerConfig()
    shards: ShardsConfig = ShardsConfig()
    vae: VAEConfig = VAEConfig()
    latents: LatentsConfig = LatentsConfig()
    dit: DiTConfig = DiTConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    run: RunConfig = RunConfig()
    demo: DemoConfig = DemoConfig()
    prefect: PrefectConfig = PrefectConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _batches_split_over_the_ranks(self) -> PipelineConfig:
        for section in ("vae", "dit"):
            if problem := batch_split_error(getattr(self, section).train, section, self.launch.nnodes or 1):
                raise ValueError(problem)
        return self

    @property
    def dataset_dir(self) -> Path:
        """The dataset folder (a local working copy when `data.root` is a URL)."""
        return working_dir(self.data.root) / self.data.name

    @property
    def run_dir(self) -> Path:
        """The run folder (a local working copy when `run.root` is a URL)."""
        return working_dir(self.run.root) / self.run.name


def batch_split_error(tc: TrainConfig, section: str, nnodes: int) -> str | None:
    """Why `<section>.train.batch_size` cannot be split over nnodes x nproc ranks x grad_accum micro-batches, or None."""
    world = nnodes * tc.nproc
    if tc.batch_size % (world * tc.grad_accum) == 0:
        return None
    return (f"{section}.train.batch_size {tc.batch_size} does not divide by the world size {world} (launch.nnodes "
            f"{nnodes} x {section}.train.nproc {tc.nproc}) x {section}.train.grad_accum {tc.grad_accum}: "
            f"make it a multiple of {world * tc.grad_accum}")


# ---------------------------------------------------------------- loading


def _resolve_preset(v: Any, presets: dict[str, Section], key: str) -> Any:
    if isinstance(v, str):
        if v not in presets:
            raise ValueError(f"unknown preset {v!r} for {key}; choose from {sorted(presets)}")
        return presets[v].model_dump()
    if isinstance(v, dict) and "preset" in v:  # {preset: demo, depth: 4} = preset + overrides
        v = dict(v)
        return {**_resolve_preset(v.pop("preset"), presets, key), **v}
    return v


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file or a preset by name (`demo`: configs/demo.yaml), apply `key=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = preset_path(str(path)) or Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping")
        rename_keys(tree)
    for item in overrides or []:
        parts, value = parse_override(item)
        apply_override(tree, parts, value, PipelineConfig)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})" if key else f"  {err['msg']}")  # a cross-section check
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None
