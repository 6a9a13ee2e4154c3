"""An exported model: one folder that draws on its own, in huggingface_hub's model-mixin layout.

    <folder>/
      README.md                       model card (tagdit.formats.model_card): front matter, grid, results, use
      tagdit.json                     `ExportIndex`: format version, sampling settings, where it came from
      dit/config.json, model.safetensors   `DiTModel` (EMA weights; the config holds the noise schedule)
      vae/config.json, model.safetensors   `VAEModel` (EMA weights)
      scheduler/scheduler_config.json the noise schedule as diffusers' DDIMScheduler reads it (trained_betas)
      vocab.json                      the DiT's tag vocabulary (a copy; tagdit.data.vocab reads it)
      stats.json                      the latent scale factor (`LatentStats`)
      metrics.json, grid-*.png        the run's evaluation shown on the card, when it has one

Each model.safetensors carries metadata: tagdit's version, the checkpoint's step and the sha256 of
the training settings the card lists. The export flow writes the folder (`write_export`) and pushes it
(`push_export`); `model_folder` finds one by path or Hub repo id, `read_export` loads it (`tagdit sample
--model`, `tagdit.from_pretrained`), `DiTModel.from_pretrained(repo, subfolder="dit")` reads one network.
This module is its one writer and reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import PyTorchModelHubMixin
from pydantic import BaseModel, ConfigDict

from models.config import DiTModelConfig, VAEModelConfig
from models.dit import DiT
from models.vae import AutoencoderKL
from tagdit import __version__
from tagdit.files import sha256_text, write_bytes_atomic, write_json_atomic
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.formats.latent_shards import LatentStats
from tagdit.formats.model_card import HUB_TAGS, model_card

INDEX_FILE = "tagdit.json"
FORMAT_VERSION = 1  # bump when the folder's layout or meaning changes
SCHEDULER_FILE = "scheduler/scheduler_config.json"
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # a Hugging Face repo id, user/name


def model_folder(path_or_repo: str | Path, *, subfolder: str | None = None, revision: str | None = None,
                 token: str | None = None) -> Path:
    """A local folder as it is; else a Hub repo id (user/name), fetched with snapshot_download (only
    `subfolder` of it when given; from the cache alone with HF_HUB_OFFLINE=1). `subfolder` of the result."""
    local = Path(path_or_repo)
    if local.is_dir():
        if revision:
            raise ValueError(f"revision {revision!r} applies to a Hub repository; {local} is a local folder")
        return local / subfolder if subfolder else local
    if not REPO_ID.match(str(path_or_repo)):
        raise FileNotFoundError(f"{path_or_repo} is neither a folder nor a Hub repository id (user/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(str(path_or_repo), revision=revision, token=token, library_name="tagdit",
                                   library_version=__version__, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:  # the Hub's messages span lines: one line here
        raise FileNotFoundError(f"{path_or_repo} is no local folder, and the Hub gave no model repository "
                                f"{path_or_repo}{f' at {revision}' if revision else ''}: {type(e).__name__}: "
                                f"{' '.join(str(e).split())}") from None
    return Path(folder) / subfolder if subfolder else Path(folder)


class _HubModel(PyTorchModelHubMixin):
    """huggingface_hub's mixin with `subfolder` (a network of an exported folder or repo) and metadata in
    model.safetensors (`safetensors_metadata`, set before `save_pretrained`)."""

    safetensors_metadata: dict[str, str] = {}

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        save_model(self, str(save_directory / "model.safetensors"), metadata={"format": "pt", **self.safetensors_metadata})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, subfolder: str | None = None,
                        revision: str | None = None, token: str | None = None, **kwargs: Any) -> Any:
        """A folder or Hub repo id, as huggingface_hub's `from_pretrained`, and its `subfolder` (dit, vae)."""
        folder = model_folder(pretrained_model_name_or_path, subfolder=subfolder, revision=revision, token=token)
        return super().from_pretrained(folder, **kwargs)


# The Hub classes take the whole `config.json` as one `config` dict (the mixin's convention for a
# parameter named `config`), so the file is exactly the config our checkpoints store.


