"""An exported model by folder or Hub repo id, in one call: `tagdit.from_pretrained(...)(prompt)` -> images.

    import tagdit
    model = tagdit.from_pretrained("user/tagdit-demo")        # or a folder; revision=, subfolder=, device=
    images = model("blue hair, smile", negative_prompt="hat", steps=30, cfg_scale=4.0, seed=0, n=4)

The model card's "Use" section shows the same. `tagdit sample --model` and `tagdit serve --model` load
through `painter_for_export` here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from tagdit.sampling.methods import SamplerName, sampler_method, sampler_name
from tagdit.sampling.painter import Painter

if TYPE_CHECKING:
    from tagdit.formats.exported_model import ExportIndex

log = logging.getLogger(__name__)


def painter_for_export(folder: str | Path, device: str = "auto") -> Painter:
    """A painter from an exported folder alone (`flows.export`); it names the folder as its checkpoint."""
    return _load(folder, device)[0]


def _load(folder: str | Path, device: str) -> tuple[Painter, ExportIndex]:
    from tagdit.data.vocab import Vocab
    from tagdit.devices import select_device
    from tagdit.formats.exported_model import read_export

    dev = select_device(device)
    model = read_export(folder, dev)
    vocab = Vocab.load(model.vocab_file)
    if model.dit.vocab_size != len(vocab):
        raise ValueError(f"{folder}: the DiT was trained with {model.dit.vocab_size} tokens, vocab.json has {len(vocab)}")
    painter = Painter(dit=model.dit, vae=model.vae, vocab=vocab, stats=model.stats, device=dev,
                      checkpoint=model.folder.absolute())
    return painter, model.index


@dataclass
class TagDiT:
    """An exported model, loaded: call it with a prompt of comma-separated tags for PIL images.

    Its defaults are the export's suggested sampling settings (`tagdit.json`: the evaluation's sampler,
    steps and guidance scale)."""

    painter: Painter
    sampler: SamplerName
    steps: int
    eta: float
    cfg_scale: float

    def __call__(self, prompt: str, negative_prompt: str = "", *, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int = 0, n: int = 1, sampler: SamplerName | None = None,
                 eta: float | None = None) -> list[Image.Image]:
        """`n` images for `prompt` (tags the vocabulary does not know are logged and read as <unk>), their
        noise drawn from `seed` as `tagdit sample --seed` draws it."""
        kind = sampler or self.sampler
        if eta is None and kind == self.sampler == "ddim":
            eta = self.eta
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        method = sampler_method(kind, self.steps if steps is None else steps, eta)
        (cond, unknown), (neg, unknown_neg) = self.painter.parse(prompt), self.painter.parse(negative_prompt)
        if unknown or unknown_neg:
            log.warning("tags not in the vocabulary (read as <unk>): %s", ", ".join(unknown + unknown_neg))
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        return self.painter.sample(cond, neg, method, scale, seed, n)


def from_pretrained(path_or_repo: str | Path, *, subfolder: str | None = None, revision: str | None = None,
                    device: str = "auto", token: str | None = None) -> TagDiT:
    """An exported tagdit model from a folder or a Hub repo id (user/name, fetched with snapshot_download;
    `revision`: branch, tag or commit; `subfolder`: where in the repo the export lies), on `device`."""
    from tagdit.formats.exported_model import model_folder

    painter, index = _load(model_folder(path_or_repo, subfolder=subfolder, revision=revision, token=token), device)
    method = sampler_method("dpmpp_2m" if index.sampler["sampler"] == "dpmpp_2m" else "ddim",
                            int(index.sampler["steps"]), float(index.sampler.get("eta") or 0.0))
    return TagDiT(painter=painter, sampler=sampler_name(method), steps=method.steps, eta=method.eta,
                  cfg_scale=float(index.cfg_scale))
