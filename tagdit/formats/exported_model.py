"""An exported model: one folder that draws on its own, in huggingface_hub's model-mixin layout.

    <folder>/
      README.md                       model card: grid, evaluation metrics, training settings, how to use
      tagdit.json                     `ExportIndex`: format version, sampling settings, where it came from
      dit/config.json, model.safetensors   `DiTModel` (EMA weights; the config holds the noise schedule)
      vae/config.json, model.safetensors   `VAEModel` (EMA weights)
      vocab.json                      the DiT's tag vocabulary (a copy; tagdit.data.vocab reads it)
      stats.json                      the latent scale factor (`LatentStats`)
      metrics.json, grid-*.png        the run's evaluation shown on the card, when it has one

The export flow writes it (`write_export`); `flows.sample --model`, `flows.serve --model` and
`DiTModel.from_pretrained(folder / "dit")` read it. This module is its one writer and reader.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin
from pydantic import BaseModel, ConfigDict

from models.config import DiTModelConfig, VAEModelConfig
from models.dit import DiT
from models.vae import AutoencoderKL
from tagdit.files import write_bytes_atomic, write_json_atomic
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.formats.latent_shards import LatentStats

INDEX_FILE = "tagdit.json"
FORMAT_VERSION = 1  # bump when the folder's layout or meaning changes
HUB_TAGS = ["tagdit", "diffusion-transformer", "latent-diffusion", "tag-to-image"]


# The Hub classes take the whole `config.json` as one `config` dict (the mixin's convention for a
# parameter named `config`), so the file is exactly the config our checkpoints store.


class DiTModel(DiT, PyTorchModelHubMixin, library_name="tagdit", tags=HUB_TAGS):
    """The DiT as a Hub model: `config.json` is `DiT.config_dict()` (architecture, vocabulary size,
    latent size, noise schedule); `DiTModel.from_pretrained(folder)` rebuilds it in eval mode."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(DiTModelConfig.model_validate(config["model"]), vocab_size=int(config["vocab_size"]),
                         latent_size=int(config["latent_size"]), in_channels=int(config["in_channels"]),
                         schedule=str(config["schedule"]), timesteps=int(config["timesteps"]))


class VAEModel(AutoencoderKL, PyTorchModelHubMixin, library_name="tagdit", tags=HUB_TAGS):
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
    source: dict[str, Any]  # run, dataset, DiT checkpoint and step, VAE id: where the weights came from


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


def _save_hub_model(hub: PyTorchModelHubMixin, folder: Path) -> None:
    hub.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # the mixin's stub card: the folder's one card is at its top


def write_export(dst: str | Path, *, dit: DiT, vae: AutoencoderKL, stats: LatentStats, vocab_file: Path,
                 index: ExportIndex, settings: dict[str, Any], evaluation: Path | None = None,
                 overwrite: bool = False) -> Path:
    """Write the folder under a temporary sibling name, then rename it into place (replacing an earlier
    export only with `overwrite`). `settings` are the training settings the card lists; `evaluation` is
    an evaluation folder (metrics.json + grids) to show."""
    dst = check_destination(dst, overwrite).absolute()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, model, hub_class in (("dit", dit, DiTModel), ("vae", vae, VAEModel)):
            hub = hub_class(model.config_dict() if isinstance(model, DiT) else model.cfg.model_dump())
            hub.load_state_dict(model.state_dict())
            _save_hub_model(hub, tmp / name)
        shutil.copyfile(vocab_file, tmp / "vocab.json")
        stats.model_copy(update={"vae_checkpoint": "vae"}).save(tmp)  # no path of the training machine
        metrics = _copy_evaluation(evaluation, tmp) if evaluation else None
        write_json_atomic(tmp / INDEX_FILE, index.model_dump(mode="json"))
        card = model_card(index, stats, metrics, settings, n_params=sum(p.numel() for p in dit.parameters()),
                          vocab_size=dit.vocab_size)
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


def push_export(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to a Hugging Face model repository (created if missing); its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not is_export(folder):
        raise FileNotFoundError(f"{folder} is not an exported tagdit model (no {INDEX_FILE})")
    index = ExportIndex.model_validate_json((folder / INDEX_FILE).read_text())
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message=f"tagdit export: {index.source.get('run')} {index.source.get('dit_checkpoint')}")
    return str(url)