class DiTModel(DiT, _HubModel, library_name="tagdit", tags=list(HUB_TAGS)):  # a copy: the mixin appends its own
    """The DiT as a Hub model: `config.json` is `DiT.config_dict()` (architecture, vocabulary size,
    latent size, noise schedule); `DiTModel.from_pretrained(folder)` rebuilds it in eval mode."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(DiTModelConfig.model_validate(config["model"]), vocab_size=int(config["vocab_size"]),
                         latent_size=int(config["latent_size"]), in_channels=int(config["in_channels"]),
                         schedule=str(config["schedule"]), timesteps=int(config["timesteps"]))


class VAEModel(AutoencoderKL, _HubModel, library_name="tagdit", tags=list(HUB_TAGS)):  # a copy: the mixin appends its own
    """The KL-VAE as a Hub model: `config.json` is its `VAEModelConfig`."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(VAEModelConfig.model_validate(config))


class ExportIndex(BaseModel):
    """`tagdit.json`: what the folder is, what drawing from it needs beyond the weights, and its source."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["tagdit-model"] = "tagdit-model"
    version: int = FORMAT_VERSION
    resolution: int  # side of the square images the VAE decodes (the dataset's crops)
    latent_shape: list[int]  # (z, h, w) the DiT draws
    schedule: str  # noise schedule and T the DiT was trained with (also in dit/config.json)
    timesteps: int
    max_tags: int  # tags the DiT reads per prompt
    sampler: dict[str, Any]  # the evaluation's headline sampler: {sampler, steps, eta}
    cfg_scale: float  # and its guidance scale
    source: dict[str, Any]  # run, dataset, DiT checkpoint and step, VAE id, tagger, code: where the weights came from


@dataclass
class ExportedModel:
    """An exported folder, loaded: the models on `device`, the latent statistics, the vocabulary's file."""

    folder: Path
    index: ExportIndex
    dit: DiTModel
    vae: VAEModel
    stats: LatentStats
    vocab_file: Path


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / INDEX_FILE).is_file()


def check_destination(dst: str | Path, overwrite: bool = False) -> Path:
    """`dst`, if an export may be written there: absent or empty, or (with `overwrite`) an earlier export.

    Never anything else, even with `overwrite`: replacing deletes the folder."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty: choose another folder, or pass --overwrite "
                                  f"to replace an earlier export")
        if not is_export(dst):
            raise FileExistsError(f"{dst} is not empty and holds no earlier export ({INDEX_FILE}): not replacing it")
    return dst


def weights_metadata(settings: dict[str, Any]) -> dict[str, str]:
    """model.safetensors' metadata for one network: tagdit's version, the step its `settings` (as the card
    lists them) record, and their sha256 (canonical JSON)."""
    return {"tagdit_version": __version__, "step": str(settings.get("steps")),
            "config_sha256": sha256_text(json.dumps(settings, sort_keys=True, default=str))}


def _save_hub_model(model: DiT | AutoencoderKL, folder: Path, settings: dict[str, Any]) -> None:
    hub_class = DiTModel if isinstance(model, DiT) else VAEModel
    hub = hub_class(model.config_dict() if isinstance(model, DiT) else model.cfg.model_dump())
    hub.load_state_dict(model.state_dict())
    hub.safetensors_metadata = weights_metadata(settings)
    hub.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # the mixin's stub card: the folder's one card is at its top


def scheduler_config(alpha_bar: torch.Tensor) -> dict[str, Any]:
    """The DiT's noise schedule as diffusers' DDIMScheduler reads it: β_t = 1 - ᾱ_t / ᾱ_{t-1} (ᾱ_{-1} = 1) as
    `trained_betas`, so cumprod(1 - β) is the clamped cosine (or linear) ᾱ the DiT was trained with."""
    ab = alpha_bar.double()
    betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])  # (T,)
    return {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0", "num_train_timesteps": len(ab),
            "beta_start": float(betas[0]), "beta_end": float(betas[-1]), "beta_schedule": "linear",
            "trained_betas": betas.tolist(), "prediction_type": "epsilon", "clip_sample": False,
            "set_alpha_to_one": True, "steps_offset": 0, "thresholding": False,
            "timestep_spacing": "linspace",  # tagdit's DDIM truncates linspace(T-1, 0, n) where diffusers rounds
            "rescale_betas_zero_snr": False}


def write_export(dst: str | Path, *, dit: DiT, vae: AutoencoderKL, stats: LatentStats, vocab_file: Path,
                 index: ExportIndex, settings: dict[str, Any], evaluation: Path | None = None,
                 overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write the folder under a temporary sibling name, then rename it into place (replacing an earlier
    export only with `overwrite`). `settings` are the training settings the card lists ({"dit": …, "vae": …});
    `evaluation` is an evaluation folder (metrics.json + grids) to show; `repo_id` the Hub repository the
    card's examples load from (else the folder)."""
    dst = check_destination(dst, overwrite).absolute()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, model in (("dit", dit), ("vae", vae)):
            _save_hub_model(model, tmp / name, settings.get(name, {}))
        write_json_atomic(tmp / SCHEDULER_FILE, scheduler_config(dit.alpha_bar))
        shutil.copyfile(vocab_file, tmp / "vocab.json")
        stats.model_copy(update={"vae_checkpoint": "vae"}).save(tmp)  # no path of the training machine
        metrics = _copy_evaluation(evaluation, tmp) if evaluation else None
        write_json_atomic(tmp / INDEX_FILE, index.model_dump(mode="json"))
        card = model_card(index, stats, metrics, settings, n_params=sum(p.numel() for p in dit.parameters()),
                          vocab_size=dit.vocab_size, repo_id=repo_id)
        write_bytes_atomic(tmp / "README.md", str(card).encode())
        if dst.exists():
            shutil.rmtree(dst)  # an earlier export (check_destination) or an empty folder
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _copy_evaluation(evaluation: Path, dst: Path) -> EvalMetrics:
    """Copy an evaluation's grids and metrics.json (its grids named relative to the folder)."""
    metrics = EvalMetrics.read(evaluation / "metrics.json")
    grids = {}
    for sampler, path in metrics.grids.items():
        src = Path(path) if Path(path).is_absolute() else evaluation / path
        if src.is_file():
            shutil.copyfile(src, dst / src.name)
            grids[sampler] = src.name
    metrics = metrics.model_copy(update={"grids": grids})
    metrics.write(dst / "metrics.json")
    return metrics


