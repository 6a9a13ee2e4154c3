"""An exported folder's README.md: the Hub's front matter, the samples and results, credits and how to use it.

The front matter carries what the Hub indexes: `license`, `library_name`, `pipeline_tag`, `tags`,
`datasets` (when the export names the Hub dataset its images came from) and `model-index` (the
evaluation's tag-recall ratio and KIDs). The export writer (tagdit.formats.exported_model) calls
`model_card`; `code_source` is what the card links as the code.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tagdit import CLONE, __version__
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.formats.latent_shards import LatentStats

if TYPE_CHECKING:
    from tagdit.formats.exported_model import ExportIndex

HUB_TAGS = ["tagdit", "diffusion-transformer", "latent-diffusion", "tag-to-image"]
LICENSE = "apache-2.0"  # tagdit's own (LICENSE); the card says where the training images may ask for more
ORIGINAL = "https://github.com/Cosmic1Neko/Diffusion-Transformer-DiT-in-R-Tensorflow"
WD_TAGGER = "SmilingWolf/wd-v1-4-moat-tagger-v2"


def _public_url(url: str) -> str:
    """A git remote as a browsable https URL, never with credentials: git@host:o/r.git -> https://host/o/r."""
    if url.startswith("git@") and ":" in url:
        host, path = url[4:].split(":", 1)
        url = f"https://{host}/{path}"
    parts = urlsplit(url)
    path = parts.path[:-4] if parts.path.endswith(".git") else parts.path
    return urlunsplit(("https" if parts.scheme in ("http", "https", "ssh") else parts.scheme,
                       parts.netloc.rsplit("@", 1)[-1], path, "", ""))


def code_source() -> dict[str, str]:
    """tagdit's version, and the clone's commit and remote (as a public URL) where git knows them."""
    found = {"version": __version__}
    if CLONE is None:
        return found
    for key, args in (("commit", ["rev-parse", "HEAD"]), ("url", ["config", "--get", "remote.origin.url"])):
        try:
            done = subprocess.run(["git", "-C", str(CLONE), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip():
            found[key] = done.stdout.strip()
    if "url" in found:
        found["url"] = _public_url(found["url"])
    return found


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _number(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def eval_results(m: EvalMetrics, dataset: str, dataset_name: str) -> list[EvalResult]:
    """The card's `model-index`: the tag-recall ratio and every KID the evaluation measured."""
    how = f"{m.sampler}, CFG {m.cfg_scale}"
    found = [("tag-recall-ratio", m.tag_recall_ratio, f"Tag recall ratio (CFG samples / real images), {how}"),
             ("kid", m.kid_tagger.get("cfg"), f"KID over the tagger's scores, {how}")]
    if m.kid_inception:
        found.append(("kid", m.kid_inception.get("cfg"), f"KID over Inception-v3 features, {how}"))
    found += [("kid", k.mean, f"KID {k.variant} ({k.weights}, {k.input_size} px, {k.generated} vs {k.real} images)")
              for k in m.kid.values()]
    return [EvalResult(task_type="text-to-image", task_name="Tag-to-image", dataset_type=dataset,
                       dataset_name=dataset_name, metric_type=kind, metric_value=round(value, 6), metric_name=name)
            for kind, value, name in found if value is not None]


def _evaluation_section(index: ExportIndex, m: EvalMetrics | None) -> str:
    if m is None:
        return ("## Evaluation\n\nThis run had not been evaluated when it was exported "
                "(`tagdit stage evaluate` renders grids and measures tag fidelity).")
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


def _use_section(index: ExportIndex, where: str, example: str) -> str:
    sampler, eta = index.sampler, index.sampler.get("eta") or 0
    flags = f"--sampler {sampler.get('sampler')} --steps {sampler.get('steps')}" + (f" --eta {eta}" if eta else "")
    return f"""## Use

tagdit installs from its repository (see Credits: `make venv` there, or `pip install -e .`). Then, from any folder:

```python
import tagdit

model = tagdit.from_pretrained("{where}")  # a Hub repo id or a folder; revision=, subfolder=, device= too
images = model("{example}", negative_prompt="", steps={sampler.get('steps')}, cfg_scale={index.cfg_scale}, seed=0, n=4)
images[0].save("out.png")  # PIL images, {index.resolution}x{index.resolution}
```

```bash
tagdit sample --model {where} --prompt "{example}" {flags} --cfg {index.cfg_scale} --seed 0 --out out.png
tagdit serve --model {where}    # the sampling page
```

Each network alone loads with huggingface_hub: `DiTModel.from_pretrained("{where}", subfolder="dit")` and
`VAEModel.from_pretrained(..., subfolder="vae")` (`tagdit.formats.exported_model`). The noise schedule is in
`scheduler/scheduler_config.json` as diffusers' `DDIMScheduler` reads it (`trained_betas`, ε-prediction); the
DiT and its tag encoder are tagdit's own, not a diffusers pipeline."""


def _credits_section(index: ExportIndex) -> str:
    src, code = index.source, index.source.get("code") or {}
    tagger = src.get("tagger") or WD_TAGGER
    this = f"[{tagger}](https://huggingface.co/{tagger})" if tagger.count("/") == 1 else tagger
    name = f"[tagdit]({code['url']})" if code.get("url") else "tagdit"
    at = f", commit `{code['commit'][:12]}`" if code.get("commit") else ""
    return f"""## Credits

- tagdit re-creates [Cosmic1Neko/Diffusion-Transformer-DiT-in-R-Tensorflow]({ORIGINAL}) (the original: a
  tag-conditioned latent DiT in R/TensorFlow) in PyTorch.
- Tags come from SmilingWolf's WD 1.4 MOAT tagger v2 ([{WD_TAGGER}](https://huggingface.co/{WD_TAGGER})), which
  also measures tag recall; this model's training tags came from {this}.
- Code: {name} {code.get('version', __version__)}{at}. License: Apache-2.0, for the code and these weights; the
  training images' own terms still apply to what they depict."""


def model_card(index: ExportIndex, stats: LatentStats, metrics: EvalMetrics | None, settings: dict[str, Any], *,
               n_params: int, vocab_size: int, repo_id: str | None = None) -> ModelCard:
    """README.md: what the model is, its samples and results, how to draw (from `repo_id` when it is pushed
    there, else from the folder), its credits and how it was trained."""
    src, sampler = index.source, index.sampler
    dataset = src.get("hub_dataset")
    data = ModelCardData(license=LICENSE, library_name="tagdit", pipeline_tag="text-to-image", tags=HUB_TAGS,
                         datasets=[dataset] if dataset else None, model_name=f"tagdit-{src.get('run')}",
                         eval_results=eval_results(metrics, dataset or str(src.get("dataset")), str(src.get("dataset")))
                         if metrics else None)
    example = metrics.prompts[0] if metrics and metrics.prompts else "tag, tag"
    body = f"""
# tagdit: {src.get('run')}

A tag-conditioned latent Diffusion Transformer ({n_params / 1e6:.1f}M parameters) and its KL-VAE, trained with
tagdit on the dataset `{src.get('dataset')}`. It draws {index.resolution}x{index.resolution} images from a prompt of
comma-separated tags: up to {index.max_tags}, from the {vocab_size - 3} tags in `vocab.json`. The weights are
the EMA weights of the run's {src.get('dit_checkpoint')} (step {src.get('dit_step')}) and of VAE {src.get('vae_id')}.

{_evaluation_section(index, metrics)}

{_use_section(index, repo_id or "path/to/this/folder", example)}

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

{_credits_section(index)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
