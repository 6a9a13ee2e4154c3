"""`metrics.json`: what one evaluation of one DiT checkpoint measured (the evaluate stage writes it).

The one writer and reader of the file: the evaluate stage, its artifacts, the flows and the
benchmarks all go through `EvalMetrics`. Files written before a field existed still read: every field
added since has a default (`kid`, `tag_recall_ratio_se`, `Fidelity.recall_se`), and `kid_inception`, which
no evaluation writes any more, is kept for them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tagdit.files import write_json_atomic


class Fidelity(BaseModel):
    """Mean recall and precision of the wanted tags among the tagger's tags, over `n` images."""

    recall: float
    precision: float
    n: int
    # standard error of `recall` over the samples, within prompts (CFG and unconditional samples only;
    # None for real images, whose recall has no sampling noise, and for one sample per prompt)
    recall_se: float | None = None


class SamplerFidelity(Fidelity):
    """Fidelity of one sampler's CFG samples (same prompts and seeds as the first sampler's)."""

    sampler: str
    steps: int


class PromptFidelity(BaseModel):
    prompt: str
    cfg: Fidelity
    unconditional: Fidelity


class KidScore(BaseModel):
    """One Inception KID: what it was measured with and on, and mean ± std of MMD² over subsets."""

    variant: str  # models.kid: "original" (KID_measure.R's protocol) or "standard" (papers')
    extractor: str  # e.g. "InceptionV3 pool features (2048-d)"
    weights: str | None  # the weights file's name; None = none found, so not computed
    input_size: int  # px the images were resized to
    generated: int  # generated images scored
    real: int  # distinct real (validation) images
    sampler: str  # the generated images' sampler (evaluate.kid_sampler)
    cfg_scale: float
    subset_size: int
    subsets: int
    mean: float | None
    std: float | None  # population std of MMD² over the subsets
    note: str = ""  # where it differs from the variant's reference


class EvalMetrics(BaseModel):
    """Tag fidelity, KID, VAE round trip and provenance of one evaluation."""

    model_config = ConfigDict(extra="forbid")

    dit_checkpoint: str
    dit_step: int | None = None
    sampler: str  # the sampler of the headline CFG samples (evaluate.samplers[0])
    cfg_scale: float
    samples_per_prompt: int = 0
    cfg: Fidelity  # CFG samples
    unconditional: Fidelity  # unconditional samples: the floor
    real: Fidelity  # real validation images: the ceiling
    reconstructed: Fidelity  # their VAE reconstructions: the VAE's ceiling
    tag_recall_ratio: float  # cfg.recall / real.recall
    tag_recall_ratio_se: float | None = None  # cfg.recall_se / real.recall: sampling noise only
    per_prompt: list[PromptFidelity] = []
    sampler_recall: dict[str, SamplerFidelity] = {}
    kid_tagger: dict[str, float | None]  # "cfg" / "unconditional" -> KID over the tagger's scores
    kid: dict[str, KidScore] = {}  # variant name -> Inception KID of evaluate.kid_images samples
    kid_inception: dict[str, float | None] | None = None  # files before `kid`: torchvision weights, 299 px
    vae_psnr_db: float
    dit_val_loss: float | None = None
    prompts: list[str] = []
    negative_example: dict[str, str] = {}
    grids: dict[str, str]  # sampler name -> grid PNG (on disk: relative to metrics.json's folder; read: a usable path)
    tagger_repo: str | None = None
    tagger_revision: str | None = None
    tagger_commit: str | None = None

    def write(self, path: str | Path) -> None:
        """Grids inside the metrics file's folder are stored by their name there: the folder can move."""
        legacy = {"kid_inception"} if self.kid_inception is None else set()
        data = self.model_dump(mode="json", exclude_none=False, exclude=legacy)
        folder = Path(path).parent.resolve()
        data["grids"] = {k: (Path(g).resolve().relative_to(folder).as_posix()
                             if Path(g).resolve().is_relative_to(folder) else g) for k, g in self.grids.items()}
        write_json_atomic(Path(path), data)

    @classmethod
    def read(cls, path: str | Path) -> EvalMetrics:
        """The metrics, each grid as a path that opens from here (files written before: as they were recorded)."""
        m = cls.model_validate_json(Path(path).read_text())
        folder = Path(path).parent
        grids = {k: str(folder / g) if not Path(g).is_absolute() and (folder / g).exists() else g
                 for k, g in m.grids.items()}
        return m.model_copy(update={"grids": grids})