def read_export(folder: str | Path, device: torch.device | str = "cpu") -> ExportedModel:
    """Load an exported folder: both models in eval mode on `device`, checked against `tagdit.json`."""
    folder = Path(folder)
    if not is_export(folder):
        raise FileNotFoundError(f"{folder} is not an exported tagdit model (no {INDEX_FILE}); "
                                f"write one with: python -m flows.export --to {folder}")
    index = ExportIndex.model_validate_json((folder / INDEX_FILE).read_text())
    if index.version > FORMAT_VERSION:
        raise ValueError(f"{folder} is export format {index.version}; this tagdit reads up to {FORMAT_VERSION}")
    with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints "Loading weights from local directory"
        dit = DiTModel.from_pretrained(folder / "dit", strict=True, map_location=str(device))
        vae = VAEModel.from_pretrained(folder / "vae", strict=True, map_location=str(device)).requires_grad_(False)
    stats = LatentStats.load(folder)
    expected = (index.schedule, index.timesteps, index.latent_shape[1:], index.resolution)
    found = (dit.schedule, dit.timesteps, [dit.latent_size] * 2, dit.latent_size * vae.downsample_factor)
    if expected != found or stats.latent_shape != index.latent_shape:
        raise ValueError(f"{folder}: {INDEX_FILE} does not match the models it holds ({expected} vs {found})")
    return ExportedModel(folder=folder, index=index, dit=dit, vae=vae, stats=stats, vocab_file=folder / "vocab.json")


def push_export(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload an exported folder to a Hugging Face model repository, created if missing (`private` then),
    as one commit on branch `revision` (created from main if missing; default main); the URL to browse it."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not is_export(folder):
        raise FileNotFoundError(f"{folder} is not an exported tagdit model (no {INDEX_FILE})")
    index = ExportIndex.model_validate_json((folder / INDEX_FILE).read_text())
    api = HfApi(token=token)
    url = str(api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True))
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    default = f"tagdit export: {index.source.get('run')} {index.source.get('dit_checkpoint')} (step {index.source.get('dit_step')})"
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), revision=revision,
                      commit_message=commit_message or default)
    return f"{url}/tree/{revision}" if revision else url