# ---------------------------------------------------------------- the model card


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _number(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _evaluation_section(index: ExportIndex, m: EvalMetrics | None) -> str:
    if m is None:
        return ("## Evaluation\n\nThis run had not been evaluated when it was exported "
                "(`python -m flows.evaluate` renders grids and measures tag fidelity).")
    which = m.dit_checkpoint + (f" (step {m.dit_step})" if m.dit_step is not None else "")
    note = "" if m.dit_checkpoint == index.source.get("dit_checkpoint") else (
        f"\n\nMeasured on {which}, not the exported checkpoint "
        f"({index.source.get('dit_checkpoint')}, step {index.source.get('dit_step')}).")
    grids = "\n\n".join(f"![{name}]({path})\n\n*{name}: prompts x seeds, CFG {m.cfg_scale}.*"
                        for name, path in m.grids.items())
    rows = [("checkpoint", which), ("sampler", f"{m.sampler}, CFG {m.cfg_scale}"),
            ("tag recall ratio (CFG recall / real images' recall)", _number(m.tag_recall_ratio)),
            ("tag recall: CFG / unconditional / real / VAE reconstructions",
             " / ".join(_number(getattr(m, k).recall) for k in ("cfg", "unconditional", "real", "reconstructed"))),
            ("tag precision, CFG", _number(m.cfg.precision)),
            ("KID over tagger scores, CFG / unconditional",
             " / ".join(_number(m.kid_tagger.get(k), 4) for k in ("cfg", "unconditional")))]
    if m.kid_inception:
        rows.append(("KID over Inception-v3 features, CFG", _number(m.kid_inception.get("cfg"), 4)))
    rows += [(f"KID {k.variant} ({k.weights}, {k.input_size} px, {k.generated} vs {k.real} images)",
              f"{_number(k.mean, 5)} ± {_number(k.std, 5)}") for k in m.kid.values() if k.mean is not None]
    rows += [("VAE reconstruction PSNR (dB)", _number(m.vae_psnr_db, 2)),
             ("DiT validation loss", _number(m.dit_val_loss, 4))]
    return f"## Evaluation\n\n{grids}\n\n{_table(rows)}{note}\n\nAll numbers: `metrics.json`."


def model_card(index: ExportIndex, stats: LatentStats, metrics: EvalMetrics | None, settings: dict[str, Any], *,
               n_params: int, vocab_size: int) -> ModelCard:
    """The folder's README.md: what the model is, its samples and metrics, how it was trained, how to draw."""
    src = index.source
    data = ModelCardData(library_name="tagdit", pipeline_tag="text-to-image", tags=HUB_TAGS,
                         license="apache-2.0")  # tagdit's own; change it where the training images ask for another
    sampler = index.sampler
    eta = f" --eta {sampler['eta']}" if sampler.get("eta") else ""
    example = metrics.prompts[0] if metrics and metrics.prompts else "tag, tag"
    body = f"""
# tagdit: {src.get('run')}

A tag-conditioned latent Diffusion Transformer ({n_params / 1e6:.1f}M parameters) and its KL-VAE, trained with
tagdit on the dataset `{src.get('dataset')}`. It draws {index.resolution}x{index.resolution} images from a prompt of
comma-separated tags: up to {index.max_tags}, from the {vocab_size - 3} tags in `vocab.json`. The weights are
the EMA weights of the run's {src.get('dit_checkpoint')} (step {src.get('dit_step')}) and of VAE {src.get('vae_id')}.

{_evaluation_section(index, metrics)}

## Use

```bash
python -m flows.sample --model <this folder> --prompt "{example}" \\
    --sampler {sampler.get('sampler')} --steps {sampler.get('steps')}{eta} --cfg {index.cfg_scale} --seed 0 --out out.png
python -m flows.serve --model <this folder>        # the sampling page
```

In Python, each model loads with huggingface_hub:

```python
from tagdit.formats.exported_model import DiTModel, VAEModel
dit = DiTModel.from_pretrained("<this folder>/dit")   # ε-prediction, {index.schedule} schedule, T = {index.timesteps}
vae = VAEModel.from_pretrained("<this folder>/vae")   # decode(latent / scale_factor) -> images in [-1, 1]
```

## Sampling settings

{_table([("resolution", f"{index.resolution} px"), ("latent shape (z, h, w)", tuple(index.latent_shape)),
         ("latent scale factor (`stats.json`)", f"{stats.scale_factor:.5f}"),
         ("noise schedule", f"{index.schedule}, T = {index.timesteps}"),
         ("suggested sampler (the evaluation's first)",
          f"{sampler.get('sampler')}, {sampler.get('steps')} steps, eta {sampler.get('eta', 0)}"),
         ("classifier-free guidance", index.cfg_scale)])}

## Training

As each training recorded its settings (`steps`: those of the exported checkpoint):

```yaml
{yaml.safe_dump(settings, sort_keys=False).strip()}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
